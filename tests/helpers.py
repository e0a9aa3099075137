"""What several test modules share: TensorStore's read counters, a CheckpointManager save, plan leaves."""

import itertools

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from orbax_linen_nnx import SourceArray, Target

F32 = np.float32


def save(directory, what=None, *, step: int = 1, **items):
  """Saves one step with a real CheckpointManager and waits for it: `what` is CheckpointArgs (used as
  given) or a tree (saved with StandardSave); `items` are named items of a Composite instead."""
  with ocp.CheckpointManager(directory) as mngr:
    if items:
      args = ocp.args.Composite(**items)
    elif isinstance(what, ocp.args.CheckpointArgs):
      args = what
    else:
      args = ocp.args.StandardSave(what)
    mngr.save(step, args=args)
    mngr.wait_until_finished()


def src(path, shape=(3, 8), dtype=F32):
  """A stored array of a plan, by its '/'-joined path."""
  p = tuple(path.split('/'))
  return SourceArray(p, '.'.join(p), shape, np.dtype(dtype))


def tgt(path, shape=(3, 8), dtype=F32, variable_type=None):
  """A target leaf of a plan, by its '/'-joined path."""
  return Target(tuple(path.split('/')), shape, np.dtype(dtype), None, variable_type)


def counter(name: str) -> int:
  total = 0
  for m in ts.experimental_collect_matching_metrics(name):
    if m['name'] == name:
      total += sum(v.get('value', 0) for v in m['values'])
  return total


# Every key read from a checkpoint's OCDBT store: a restore opens each stored
# array once (one metadata key each), then loads each stored chunk it decodes.
# (TensorStore's chunk_cache/reads counts requests: two requests for one chunk
# in flight together share one load.)
OCDBT_READS = '/tensorstore/kvstore/ocdbt/read'


class ChunkLoads:
  """Counts the stored chunks loaded (read and decoded) while the block restores from `item_dir`."""

  def __init__(self, item_dir):
    self.arrays = len(jax.tree.leaves(ocp.PyTreeCheckpointHandler().metadata(item_dir).tree))

  def __enter__(self):
    self._before = counter(OCDBT_READS)
    return self

  def __exit__(self, *exc):
    self.count = counter(OCDBT_READS) - self._before - self.arrays


def loads_during(item_dir, fn):
  with ChunkLoads(item_dir) as loads:
    out = fn()
  return out, loads.count


def chunk_ids(index, shape, chunk) -> set[tuple[int, ...]]:
  """Grid indices of the stored chunks a slice of the array intersects."""
  ranges = []
  for sl, size, c in zip(index, shape, chunk):
    start, stop, _ = sl.indices(size)
    ranges.append(range(start // c, (stop - 1) // c + 1))
  return set(itertools.product(*ranges))


def chunks_touched(index, shape, chunk) -> int:
  """How many stored chunks a slice of the array intersects."""
  return len(chunk_ids(index, shape, chunk))


def chunks_under(indices, shape, chunk) -> int:
  """How many distinct stored chunks some slices intersect together (each is read once)."""
  return len(set().union(*(chunk_ids(i, shape, chunk) for i in indices)))

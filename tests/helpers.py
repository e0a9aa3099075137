"""What several test modules share: TensorStore's read counters, a CheckpointManager save, plan leaves."""

import itertools
import json
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorstore as ts

import models
from orbax_linen_nnx import SourceArray, Target

TESTS = models.__file__.rsplit('/', 1)[0]

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


# -- The journeys' model (BatchNorm + Dropout) and plain Linen code reading what NNX saved.


def tx():
  return optax.adam(1e-2)


def make_bn_drop():
  return models.nnx_train_state(models.NnxBNDrop, tx())


def linen_pairs():
  """{NNX path: Linen path} of every leaf a Linen BNTrainState of LinenBNDrop holds."""
  pairs = {
    'optimizer/step': 'step',
    'optimizer/opt_state/0/count': 'opt_state/0/count',
    'model/bn/mean': 'batch_stats/BatchNorm_0/mean',
    'model/bn/var': 'batch_stats/BatchNorm_0/var',
  }
  for nnx_name, linen_name, leaves in (
    ('fc1', 'Dense_0', ('kernel', 'bias')),
    ('bn', 'BatchNorm_0', ('scale', 'bias')),
    ('fc2', 'Dense_1', ('kernel', 'bias')),
  ):
    for leaf in leaves:
      pairs[f'model/{nnx_name}/{leaf}'] = f'params/{linen_name}/{leaf}'
      for m in ('mu', 'nu'):
        pairs[f'optimizer/opt_state/0/{m}/{nnx_name}/{leaf}'] = f'opt_state/0/{m}/{linen_name}/{leaf}'
  return pairs


def read_with_linen(jobs) -> dict:
  """Runs tests/linen_reader.py (plain Linen code) in a fresh process that never imports this package."""
  done = subprocess.run(
    [sys.executable, f'{TESTS}/linen_reader.py', json.dumps(jobs)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=TESTS,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out['imported_orbax_linen_nnx'] is False
  return out

"""A checkpoint written in the other layout as a new one, in bounded host memory (`orbax-linen-nnx convert`).

`convert` writes a normal Orbax checkpoint (the one `StandardSave` writes:
`<dst>/<item>/` with its metadata, restorable by `StandardRestore` and by
Linen or NNX code without this package) in bounded host memory. Orbax's own
`PyTreeCheckpointHandler` does the save, so the tree metadata, OCDBT layout,
atomic commit and each process writing only its shards are Orbax's. Its leaves
are `Pending` arrays, known to Orbax by shape, dtype and sharding only; the
type handler registered for them reads a batch of them through the read engine
(each process only its own shards, each stored chunk decoded once), hands the
batch to Orbax's `ArrayHandler` to write, waits for the write, and only then
reads the next: the host holds about one batch (`batch_bytes`) at a time. An
array larger than that is written a block of rows at a time, straight to
TensorStore through Orbax's own write spec (stored in chunks of one block, as
a sharded save stores it), so no array is ever whole in memory; a block still
decodes every stored chunk it overlaps, so a source saved as one chunk per
array is decoded once per block.

    src = source.open_checkpoint('ckpts/linen/100')
    convert(src, 'ckpts/nnx/100', plan_to(src, 'nnx'))
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import future
from etils import epath
from flax import nnx

from orbax_linen_nnx.planning import grid as grid_lib
from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import options as options_lib
from orbax_linen_nnx.engine import prepare as prepare_lib
from orbax_linen_nnx.planning import plans as plan_lib
from orbax_linen_nnx.planning import trees
from orbax_linen_nnx.engine import write as write_lib
from orbax_linen_nnx.engine import read as read_lib
from orbax_linen_nnx.engine import source as source_lib
from orbax_linen_nnx.faces.handler import SavedAsStandard

Path = layout.Path

# Decoded bytes a convert or compare holds per batch of arrays (one larger array goes alone).
DEFAULT_BATCH_BYTES = 32 * 2**20


class DestinationExistsError(FileExistsError):
  """`convert` was asked to write where a checkpoint (or anything) already is."""


class ConvertInProgressError(DestinationExistsError):
  """Another convert is writing the destination now."""


# ---------------------------------------------------------------- plans


def plan_to(src: source_lib.Checkpoint, to: str, *, rules=None, stacks=None) -> plan_lib.RestorePlan:
  """The plan of reading `src` in the other layout with no model: the tree that layout's training state saves
  (`prepare.prepare` with the layout as its target)."""
  return prepare_lib.prepare(src, to, options_lib.RestoreOptions(rules=rules, stacks=stacks)).plan


def with_cost_note(
  src: source_lib.Checkpoint, plan: plan_lib.RestorePlan, budget: int = DEFAULT_BATCH_BYTES, processes: int = 1
) -> tuple[plan_lib.RestorePlan, int]:
  """The plan with a note of what converting it costs each of `processes`, and its host memory bound.

  From metadata alone.
  The blocks `convert` writes (see `write`) shared out as a run of that many
  processes shares them: per process, the stored bytes it decodes (each chunk
  once) and the bytes it writes; and what writing holds in memory, the budget
  plus the largest stored chunk that stays decoded while the blocks it feeds
  are written (the bound returned, besides the caches every convert has).
  """
  job = write_lib.Job.make([r for r in plan.reads if not r.target.key_impl], src, budget, processes=processes)
  z = plan_lib.size_text
  shares = job.shares(processes)
  reads, writes = [s[2] for s in shares], [s[3] for s in shares]
  span = lambda v: z(v[0]) if min(v) == max(v) else f'{z(min(v))}-{z(max(v))}'  # noqa: E731
  each = 'reads' if processes == 1 else f'on {processes} processes each reads'
  note = (
    f'convert: {each} {span(reads)} of stored chunks ({sum(s[1] for s in shares):,} chunk reads in all) and'
    f' writes {span(writes)} ({sum(s[0] for s in shares):,} blocks in all); host memory about the'
    f' {z(budget)} budget'
  )
  if job.held_chunk:
    note += (
      f' + {z(job.held_chunk)} of stored chunks that feed several blocks each (each decoded once and held'
      ' while they are written)'
    )
  note += ' + the caches and buffers of any convert (120-410 MiB measured: docs/benchmarks.md, Convert)'
  return dataclasses.replace(plan, notes=plan.notes + (note,)), budget + job.held_chunk


def largest_chunk_bytes(src: source_lib.Checkpoint, plan: plan_lib.RestorePlan) -> int:
  """The bytes of the largest stored chunk a plan reads, decoded (the least any read of it holds)."""
  names = {x.name for r in plan.reads for x in ops.stored_leaves(r.expression())}
  return max((grid_lib.Grid(src.stores[n]).chunk_nbytes for n in names), default=0)


def target_values(kept: Sequence[plan_lib.Target], state: Any) -> dict[plan_lib.Target, jax.Array]:
  """The target's own values of the leaves a plan keeps for want of a source, to write beside what it reads.

  `state` must hold arrays there (the state of a built model); a leaf that holds none is a `ValueError`.
  """
  by_path = {
    layout.key_path(k): v
    for k, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  }
  out, missing = {}, []
  for t in kept:
    leaf = by_path.get(t.path, by_path.get(layout.stored(t.path)))
    value = leaf.get_raw_value() if isinstance(leaf, nnx.Variable) else leaf
    if isinstance(value, jax.Array):
      out[t] = value
    else:
      missing.append(layout.render(t.path))
  if missing:
    raise ValueError(
      f'--fill-nnx-only from-target needs the target\'s values, and {", ".join(missing)} hold none (an'
      ' abstract state, from nnx.eval_shape): make --target MODULE:FUNCTION return the state of a built'
      ' model, nnx.state(Model(nnx.Rngs(0)))'
    )
  return out


def kept_note(plan: plan_lib.RestorePlan) -> str:
  """What a convert into a target did not write (target leaves no source holds: a Linen checkpoint has no RNG
  stream), and how plain Orbax restores the result all the same."""
  shown = ', '.join(layout.render(t.path) for t in plan.kept[:6]) + (' ...' if len(plan.kept) > 6 else '')
  rng = all(layout.is_rng_path(t.path) for t in plan.kept)
  how = (
    'restore it with plain Orbax as nnx.state(abstract_model, nnx.Not(nnx.RngState)) and nnx.update the'
    ' model, which keeps the RNG streams it was built with (or convert with --fill-nnx-only from-target'
    ' to write a built target model\'s own)'
    if rng
    else 'restore it with plain Orbax into a state without them (nnx.state(abstract_model, nnx.Not(...)) of their'
    ' Variable types), or with LinenCompatRestore(..., partial=True)'
  )
  return (
    f'  left out: {len(plan.kept)} target leaves that no source holds ({shown}); the checkpoint written does'
    f' not hold them: {how}'
  )


def with_shardings(plan: plan_lib.RestorePlan, sharding_of: Callable[[plan_lib.Target], Any]) -> plan_lib.RestorePlan:
  """The plan with every target given `sharding_of(target)`, where it has none."""
  reads = tuple(
    r
    if r.target.sharding is not None
    else dataclasses.replace(r, target=dataclasses.replace(r.target, sharding=sharding_of(r.target)))
    for r in plan.reads
  )
  return dataclasses.replace(plan, reads=reads)


def spread(t: plan_lib.Target) -> jax.sharding.Sharding:
  """Over every device of every process: the first axis they divide, else replicated."""
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('all',))
  spec: list[str | None] = [None] * len(t.shape)
  for axis, n in enumerate(t.shape):
    if n >= len(devices) and n % len(devices) == 0:
      spec[axis] = 'all'
      break
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def batches(reads: Sequence[plan_lib.LeafRead], budget: int) -> list[list[plan_lib.LeafRead]]:
  """Consecutive reads whose targets together hold at most `budget` bytes (a larger one alone)."""
  out: list[list[plan_lib.LeafRead]] = []
  size = 0
  for r in reads:
    n = plan_lib.nbytes(r.target.shape, r.target.dtype)
    if not out or size + n > budget:
      out.append([])
      size = 0
    out[-1].append(r)
    size += n
  return out


# ---------------------------------------------------------------- convert


@dataclasses.dataclass(eq=False)
class Pending(plan_lib.Sized):
  """An array Orbax saves that is read from the source only when Orbax writes it."""

  read: plan_lib.LeafRead
  shape: tuple[int, ...]
  dtype: np.dtype
  sharding: Any


def _trim() -> None:
  """Freed decode and write buffers back to the OS after a batch (see read.py)."""
  read_lib.trim_freed_memory()


class _PendingHandler(ocp.type_handlers.TypeHandler):
  """Writes `Pending` leaves as `jax.Array`s, batch by batch: read, write, wait, next."""

  def __init__(self, array_handler, ckpt, plan, budget: int, on_written: Callable[[int, int], None]):
    self._array = array_handler
    self._ckpt, self._plan, self._budget, self._on_written = ckpt, plan, budget, on_written

  def typestr(self) -> str:
    return self._array.typestr()  # saved as what it is on disk: a jax.Array

  async def metadata(self, infos):
    return await self._array.metadata(infos)

  async def serialize(self, values, infos, args=None):
    args = list(args or [ocp.type_handlers.SaveArgs()] * len(values))
    # Like Orbax's own writes, after the signals that the checkpoint's directories exist (in a
    # synchronous save Orbax creates them while the handler runs), then waited for.
    started = future.CommitFutureAwaitingContractedSignals(self._start(infos[0]), name='orbax_linen_nnx_start')
    await asyncio.to_thread(started.result)
    # PRNG keys (Orbax records their implementation) and empty arrays go through Orbax's ArrayHandler;
    # every other array is written a block at a time, straight from the source's chunks.
    whole = [i for i, v in enumerate(values) if v.read.target.key_impl or not v.nbytes]
    blocked = [i for i in range(len(values)) if i not in whole]
    if blocked:
      written = future.CommitFutureAwaitingContractedSignals(
        self._write_blocks([values[i] for i in blocked], [infos[i] for i in blocked], [args[i] for i in blocked]),
        name='orbax_linen_nnx_write_blocks',
      )
      await asyncio.to_thread(written.result)
    at = {id(values[i].read): i for i in whole}
    for batch in batches([values[i].read for i in whole], self._budget):
      index = [at[id(r)] for r in batch]
      plan = dataclasses.replace(self._plan, reads=tuple(batch), kept=())
      arrays = await asyncio.to_thread(read_lib.execute, plan, self._ckpt, budget_bytes=self._budget)
      ordered = []
      for r in batch:
        a = arrays.pop(r.target.path)
        ordered.append(jax.random.wrap_key_data(a, impl=r.target.key_impl) if r.target.key_impl else a)
      del arrays
      futures = await self._array.serialize(ordered, [infos[i] for i in index], [args[i] for i in index])
      await asyncio.to_thread(lambda fs=futures: [f.result() for f in fs])
      del ordered, futures
      _trim()
      self._on_written(sum(plan_lib.nbytes(r.target.shape, r.target.dtype) for r in batch), len(batch))
    return []

  async def _start(self, info) -> None:
    await info.await_path_creation()
    await asyncio.to_thread(_mark_started, info.parent_dir.parent, self._ckpt)

  async def _write_blocks(self, values: list[Pending], infos, args) -> None:
    """Every array a block at a time (see `write`), stored as Orbax stores a sharded one.

    Each array is stored in chunks of one block (Orbax's write spec, array
    metadata and sharding records), so any reader sees an ordinary jax.Array
    checkpoint. Processes take contiguous runs of blocks, each into its own
    OCDBT files.
    """
    job = write_lib.Job.make(
      [v.read for v in values], self._ckpt, self._budget, processes=jax.process_count(), me=jax.process_index()
    )
    layouts, mine = job.layouts, job.blocks
    specs = [
      write_lib.write_spec(info, arg, v.shape, lay.block_shape, v.dtype)
      for v, info, arg, lay in zip(values, infos, args, layouts)
    ]
    destinations = await write_lib.open_arrays(specs, infos)
    left = collections.Counter(b.array for b in mine)

    def written(b: write_lib.Block) -> None:
      left[b.array] -= 1
      self._on_written(b.nbytes, int(left[b.array] == 0))

    await job.run(destinations, written)
    self._on_written(0, sum(1 for i in range(len(values)) if i not in left))  # arrays other processes wrote
    await write_lib.record_arrays(specs, [v.sharding for v in values], infos, self._array)

  async def deserialize(self, infos, args=None):
    return await self._array.deserialize(infos, args)  # on disk it is a jax.Array: read as one


class _ConvertHandler(ocp.PyTreeCheckpointHandler):
  """Orbax's PyTree handler; the step's metadata names StandardCheckpointHandler (what it wrote)."""

  typestr = SavedAsStandard()


def _tree_for(plan: plan_lib.RestorePlan, structure: Any | None, values: dict[Path, Any]) -> Any:
  """The tree to save: `structure` (a metadata tree) with its leaves replaced, or nested dicts."""
  if structure is not None:
    return jax.tree_util.tree_map_with_path(lambda kp, _: values[layout.key_path(kp)], structure)
  tree: dict = {}
  for path, v in values.items():
    trees.put(tree, path, v)
  return trees.as_linen_lists(tree) if plan.target_layout == layout.LINEN else tree


def target_structure(ckpt: source_lib.Checkpoint) -> Any:
  """A checkpoint's tree as Orbax recorded it (lists, tuples and None entries included)."""
  meta = ocp.PyTreeCheckpointHandler().metadata(ckpt.directory)
  return getattr(meta, 'tree', meta)


# What convert writes into DST (beside its item) when it starts: where a save is
# not renamed into place (object stores), it tells a rerun that the unfinished
# checkpoint at DST is one a convert left, which it may then replace.
STARTED_FILE = 'orbax_linen_nnx_convert.json'


def _named(p: epath.Path) -> tuple[str, ...]:
  """A path as its storage names it: a URL's bucket and keys (gs://, s3://), or a resolved local path."""
  text = os.fspath(p)
  if '://' in text:
    scheme, rest = text.split('://', 1)
    return (f'{scheme}://',) + tuple(k for k in rest.split('/') if k)
  return pathlib.Path(text).resolve().parts


def _left_by_convert(dst: epath.Path) -> bool:
  """`dst` is an unfinished checkpoint an interrupted convert left (object stores: written in place)."""
  return (dst / STARTED_FILE).exists() and not source_lib.is_finished(dst)


def check_destination(src: source_lib.Checkpoint, dst: epath.Path, overwrite: bool) -> bool:
  """Refuses a DST that overlaps SRC or exists; True where DST is a convert's unfinished leftover to replace."""
  source_lib.check_storage(dst, saving=True)
  s, d = _named(src.directory), _named(dst)
  if (src.directory.parent / source_lib.STEP_METADATA_FILE).exists():  # the item of a step: the whole step
    s = s[:-1]
  if s[: len(d)] == d or d[: len(s)] == s:
    raise DestinationExistsError(
      f'{dst} and the source {src.directory} overlap; convert writes a new'
      ' checkpoint and never into its source: choose another destination'
    )
  if not dst.exists() or overwrite:
    return False
  if _left_by_convert(dst):
    return True
  if not source_lib.is_finished(dst):
    raise DestinationExistsError(
      f'{dst} holds a save that did not finish (no {source_lib.COMMIT_MARKER}) and that no convert started'
      f' (no {STARTED_FILE}); pass overwrite=True (--overwrite) to replace it, or choose another destination'
    )
  raise DestinationExistsError(
    f'{dst} already exists; pass overwrite=True (--overwrite) to replace it, or choose another destination'
  )


def _mark_started(directory: epath.Path, src: source_lib.Checkpoint) -> None:
  """Writes STARTED_FILE into the checkpoint being written (process 0), before any array."""
  if jax.process_index() == 0:
    (directory / STARTED_FILE).write_text(json.dumps({'source': os.fspath(src.directory)}))


def convert(
  src: source_lib.Checkpoint,
  dst: epath.PathLike,
  plan: plan_lib.RestorePlan,
  *,
  structure: Any | None = None,
  item: str = 'default',
  overwrite: bool = False,
  batch_bytes: int = DEFAULT_BATCH_BYTES,
  on_written: Callable[[int, int], None] = lambda n, k: None,
  sharding_of: Callable[[plan_lib.Target], Any] = spread,
  names: dict[Path, Path] | None = None,
  extra: Mapping[Path, jax.Array] | None = None,
) -> epath.Path:
  """Writes what `plan` reads from `src` as a checkpoint at `dst` (`<dst>/<item>`), batch by batch.

  `structure` is the tree to write (a target checkpoint's, see
  `target_structure`); without it, nested dicts by target path (Linen's
  optimizer chains as lists). On local disk Orbax writes to a temporary
  directory and renames it when done, so an interrupted convert leaves
  nothing at `dst`; on object stores it writes in place and commits last, and
  a convert marks what it started (STARTED_FILE), so a rerun replaces what an
  interrupted one left without `overwrite` there too.
  `names` renames target paths in the tree written (NNX Variables of an
  abstract state are saved as `.../value`). `extra` adds arrays no source
  holds, written as they are (`target_values`). `on_written(bytes, arrays)` is
  called after each batch is written. Returns the item directory written.
  """
  dst = epath.Path(dst)
  overwrite = check_destination(src, dst, overwrite) or overwrite
  plan = with_shardings(plan, sharding_of)
  names = names or {}
  values: dict[Any, Any] = {
    names.get(r.target.path, r.target.path): Pending(
      r, tuple(r.target.shape), np.dtype(r.target.dtype), r.target.sharding
    )
    for r in plan.reads
  }
  values.update({names.get(p, p): v for p, v in (extra or {}).items()})
  array_handler = ocp.type_handlers.get_type_handler(jax.Array)  # Orbax's own, with its array metadata store
  registry = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, array_handler),  # also keeps Orbax's per-array metadata (PRNG key types) on
    (Pending, _PendingHandler(array_handler, src, plan, batch_bytes, on_written)),
  )
  handler = _ConvertHandler(type_handler_registry=registry)
  tree = _tree_for(plan, structure, values)
  handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
  handlers.add(item, ocp.args.PyTreeSave, handler)
  with (
    _claimed(dst, src, overwrite),
    ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=handlers)) as checkpointer,
  ):
    checkpointer.save(dst, ocp.args.Composite(**{item: ocp.args.PyTreeSave(tree)}), force=overwrite)
  return dst / item


def _claim_file(dst: epath.Path) -> pathlib.Path:
  return pathlib.Path(os.fspath(dst)).with_name(f'.{dst.name}.orbax-linen-nnx-convert.claim')


def _alive(claim: dict) -> bool:
  """Whether the process that wrote a claim still runs (a claim from another host: assumed so)."""
  if claim.get('host') != socket.gethostname():
    return True
  try:
    os.kill(int(claim['pid']), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError):
    return True
  return True


@contextlib.contextmanager
def _claimed(dst: epath.Path, src: source_lib.Checkpoint, overwrite: bool):
  """Holds a claim on a local `dst` while this convert writes it: a second convert into it is refused at once.

  Orbax writes a local checkpoint into a temporary directory and renames it into place; two saves at once
  into one destination make both fail (one finds files missing, the other a directory not empty). The claim
  is a file beside `dst` made with O_EXCL, so exactly one convert holds it. A claim whose process is gone
  (on this host) is taken over; `overwrite` takes over any. One process converts here; a run of several
  (`--distributed`) and object stores are not claimed.
  """
  if '://' in os.fspath(dst) or jax.process_count() > 1:
    yield
    return
  claim = _claim_file(dst)
  claim.parent.mkdir(parents=True, exist_ok=True)  # as Orbax makes DST's parents
  mine = json.dumps(
    {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'source': os.fspath(src.directory),
      'started': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
  )
  for _ in range(2):
    try:
      fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      try:
        held = json.loads(claim.read_text() or '{}')
      except (OSError, ValueError):
        held = {}
      if _alive(held) and not overwrite:
        raise ConvertInProgressError(
          f'another convert is writing {dst} now (process {held.get("pid", "?")} on {held.get("host", "?")},'
          f' from {held.get("source", "?")}, since {held.get("started", "?")}): wait for it to finish (then'
          f' this one finds {dst} written), or, if it is no longer running, pass --overwrite'
          f' (overwrite=True) to replace what it left ({claim} is its claim)'
        ) from None
      claim.unlink(missing_ok=True)  # its process is gone (or overwrite): take it over
  else:
    raise ConvertInProgressError(f'another convert took the claim on {dst} ({claim}) as this one did; try again')
  with os.fdopen(fd, 'w') as f:
    f.write(mine)
  try:
    yield
  finally:
    claim.unlink(missing_ok=True)

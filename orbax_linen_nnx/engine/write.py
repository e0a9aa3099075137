"""Writes a plan's targets as new stored arrays, a block at a time: each stored chunk decoded once.

The other direction of `read.py`, for `convert`. A target array is cut into
blocks laid on the stored chunks it is made of: each stored chunk of a source
lands in one box of the target (`ops.Op.image`: a moved layer axis sends the
row chunks of a Linen `nn.scan` stack to boxes along the NNX stack's second
axis, a stack sends each layer's chunks to its index), and the blocks are
those boxes, merged up to the block size where they are small and cut where
they are large. Each block is then one TensorStore read of the target's view
(the source chunks under it, decoded and copied by TensorStore) and one write
of exactly one chunk of the new array, whose chunk shape is the block shape:
no block reads a chunk another block's read has already decoded, unless one
stored chunk feeds several blocks (a single-chunk array larger than a block,
the layers of a stack unstacked, both halves of a fused kernel); then those
blocks are written one after the other from the chunk, decoded once and held
in TensorStore's chunk cache.

Reads and writes run concurrently, oldest first, while the bytes in flight
(decoded, and written but not yet committed) stay within the budget; a block
that decodes a chunk larger than the budget goes alone. Host memory is then
bounded by the budget plus the largest stored chunk that feeds several blocks.

A target whose ops move elements as no box can say (a reshape) is cut into
blocks of rows and read through the read engine instead; consecutive blocks
that share a chunk are served from the same cache.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from orbax_linen_nnx.engine import _internals
from orbax_linen_nnx.planning import grid as grid_lib
from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import plans
from orbax_linen_nnx.engine import read as read_lib
from orbax_linen_nnx.engine import source as source_lib

Box = ops.Box
Chunk = tuple[str, tuple[int, ...]]  # a stored array's name and the grid index of one of its chunks

# Blocks are about budget / this, so that this many reads and writes overlap.
BLOCKS_IN_FLIGHT = 4


@dataclasses.dataclass(eq=False)
class Block:
  """One box of one target, read and written at once."""

  array: int  # which target (its index in the layouts)
  box: Box
  nbytes: int  # of the block itself
  chunks: tuple[Chunk, ...]  # the stored chunks its read decodes
  cost: int = 0  # bytes it holds in flight: its own, and the chunks it is the first to decode


@dataclasses.dataclass(eq=False)
class Layout:
  """How one target array is cut: its block shape (the new array's chunk shape) and its blocks."""

  read: plans.LeafRead
  expr: Any
  block_shape: tuple[int, ...]
  blocks: list[Block]
  viewable: bool  # read through a TensorStore view (else through the read engine)


def _leaves(expr, grids) -> list[tuple[Box, Chunk]]:
  """(box in `expr`'s output, stored chunk) for every chunk of every stored array under `expr`."""
  op = getattr(expr, 'op', None)
  if op is None:
    grid = grids(expr.name)
    return [(grid.box(c), (expr.name, c)) for c in grid.chunks(grid.chunk_box(tuple((0, n) for n in grid.shape)))]
  shapes = [tuple(a.shape) for a in expr.args]
  out = []
  for i, arg in enumerate(expr.args):
    for box, chunk in _leaves(arg, grids):
      image = op.image(box, i, shapes)
      if image is not None and all(lo < hi for lo, hi in image):
        out.append((image, chunk))
  return out


def moves_boxes(expr) -> bool:
  """Whether every op of `expr` sends each box of its inputs to a box of its output (no reshape)."""
  op = getattr(expr, 'op', None)
  return op is None or (op.moves_boxes and all(moves_boxes(a) for a in expr.args))


def steps(images: Sequence[Box], shape: Sequence[int]) -> tuple[int, ...] | None:
  """The regular grid the chunk images lie on: per axis, the step every inner boundary is a multiple of.

  None when the images do not tile the target exactly once (then no grid of
  them is a partition of the target).
  """
  if sum(math.prod(hi - lo for lo, hi in b) for b in images) != math.prod(shape):
    return None
  steps = []
  for d, n in enumerate(shape):
    inner = {x for b in images for x in b[d] if 0 < x < n}
    steps.append(math.gcd(*inner) if inner else max(n, 1))
  return tuple(steps)


def _divisor_at_most(n: int, limit: int) -> int:
  """The largest divisor of `n` that is at most `limit` (1 at least)."""
  return max([d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0] or [1])


def _block_shape(
  step: Sequence[int], shape: Sequence[int], itemsize: int, block_bytes: int, merge: bool = True
) -> tuple[int, ...]:
  """Blocks of the chunk-image grid: cells cut (outer axes first) to fit, or merged along the longest run."""
  block = [max(s, 1) for s in step]
  nbytes = lambda b: math.prod(b) * itemsize
  for d in range(len(block)):  # too large: cut along the outer axes, by divisors, so blocks tile the cells
    if nbytes(block) <= block_bytes:
      break
    rest = nbytes(block) // block[d]
    block[d] = _divisor_at_most(block[d], block_bytes // max(rest, 1))
  if merge and len(block) and nbytes(block) * 2 <= block_bytes:  # small: merge cells along their longest run
    runs = [(-(-n // b), -d) for d, (n, b) in enumerate(zip(shape, block))]
    d = -max(runs)[1]
    k = max(1, min(block_bytes // nbytes(block), -(-shape[d] // block[d])))
    block[d] = min(shape[d], block[d] * k)
  return tuple(block)


def _row_blocks(shape: Sequence[int], itemsize: int, block_bytes: int) -> tuple[int, ...]:
  """Blocks of whole rows (the fallback for ops that move no boxes)."""
  if not shape:
    return ()
  row = math.prod(shape[1:]) * itemsize
  return (max(1, min(shape[0], block_bytes // max(row, 1))),) + tuple(shape[1:])


def _boxes(shape: Sequence[int], block: Sequence[int]) -> list[Box]:
  ranges = [[(lo, min(lo + b, n)) for lo in range(0, n, b)] for n, b in zip(shape, block)]
  return [tuple(b) for b in itertools.product(*ranges)]


def _stored_boxes(expr, box: Box) -> list[tuple[str, Box]]:
  """The box of each stored array a box of `expr` reads."""
  op = getattr(expr, 'op', None)
  if op is None:
    return [(expr.name, box)]
  needs = op.needs(box, [tuple(a.shape) for a in expr.args])
  return [x for a, b in zip(expr.args, needs) if b is not None for x in _stored_boxes(a, b)]


def layout(read: plans.LeafRead, index: int, grids, block_bytes: int, merge: bool = True) -> Layout:
  """The blocks of one target: on its chunk images where the ops move boxes, else rows.

  With `merge`, small chunk images are merged into blocks of about
  `block_bytes`; without (for targets whose chunks feed other blocks too, so
  that a block needs no more than one such chunk held at once), each is a block.
  """
  t = read.target
  shape, itemsize = tuple(t.shape), np.dtype(t.dtype).itemsize
  expr = read.expression()
  viewable = moves_boxes(expr)
  step = steps([b for b, _ in _leaves(expr, grids)], shape) if viewable else None
  block = (
    _block_shape(step, shape, itemsize, block_bytes, merge)
    if step is not None
    else _row_blocks(shape, itemsize, block_bytes)
  )
  blocks = []
  for box in _boxes(shape, block):
    chunks = []
    for name, b in _stored_boxes(expr, box):
      grid = grids(name)
      chunks += [(name, c) for c in grid.chunks(grid.chunk_box(b))]
    blocks.append(Block(index, box, math.prod(hi - lo for lo, hi in box) * itemsize, tuple(dict.fromkeys(chunks))))
  return Layout(read, expr, block, blocks, viewable and step is not None)


def schedule(layouts: Sequence[Layout], grids) -> tuple[list[Block], dict[Chunk, int]]:
  """Every block in the order it is written, and the stored chunks several blocks read ({chunk: bytes}).

  Blocks that read the same chunk are written one after another (ordered by
  the first chunk each reads), so a chunk is decoded once and its other
  blocks find it in the cache; each block's cost counts the chunks it is the
  first to decode.
  """
  blocks = [b for lay in layouts for b in lay.blocks]
  blocks.sort(key=lambda b: (b.chunks[:1], b.array, b.box))
  readers = collections.Counter(c for b in blocks for c in b.chunks)
  seen: set[Chunk] = set()
  for b in blocks:
    fresh = [c for c in b.chunks if c not in seen]
    seen.update(fresh)
    b.cost = b.nbytes + sum(grids(n).nbytes(grids(n).box(c)) for n, c in fresh)
  return blocks, {c: grids(c[0]).nbytes(grids(c[0]).box(c[1])) for c, k in readers.items() if k > 1}


def share(blocks: Sequence[Block], processes: int, me: int) -> list[Block]:
  """Process `me`'s share of the ordered blocks: one contiguous run of about equal bytes."""
  if processes == 1:
    return list(blocks)
  total, out, acc = sum(b.nbytes for b in blocks), [], 0
  for b in blocks:
    if int((2 * acc + b.nbytes) * processes // max(2 * total, 1)) == me:  # where the block's middle falls
      out.append(b)
    acc += b.nbytes
  return out


@dataclasses.dataclass
class Job:
  """Writing `reads` from `ckpt`: each target's layout, this process's blocks, the stores they read."""

  layouts: list[Layout]
  blocks: list[Block]  # this process's, in order
  ckpt: source_lib.Checkpoint  # the source, its stores that feed several blocks over a large enough cache
  budget: int
  held_chunk: int  # the largest stored chunk kept decoded for several blocks (0: none)
  every: list[Block] = dataclasses.field(default_factory=list)  # every process's blocks, in order

  @classmethod
  def make(
    cls, reads: Sequence[plans.LeafRead], ckpt: source_lib.Checkpoint, budget: int, *, processes: int = 1, me: int = 0
  ) -> 'Job':
    """Lays out every target in blocks and orders them, from metadata alone.

    Blocks are about budget / BLOCKS_IN_FLIGHT, and small enough that every
    process gets several of them.
    """
    grids: dict[str, grid_lib.Grid] = {}

    def grid(name: str) -> grid_lib.Grid:
      if name not in grids:
        grids[name] = grid_lib.Grid(ckpt.stores[name])
      return grids[name]

    total = sum(plans.nbytes(r.target.shape, r.target.dtype) for r in reads)
    block_bytes = max(1, min(budget // BLOCKS_IN_FLIGHT, total // (BLOCKS_IN_FLIGHT * processes)))
    layouts = [layout(r, i, grid, block_bytes) for i, r in enumerate(reads)]
    blocks, reused = schedule(layouts, grid)
    # A block that merged the images of chunks other blocks read too would need them all held at
    # once: such targets are laid out again, one block per chunk image.
    shared = {b.array for b in blocks if sum(c in reused for c in b.chunks) > 1}
    if shared:
      layouts = [layout(r, i, grid, block_bytes, merge=i not in shared) for i, r in enumerate(reads)]
      blocks, reused = schedule(layouts, grid)
    held = max((sum(reused.get(c, 0) for c in b.chunks) for b in blocks), default=0)  # what one block needs held
    if held > source_lib.CHUNK_CACHE_BYTES:  # a chunk several blocks read stays decoded until they are written
      ckpt = source_lib.with_chunk_cache(ckpt, {name for name, _ in reused}, held + source_lib.CHUNK_CACHE_BYTES)
    return cls(layouts, share(blocks, processes, me), ckpt, budget, held, blocks)

  def shares(self, processes: int) -> list[tuple[int, int, int, int]]:
    """Per process of `processes`: (blocks, stored chunks it decodes, their bytes, bytes it writes)."""
    out = []
    for p in range(processes):
      mine = share(self.every, processes, p)
      chunks = {c for b in mine for c in b.chunks}
      grids = {n: grid_lib.Grid(self.ckpt.stores[n]) for n in {n for n, _ in chunks}}
      out.append((len(mine), len(chunks), sum(grids[n].chunk_nbytes for n, _ in chunks), sum(b.nbytes for b in mine)))
    return out

  async def run(self, destinations: Sequence[Any], on_written: Callable[[Block], None] = lambda b: None) -> None:
    """Reads and writes this process's blocks into `destinations` (one open TensorStore per target)."""
    await run(self.blocks, self.layouts, self.ckpt, destinations, self.budget, on_written)


async def within(items: Sequence[Any], cost: Callable[[Any], int], work: Callable[[Any], Any], budget: int) -> None:
  """Awaits `work(item)` for every item, in order, with at most `budget` of `cost` in flight (a costlier one alone).

  What TensorStore frees on its threads (decode and encode buffers) is handed
  back to the OS after every `budget` of cost done (see read.py), so the
  memory this adds stays near `budget`. A failed item stops the rest at once.
  """
  held, done_cost, done = 0, 0, asyncio.Condition()

  async def one(item, n: int) -> None:
    nonlocal held, done_cost
    try:
      await work(item)
      done_cost += n
      if done_cost >= budget:
        done_cost = 0
        read_lib.trim_freed_memory()
    finally:
      async with done:
        held -= n
        done.notify_all()

  tasks: list[asyncio.Future] = []
  for item in items:
    n = cost(item)
    async with done:
      await done.wait_for(lambda: held == 0 or held + n <= budget)
      held += n
    tasks.append(asyncio.ensure_future(one(item, n)))
    for t in [t for t in tasks if t.done()]:
      t.result()
      tasks.remove(t)
  await asyncio.gather(*tasks)
  read_lib.trim_freed_memory()


async def run(
  blocks: Sequence[Block],
  layouts: Sequence[Layout],
  ckpt: source_lib.Checkpoint,
  destinations: Sequence[Any],
  budget: int,
  on_written: Callable[[Block], None],
) -> None:
  """Reads and writes every block, oldest first, within `budget` bytes in flight (a costlier block alone)."""
  views: dict[int, Any] = {}

  def view(i: int):
    if i not in views:
      views[i] = read_lib.view(layouts[i].expr, ckpt.stores)
    return views[i]

  async def one(b: Block) -> None:
    lay = layouts[b.array]
    if lay.viewable:
      data = await view(b.array)[tuple(slice(lo, hi) for lo, hi in b.box)].read()
    else:
      data = await asyncio.to_thread(_engine_read, lay.read, b.box, ckpt)
    await destinations[b.array][tuple(slice(lo, hi) for lo, hi in b.box)].write(data)
    del data
    on_written(b)

  await within(blocks, lambda b: b.cost, one, budget)


async def write_within(writes: Sequence[tuple[Any, np.ndarray]], budget: int) -> None:
  """Writes each (TensorStore view, host array) with at most `budget` bytes in flight (a larger one alone).

  TensorStore copies what it writes into its own buffers (a moved or sliced
  view is not contiguous) and encodes it on its threads: bounding what is in
  flight keeps the memory this adds to the arrays themselves near `budget`.
  """
  await within(writes, lambda w: w[1].nbytes, lambda w: w[0].write(w[1]), budget)


def _engine_read(read: plans.LeafRead, box: Box, ckpt: source_lib.Checkpoint) -> np.ndarray:
  """A block of a target whose ops move no boxes (a reshape), through the read engine, on the host."""
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  slices = tuple(ops.Slice(d, lo, hi) for d, (lo, hi) in enumerate(box) if (lo, hi) != (0, read.target.shape[d]))
  block = dataclasses.replace(
    read,
    target=dataclasses.replace(read.target, shape=ops.box_shape(box), sharding=here),
    transform=tuple(read.transform) + slices,
  )
  plan = plans.RestorePlan(source_layout='', target_layout='', reads=(block,))
  return np.asarray(read_lib.execute(plan, ckpt)[read.target.path])


# ---------------------------------------------------------------- the new arrays, as Orbax writes them


def write_spec(info, arg, shape: Sequence[int], chunk: Sequence[int], dtype) -> Any:
  """Orbax's own write spec of an array stored in chunks of `chunk` (its OCDBT files: this process's)."""
  return _internals.build_array_write_spec(
    info=info,
    arg=arg,
    global_shape=tuple(shape),
    local_shape=tuple(chunk),
    dtype=np.dtype(dtype),
    use_ocdbt=info.is_ocdbt_checkpoint,
    process_index=_internals.get_process_index_for_subdir(info.is_ocdbt_checkpoint),
  )


async def open_arrays(specs: Sequence[Any], infos: Sequence[Any]) -> list[Any]:
  """Creates each array once (process 0) and opens it on every process, after Orbax made the directory."""
  await infos[0].await_path_creation()
  if jax.process_index() == 0:  # each array's metadata, once (the others open assuming it, as Orbax does)
    await asyncio.gather(
      *(ts.open(ts.Spec(s.json), create=True, open=True, context=i.ts_context) for s, i in zip(specs, infos))
    )
  return list(
    await asyncio.gather(
      *(ts.open(ts.Spec(s.json), open=True, assume_metadata=True, context=i.ts_context) for s, i in zip(specs, infos))
    )
  )


async def record_arrays(specs: Sequence[Any], shardings: Sequence[Any], infos: Sequence[Any], array_handler) -> None:
  """The records Orbax's ArrayHandler keeps beside its arrays: their metadata and their shardings."""
  store = _internals.array_metadata_store(array_handler)
  if store is not None:
    await store.write(
      checkpoint_dir=infos[0].parent_dir,
      array_metadatas=[s.metadata for s in specs],
      process_index=ocp.multihost.process_index(),
    )
  await _internals.serialize_shardings(list(shardings), list(infos), primary_host=0)

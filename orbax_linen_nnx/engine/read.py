"""Runs a `RestorePlan`: every stored chunk is read once, then cut into the target's shards.

The one place where stored chunks become device shards, in four steps:

1. *Slices.* For every target leaf, each distinct slice that this process's
   devices hold under the target sharding is walked down the plan's ops
   (`ops.needs`) to the box of each stored array it reads.
2. *Chunks.* Each box is laid on its stored array's chunk grid (TensorStore's
   chunk layout). A slice whose chunks no other slice needs is read with one
   TensorStore read of the leaf's view (stack, concat, take, transpose, cast
   as TensorStore index transforms and virtual drivers), which decodes each
   chunk once and copies straight into the slice; a small leaf whose slices
   together cover exactly its own chunks is read with one request for all of
   them. Slices that share chunks (eight device slices of a single-chunk
   array, two targets split from one fused array, the layers of a stack cut
   along another axis) are read together through their views, so that
   TensorStore decodes each shared chunk once (requests for a chunk in flight
   are joined; a small chunk cache covers one that finishes first). Where no
   view exists (a reshape), each chunk is read once and its pieces are copied
   into place on the host (`ops.regions`), then `ops.apply` computes the rest.
3. *Reads.* Reads are issued in slice order and consumed in the same order,
   while the decoded bytes in flight stay within `budget_bytes` (one larger
   read goes alone); the next reads are issued before the one in hand is cut,
   so TensorStore decodes while this thread copies. Nothing waits on anything
   but the next read in line.
4. *Placement.* A complete slice is put on the devices that hold it; a small
   leaf goes to all its devices in one call.

No process reads a chunk that its own devices' slices do not cover, and no
array is assembled whole on the host unless one stored chunk is the whole array.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from orbax_linen_nnx.planning import grid as grid_lib

# The chunk grid and box arithmetic live in `grid`, which the cost model uses without this engine.
from orbax_linen_nnx.planning.grid import (
  Grid,
  box_of,
  box_size,
  primary_devices,
  union_count,
)
from orbax_linen_nnx.planning.grid import meet as _meet
from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import plans as plan_lib
from orbax_linen_nnx.engine.source import Checkpoint

Box = ops.Box

# Decoded bytes read from storage but not yet cut into shards, at most this
# many at once (a larger read goes alone). Chosen from the benchmark's sweep;
# see benchmarks/README.md. Without a budget from the user, a restore whose
# largest stored chunk is over half of it gets twice that chunk instead: one
# chunk decodes on one thread, and two must be in flight to keep two cores
# decoding (a Linen `nn.scan` saved from host holds 88 MiB single chunks in the
# benchmark; one at a time took 1.3x native Orbax's time).


def _libc_malloc_trim():
  try:
    return ctypes.CDLL(None).malloc_trim  # glibc
  except (OSError, AttributeError):
    return None  # another C library: nothing to do


# glibc keeps freed blocks in the heap arena of the thread that allocated them:
# TensorStore decodes on its own threads, so the decode buffers it frees stay
# resident while this thread allocates the shards elsewhere (native Orbax
# shows the same: 400-600 MiB above the restored state in the benchmark).
# Handing them back after every so many consumed bytes keeps peak RSS near
# the state plus the budget. A trim walks the whole heap, so its cost grows
# with the restored state: every 32 MiB it took 13% of a 1.1 GiB restore of
# many small arrays (gaps_bench.py's `many` cell) for 160 MiB less peak; every
# 128 MiB keeps most of that memory for about a quarter of the time.
_MALLOC_TRIM = _libc_malloc_trim()
_TRIM_EVERY_BYTES = 128 * 2**20


def trim_freed_memory() -> None:
  """Hands the heap memory freed on other threads back to the OS (glibc; elsewhere nothing to do)."""
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)


# PJRT's CPU client takes a host array whose data starts on a 64-byte boundary
# as the device buffer itself (`jax.device_put` aliases it) and copies any
# other. A slice assembled on the host (from several reads, or computed by
# ops) is built in such an array, so on CPU devices it is not copied again.
# (TensorStore's reads return arrays 16 bytes past a boundary; reading into
# aligned arrays through `ts.array(...).write(view)` instead was slower than
# the copy it saved: 2.0-3.6 s against 2.0-2.2 s on gaps_bench.py's stacks.)
# On accelerators the copy to the device is the transfer itself either way.
_ALIGN = 64


def aligned_empty(shape: Sequence[int], dtype) -> np.ndarray:
  """An uninitialised C-order array whose data starts on a 64-byte boundary (see `_ALIGN`)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start : start + nbytes].view(dtype).reshape(tuple(shape))


@dataclasses.dataclass
class _Input:
  """One box of one stored array that a slice reads; filled chunk by chunk."""

  name: str
  box: Box
  owner: '_Slice'
  place: Any = None  # out -> the view of the slice's output this box fills (None: computed by ops)
  chunks: Box = ()  # the chunk indices under `box`
  buf: np.ndarray | None = None  # the box itself, where ops compute the slice
  waiting: int = 0  # reads still to arrive


@dataclasses.dataclass
class _Slice:
  """One distinct slice of one target leaf, and the devices that hold it."""

  leaf: '_Leaf'
  box: Box
  devices: list
  readers: list  # the devices that get it from storage (the rest: by broadcast)
  recipe: Any = None  # the op tree over `inputs`, see _walk
  inputs: list[_Input] = dataclasses.field(default_factory=list)
  out: np.ndarray | None = None  # assembled in place, chunk by chunk
  waiting: int = 0  # reads not consumed yet


@dataclasses.dataclass
class _Leaf:
  read: plan_lib.LeafRead
  expr: Any
  sharding: Any
  primary: set | None  # replica_axis: the devices that read, or None for all
  small: bool  # read and placed whole (many small leaves cost per call, not per byte)
  viewable: bool  # every op has a TensorStore view
  slices: list[_Slice] = dataclasses.field(default_factory=list)
  slices_left: int = 0
  host: dict = dataclasses.field(default_factory=dict)  # box -> host array (small leaves)
  placed: dict = dataclasses.field(default_factory=dict)  # device -> single-device array
  view: Any = None
  whole: '_Read | None' = None  # one read for all its local slices (small leaves), if that decodes no more
  array: jax.Array | None = None


@dataclasses.dataclass
class _Read:
  """TensorStore reads issued together, and where their data goes.

  Either a box of a stored array (`name`) whose sinks are slice inputs that
  copy their part, or a box of a leaf's TensorStore view (`leaf`) whose sinks
  are whole slices inside it, or (`group`) slices that share stored chunks,
  each read through its own leaf's view, all at once: TensorStore then decodes
  each shared chunk once and copies every slice out of it.
  """

  box: Box
  nbytes: int
  sinks: list
  name: str | None = None
  leaf: _Leaf | None = None
  group: list | None = None
  future: Any = None


def _walk(expr, box: Box, s: '_Slice', place=None):
  """The recipe computing `box` of `expr`; adds the stored boxes it reads to `s.inputs`.

  `place` maps the slice's output to the view that `box` of `expr` fills, where
  every op above moves elements as they are (then each input gets its own).
  """
  op = getattr(expr, 'op', None)
  if op is None:  # a stored array
    s.inputs.append(_Input(expr.name, box, s, place))
    return len(s.inputs) - 1
  shapes = [tuple(a.shape) for a in expr.args]
  needs = op.needs(box, shapes)
  regions = op.regions(box, shapes) if place is not None else [None] * len(needs)
  return (op, box, [_walk(a, b, s, _then(place, r)) for a, b, r in zip(expr.args, needs, regions) if b is not None])


def _then(place, region):
  if place is None or region is None:
    return None
  return lambda out: region(place(out))


def _evaluate(recipe, inputs: Sequence[_Input]) -> np.ndarray:
  if isinstance(recipe, int):
    return inputs[recipe].buf  # type: ignore[return-value]  # filled before any recipe is evaluated
  op, box, parts = recipe
  return op.apply(box, [_evaluate(p, inputs) for p in parts])


# How each op is a TensorStore view: reading a box of the view reads only the
# chunks under it, and TensorStore does the copy, in C++, into the result.
# An op with no view (NO_VIEW) is computed on the host by its own `apply`.
VIEWS = {
  ops.Stack: lambda op, v: ts.stack(v, axis=op.axis),
  ops.Concat: lambda op, v: ts.concat(v, axis=op.axis),
  ops.Slice: lambda op, v: v[0][ts.d[op.axis][op.start : op.stop].translate_to[0]],
  ops.Take: lambda op, v: v[0][ts.d[op.axis][op.index]],
  ops.Transpose: lambda op, v: v[0][ts.d[list(op.perm)].transpose[:]],
  ops.MoveAxis: lambda op, v: v[0][ts.d[op.source].transpose[op.destination]],
  ops.Cast: lambda op, v: ts.cast(v[0], ts.dtype(np.dtype(op.dtype).name)),
}
NO_VIEW = (ops.Reshape,)  # elements move: no index transform expresses it


def _viewable(expr) -> bool:
  op = getattr(expr, 'op', None)
  return op is None or (type(op) in VIEWS and all(_viewable(a) for a in expr.args))


def view(expr, stores):
  """The TensorStore view of an expression over stored arrays (every op has one: see `VIEWS`)."""
  op = getattr(expr, 'op', None)
  if op is None:
    return stores[expr.name]
  return VIEWS[type(op)](op, [view(a, stores) for a in expr.args])


def _slices(box: Box) -> tuple[slice, ...]:
  return tuple(slice(lo, hi) for lo, hi in box)


def _within(inner: Box, outer: Box) -> tuple[slice, ...]:
  """`inner` in the coordinates of `outer`, which holds it."""
  return tuple(slice(ilo - olo, ihi - olo) for (ilo, ihi), (olo, _) in zip(inner, outer))


def _copy_in(inp: _Input, box: Box, data: np.ndarray) -> None:
  """Copies the part of `data` (stored `box`) that lies inside `inp.box` to where it goes.

  Straight into the slice's output (through the input's view of it: an index,
  a transposed view, a cast on assignment) where the ops allow, else into the
  input's own buffer for the ops to compute from.
  """
  dst, src = [], []
  for (ilo, ihi), (clo, chi) in zip(inp.box, box):
    lo, hi = max(ilo, clo), min(ihi, chi)
    dst.append(slice(lo - ilo, hi - ilo))
    src.append(slice(lo - clo, hi - clo))
  if inp.place is not None:
    s = inp.owner
    if s.out is None:
      s.out = aligned_empty(ops.box_shape(s.box), s.leaf.read.target.dtype)
    inp.place(s.out)[tuple(dst)] = data[tuple(src)]
    return
  if inp.buf is None:
    inp.buf = np.empty(ops.box_shape(inp.box), data.dtype)
  inp.buf[tuple(dst)] = data[tuple(src)]


# A leaf whose slices on this process total at most this many bytes is read
# with one request (when that decodes no chunk its slices do not need) and put
# on all its devices with one call: the many small leaves of a large model
# then cost per leaf, not per device slice.
_SMALL_LEAF_BYTES = 8 * 2**20


class _Groups:
  """Union-find over slices: those that share a stored chunk end up in one group."""

  def __init__(self):
    self._parent: dict[int, int] = {}
    self._slice: dict[int, _Slice] = {}  # every joined slice, by id, in joining order
    self._members: dict[int, list[_Slice]] | None = None  # root -> slices, once all are joined

  def _root(self, k: int) -> int:
    while self._parent.get(k, k) != k:
      k = self._parent[k] = self._parent.get(self._parent[k], self._parent[k])
    return k

  def join(self, a: _Slice, b: _Slice):
    self._slice[id(a)], self._slice[id(b)] = a, b
    ra, rb = self._root(id(a)), self._root(id(b))
    if ra != rb:
      self._parent[rb] = ra

  def members(self, s: _Slice) -> list[_Slice]:
    """The slices in `s`'s group, in the order they were first joined."""
    if self._members is None:
      self._members = collections.defaultdict(list)
      for k, x in self._slice.items():
        self._members[self._root(k)].append(x)
    return self._members[self._root(id(s))]


class _Engine:
  def __init__(self, plan: plan_lib.RestorePlan, ckpt: Checkpoint, replica_axis: str | None, budget: int | None):
    self.stores = ckpt.stores
    self.grids: dict[str, Grid] = {}
    readers = collections.Counter(
      name for r in plan.reads for name in {x.name for src in r.sources for x in ops.stored_leaves(src)}
    )
    self.alone = {name for name, n in readers.items() if n == 1}  # stored arrays that only one leaf reads
    self.leaves = [self._leaf(r, replica_axis) for r in plan.reads]
    self.reads = self._schedule()
    self.budget = (
      budget
      if budget is not None
      else grid_lib.default_budget(max((g.chunk_nbytes for g in self.grids.values()), default=0))
    )

  def grid(self, name: str) -> Grid:
    if name not in self.grids:
      self.grids[name] = Grid(self.stores[name])
    return self.grids[name]

  def _leaf(self, read: plan_lib.LeafRead, replica_axis) -> _Leaf:
    t = read.target
    shape, sharding = tuple(t.shape), t.sharding
    primary = primary_devices(sharding, replica_axis)
    by_box: dict[Box, list] = collections.defaultdict(list)
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      by_box[box_of(index, shape)].append(device)
    local = sum(box_size(b) for b in by_box) * np.dtype(t.dtype).itemsize
    expr = read.expression()
    leaf = _Leaf(
      read,
      expr,
      sharding,
      primary,
      small=primary is None and local <= _SMALL_LEAF_BYTES,
      viewable=_viewable(expr),
      slices_left=len(by_box),
    )
    whole = self._whole_leaf_read(leaf, list(by_box))
    for box, devices in by_box.items():
      readers = devices if primary is None else [d for d in devices if d in primary]
      s = _Slice(leaf, box, devices, readers)
      if whole is not None:
        whole.sinks.append(s)
      elif readers and box_size(box):
        s.recipe = _walk(expr, box, s, ops.identity if leaf.viewable else None)
      leaf.slices.append(s)
    leaf.whole = whole
    return leaf

  def _whole_leaf_read(self, leaf: _Leaf, boxes: list[Box]) -> _Read | None:
    """One view read of a small leaf's local slices together, where that decodes only their chunks.

    It does when the slices tile the box around them (distinct slices of a
    sharding do not overlap) and no other leaf reads the leaf's stored arrays:
    every viewable op maps each output element to one input element, so the
    box around the slices needs exactly the elements, hence the chunks, that
    the slices need. The slices are not walked one by one at all.
    """
    if not (leaf.small and leaf.viewable and len(boxes) > 1):
      return None
    box = tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(len(boxes[0])))
    if not box_size(box) or sum(box_size(b) for b in boxes) != box_size(box):
      return None
    around = _Slice(leaf, box, [], [])
    _walk(leaf.expr, box, around)
    if any(i.name not in self.alone for i in around.inputs):
      return None  # another leaf reads these arrays too: their shared chunks are read once, for both
    return _Read(box, sum(self.grid(i.name).nbytes(i.box) for i in around.inputs), [], leaf=leaf)

  def _schedule(self) -> list[_Read]:
    """The reads, in leaf and slice order, each stored chunk decoded by exactly one of them."""
    by_array = collections.defaultdict(list)  # stored array -> the inputs that read it
    for leaf in self.leaves:
      for s in leaf.slices:
        for inp in s.inputs:
          inp.chunks = self.grid(inp.name).chunk_box(inp.box)
          by_array[inp.name].append(inp)
    shared: set[int] = set()  # ids of inputs that share a chunk with another input
    groups = _Groups()  # slices joined by the chunks they share
    for inputs in by_array.values():
      for a, b in itertools.combinations(inputs, 2):
        if _meet(a.chunks, b.chunks):
          shared.update((id(a), id(b)))
          groups.join(a.owner, b.owner)
    reads: list[_Read] = []
    by_chunk: dict[tuple[str, tuple[int, ...]], _Read] = {}
    grouped: set[int] = set()
    for leaf in self.leaves:
      if leaf.whole is not None:
        reads.append(leaf.whole)
        for s in leaf.whole.sinks:
          s.waiting = 1
        continue
      reading = [s for s in leaf.slices if s.inputs]
      for s in reading:
        if id(s) in grouped:
          continue  # read with its group
        if leaf.viewable and not any(id(i) in shared for i in s.inputs):
          # No other slice needs these chunks: one read of the view decodes each once.
          reads.append(_Read(s.box, sum(self.grid(i.name).nbytes(i.box) for i in s.inputs), [s], leaf=leaf))
          s.waiting = 1
          continue
        group = groups.members(s) if any(id(i) in shared for i in s.inputs) else []
        if group and all(g.leaf.viewable for g in group):
          # Slices sharing chunks, read through their views all at once: each shared
          # chunk is decoded once (TensorStore joins requests for a chunk in flight).
          chunks = collections.defaultdict(set)
          for g in group:
            for i in g.inputs:
              chunks[i.name].add(i.chunks)
          nbytes = sum(union_count(self.grid(n), c) * self.grid(n).chunk_nbytes for n, c in chunks.items())
          reads.append(_Read((), nbytes, [], group=group))
          for g in group:
            g.waiting = 1
            grouped.add(id(g))
          continue
        for inp in s.inputs:
          grid = self.grid(inp.name)
          if id(inp) not in shared:
            inp.waiting = 1 if box_size(inp.chunks) else 0  # a 0-d array has one chunk, an empty box none
            if inp.waiting:
              reads.append(_Read(inp.box, grid.nbytes(inp.box), [inp], name=inp.name))
            continue
          under = grid.chunks(inp.chunks)
          inp.waiting = len(under)
          for c in under:  # shared chunks: each read once, every input copies its part
            r = by_chunk.get((inp.name, c))
            if r is None:
              box = grid.box(c)
              r = by_chunk[(inp.name, c)] = _Read(box, grid.nbytes(box), [], name=inp.name)
              reads.append(r)
            r.sinks.append(inp)
        for inp in s.inputs:
          if not inp.waiting:  # an empty box: nothing to read
            inp.buf = np.empty(ops.box_shape(inp.box), self.stores[inp.name].dtype.numpy_dtype)
        s.waiting = sum(1 for inp in s.inputs if inp.waiting)
    return reads

  def run(self) -> dict:
    for leaf in self.leaves:  # slices that read nothing (zeros of a replica, empty arrays)
      for s in leaf.slices:
        if not s.waiting:
          self._finish(s)
    in_flight: collections.deque[_Read] = collections.deque()
    pending = iter(self.reads)
    nxt, held = next(pending, None), 0

    def fill():  # issue reads while the decoded bytes in flight fit the budget (one larger read alone)
      nonlocal nxt, held
      while nxt is not None and (not in_flight or held + nxt.nbytes <= self.budget):
        self._issue(nxt)
        in_flight.append(nxt)
        held += nxt.nbytes
        nxt = next(pending, None)

    fill()
    consumed = 0
    while in_flight:
      r = in_flight.popleft()
      data = [f.result() for f in r.future] if r.group is not None else r.future.result()
      r.future = None
      held -= r.nbytes
      fill()  # TensorStore decodes the next reads while this thread cuts this one
      self._consume(r, data)
      del data
      consumed += r.nbytes
      if _MALLOC_TRIM is not None and consumed >= _TRIM_EVERY_BYTES:
        _MALLOC_TRIM(0)
        consumed = 0
    return {leaf.read.target.path: leaf.array for leaf in self.leaves}

  def _issue(self, r: _Read):
    if r.group is not None:
      r.future = [self._view(g.leaf)[_slices(g.box)].read() for g in r.group]
    else:
      source = self.stores[r.name] if r.leaf is None else self._view(r.leaf)  # type: ignore[index]  # a leafless read names its array
      r.future = source[_slices(r.box)].read()

  def _view(self, leaf: _Leaf):
    if leaf.view is None:
      leaf.view = view(leaf.expr, self.stores)
    return leaf.view

  def _consume(self, r: _Read, data):
    if r.group is not None:
      for s, d in zip(r.group, data):
        self._finish(s, d)
      return
    for sink in r.sinks:
      if isinstance(sink, _Slice):  # a whole slice, read through the leaf's view
        self._finish(sink, data if sink.box == r.box else data[_within(sink.box, r.box)])
        continue
      if len(r.sinks) == 1 and sink.box == r.box and sink.place is None:
        sink.buf = data  # the read was exactly this box
      else:
        _copy_in(sink, r.box, data)
      sink.waiting -= 1
      if sink.waiting == 0:
        sink.owner.waiting -= 1
        if sink.owner.waiting == 0:
          self._finish(sink.owner)

  def _finish(self, s: _Slice, data: np.ndarray | None = None):
    """Computes a complete slice (unless read whole) and puts it on its devices."""
    leaf, t = s.leaf, s.leaf.read.target
    dtype = np.dtype(t.dtype)
    if data is None and s.readers:
      if s.out is not None:
        data = s.out
      elif s.recipe is not None:
        data = _evaluate(s.recipe, s.inputs)
      else:
        data = np.zeros(ops.box_shape(s.box), dtype)
    if data is not None:  # a small leaf's slices stay views of its read: the placement copies them once
      data = np.asarray(data, dtype=dtype) if leaf.small else np.asarray(data, dtype=dtype, order='C')
    s.inputs, s.out = [], None
    if leaf.small:
      leaf.host[s.box] = data
    else:
      zeros = None
      put = []
      for d in s.devices:
        if d in s.readers:
          put.append(data)
        else:
          zeros = np.zeros(ops.box_shape(s.box), dtype) if zeros is None else zeros
          put.append(zeros)
      for d, a in zip(s.devices, jax.device_put(put, s.devices)):
        leaf.placed[d] = a
    leaf.slices_left -= 1
    if leaf.slices_left == 0:
      self._assemble(leaf)

  def _assemble(self, leaf: _Leaf):
    t = leaf.read.target
    shape = tuple(t.shape)
    if leaf.small:
      host = leaf.host
      leaf.array = jax.make_array_from_callback(shape, leaf.sharding, lambda index: host[box_of(index, shape)])  # type: ignore[arg-type]
    else:
      devices = leaf.sharding.addressable_devices_indices_map(shape)
      leaf.array = jax.make_array_from_single_device_arrays(shape, leaf.sharding, [leaf.placed[d] for d in devices])
    leaf.host, leaf.placed, leaf.slices, leaf.view = {}, {}, [], None


def _broadcast(arr: jax.Array, replica_axis: str) -> jax.Array:
  """Copies the data of replica 0 along `replica_axis` to every replica (the others hold zeros).

  A sum over the axis with zeros everywhere but replica 0, done on the bits (as
  unsigned integers) so that every value, -0.0 and NaN payloads included, comes
  through exactly.
  """
  sharding = arr.sharding
  assert isinstance(sharding, jax.sharding.NamedSharding)  # replicated along a mesh axis
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[np.dtype(arr.dtype).itemsize]

  def spread(x):
    as_bits = jax.lax.bitcast_convert_type(x, bits) if x.dtype != jnp.bool_ else x.astype(jnp.uint8)
    total = jax.lax.psum(as_bits, replica_axis)
    return total.astype(jnp.bool_) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(total, x.dtype)

  fn = jax.shard_map(spread, mesh=sharding.mesh, in_specs=sharding.spec, out_specs=sharding.spec, check_vma=False)
  return jax.jit(fn, out_shardings=sharding)(arr)


def execute(
  plan: plan_lib.RestorePlan, ckpt: Checkpoint, *, replica_axis: str | None = None, budget_bytes: int | None = None
) -> dict:
  """Reads every planned leaf into its target sharding; {target path: jax.Array}.

  Each stored chunk under this process's slices is read and decoded once.
  `budget_bytes` bounds the decoded bytes held between read and copy
  (default: `grid.default_budget`, 64 MiB or twice the largest stored chunk
  if more). With `replica_axis`, a target replicated along that mesh axis is
  read from storage only by the devices at index 0 of it, then broadcast to
  the others.
  """
  engine = _Engine(plan, ckpt, replica_axis, budget_bytes)
  values = engine.run()
  if replica_axis is not None:
    for leaf in engine.leaves:
      if leaf.primary is not None:
        values[leaf.read.target.path] = _broadcast(values[leaf.read.target.path], replica_axis)
  return values

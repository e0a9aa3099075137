"""Runs a `RestorePlan`: every stored chunk is read once, then cut into the target's shards.

The one place where stored chunks become device shards, in four steps:

1. *Slices.* For every target leaf, each distinct slice that this process's
   devices hold under the target sharding is walked down the plan's ops
   (`ops.needs`) to the box of each stored array it reads.
2. *Chunks.* Each box is laid on its stored array's chunk grid (TensorStore's
   chunk layout). A box whose chunks no other box needs is read as it is: one
   TensorStore read, which decodes each chunk under it once. A chunk that
   several boxes need (eight device slices of a single-chunk array, two
   targets split from one fused array, the layers of a stack cut along
   another axis) is read alone, once, and every box that needs it copies its
   part from it.
3. *Reads.* Reads are issued in slice order and consumed in the same order,
   while the decoded bytes in flight stay within `budget_bytes` (one larger
   read goes alone). A decoded chunk is released as soon as its pieces are
   copied, so nothing waits on anything but the next read in line.
4. *Placement.* A slice whose inputs are complete is computed on the host
   (`ops.apply`: stack, concat, transpose, cast, reshape) and put on the
   devices that hold it; small leaves go to all their devices in one call.

No process reads a chunk that its own devices' slices do not cover, and no
array is assembled whole on the host unless one stored chunk is the whole array.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from orbax_linen_nnx import ops
from orbax_linen_nnx import planner as plan_lib
from orbax_linen_nnx.source import Checkpoint

Box = ops.Box

# Decoded bytes read from storage but not yet cut into shards, at most this
# many at once (a larger read goes alone). Chosen from the benchmark's sweep;
# see benchmarks/README.md.
DEFAULT_READ_BUDGET_BYTES = 256 * 2**20


@dataclasses.dataclass
class _Input:
  """One box of one stored array that a slice reads; filled chunk by chunk."""

  name: str
  box: Box
  owner: '_Slice'
  buf: np.ndarray | None = None
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
  waiting: int = 0  # inputs not complete yet


@dataclasses.dataclass
class _Leaf:
  read: plan_lib.LeafRead
  sharding: Any
  primary: set | None  # replica_axis: the devices that read, or None for all
  batch: bool  # place every slice in one call at the end (small leaves)
  slices_left: int = 0
  host: dict = dataclasses.field(default_factory=dict)  # box -> host array (batch leaves)
  placed: dict = dataclasses.field(default_factory=dict)  # device -> single-device array
  array: jax.Array | None = None


@dataclasses.dataclass
class _Read:
  """One TensorStore read: a box of a stored array, and the inputs it fills."""

  name: str
  box: Box
  nbytes: int
  consumers: list[_Input]
  future: Any = None


@dataclasses.dataclass(frozen=True)
class _Node:
  """An op of the leaf's transform over its inputs (rules' `Derived` has the same face)."""

  op: Any
  args: tuple[Any, ...]
  shape: tuple[int, ...]


def _expression(leaf: plan_lib.LeafRead):
  """The leaf's sources with its transform applied: one tree of ops over stored arrays."""
  args = list(leaf.sources)
  for op in leaf.transform:
    args = [_Node(op, tuple(args), tuple(op.shape([tuple(a.shape) for a in args])))]
  (expr,) = args
  return expr


def _walk(expr, box: Box, s: '_Slice'):
  """The recipe computing `box` of `expr`; adds the stored boxes it reads to `s.inputs`."""
  op = getattr(expr, 'op', None)
  if op is None:  # a stored array
    s.inputs.append(_Input(expr.name, box, s))
    return len(s.inputs) - 1
  needs = op.needs(box, [tuple(a.shape) for a in expr.args])
  return (op, box, [_walk(a, b, s) for a, b in zip(expr.args, needs) if b is not None])


def _evaluate(recipe, inputs: Sequence[_Input]) -> np.ndarray:
  if isinstance(recipe, int):
    return inputs[recipe].buf
  op, box, parts = recipe
  return op.apply(box, [_evaluate(p, inputs) for p in parts])


def _box_of(index: tuple[slice, ...], shape: Sequence[int]) -> Box:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _slices(box: Box) -> tuple[slice, ...]:
  return tuple(slice(lo, hi) for lo, hi in box)


class _Grid:
  """The chunk grid of one stored array."""

  def __init__(self, store):
    self.shape = tuple(store.shape)
    chunk = store.chunk_layout.read_chunk.shape
    origin = store.chunk_layout.grid_origin
    self.chunk = tuple((c or max(n, 1)) for c, n in zip(chunk or self.shape, self.shape))
    self.origin = tuple(origin) if origin is not None else (0,) * len(self.shape)
    self.itemsize = store.dtype.numpy_dtype.itemsize
    self.dtype = store.dtype.numpy_dtype

  def chunks(self, box: Box) -> list[tuple[int, ...]]:
    """Grid indices of the chunks under `box` ([] for an empty box)."""
    ranges = []
    for (lo, hi), c, o in zip(box, self.chunk, self.origin):
      if hi <= lo:
        return []
      ranges.append(range((lo - o) // c, (hi - 1 - o) // c + 1))
    return list(itertools.product(*ranges))

  def box(self, chunk: tuple[int, ...]) -> Box:
    return tuple((max(i * c + o, 0), min((i + 1) * c + o, n))
                 for i, c, o, n in zip(chunk, self.chunk, self.origin, self.shape))

  def nbytes(self, box: Box) -> int:
    return math.prod(ops.box_shape(box)) * self.itemsize


def _copy_in(inp: _Input, box: Box, data: np.ndarray) -> None:
  """Copies the part of `data` (stored `box`) that lies inside `inp.box`."""
  if inp.buf is None:
    inp.buf = np.empty(ops.box_shape(inp.box), data.dtype)
  dst, src = [], []
  for (ilo, ihi), (clo, chi) in zip(inp.box, box):
    lo, hi = max(ilo, clo), min(ihi, chi)
    dst.append(slice(lo - ilo, hi - ilo))
    src.append(slice(lo - clo, hi - clo))
  inp.buf[tuple(dst)] = data[tuple(src)]


# A leaf whose slices on this process total at most this many bytes is placed on
# all its devices in one call once every slice is read: far cheaper per buffer
# than one transfer per slice, for the many small leaves of a large model.
_BATCH_LEAF_BYTES = 8 * 2**20


class _Engine:
  def __init__(self, plan: plan_lib.RestorePlan, ckpt: Checkpoint, replica_axis: str | None, budget: int):
    self.stores = ckpt.stores
    self.budget = budget
    self.grids: dict[str, _Grid] = {}
    self.leaves: list[_Leaf] = []
    self.slices: list[_Slice] = []
    for r in plan.reads:
      self._add_leaf(r, replica_axis)
    self.reads = self._schedule()

  def grid(self, name: str) -> _Grid:
    if name not in self.grids:
      self.grids[name] = _Grid(self.stores[name])
    return self.grids[name]

  def _add_leaf(self, read: plan_lib.LeafRead, replica_axis):
    t = read.target
    shape, sharding = tuple(t.shape), t.sharding
    primary = _primary_devices(sharding, replica_axis)
    by_box: dict[Box, list] = collections.defaultdict(list)
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      by_box[_box_of(index, shape)].append(device)
    local = sum(math.prod(ops.box_shape(b)) for b in by_box) * np.dtype(t.dtype).itemsize
    leaf = _Leaf(read, sharding, primary, batch=primary is None and local <= _BATCH_LEAF_BYTES,
                 slices_left=len(by_box))
    self.leaves.append(leaf)
    expr = _expression(read)
    for box, devices in by_box.items():
      readers = devices if primary is None else [d for d in devices if d in primary]
      s = _Slice(leaf, box, devices, readers)
      if readers and math.prod(ops.box_shape(box)):
        s.recipe = _walk(expr, box, s)
      self.slices.append(s)

  def _schedule(self) -> list[_Read]:
    """The reads, in slice order: whole boxes where no other box shares their chunks."""
    users = collections.Counter()
    chunks_of = {}
    for s in self.slices:
      for inp in s.inputs:
        chunks_of[id(inp)] = chunks = self.grid(inp.name).chunks(inp.box)
        users.update((inp.name, c) for c in chunks)
    reads, by_chunk = [], {}
    for s in self.slices:
      for inp in s.inputs:
        grid, chunks = self.grid(inp.name), chunks_of[id(inp)]
        if all(users[(inp.name, c)] == 1 for c in chunks):
          if chunks:
            inp.waiting = 1
            reads.append(_Read(inp.name, inp.box, grid.nbytes(inp.box), [inp]))
          continue
        inp.waiting = len(chunks)
        for c in chunks:
          r = by_chunk.get((inp.name, c))
          if r is None:
            box = grid.box(c)
            r = by_chunk[(inp.name, c)] = _Read(inp.name, box, grid.nbytes(box), [])
            reads.append(r)
          r.consumers.append(inp)
      s.waiting = sum(1 for inp in s.inputs if inp.waiting)
      for inp in s.inputs:
        if not inp.waiting:  # an empty box: nothing to read
          inp.buf = np.empty(ops.box_shape(inp.box), self.grid(inp.name).dtype)
    return reads

  def run(self) -> dict:
    for s in self.slices:  # slices that read nothing (zeros of a replica, empty arrays)
      if not s.waiting:
        self._finish(s)
    in_flight: collections.deque[_Read] = collections.deque()
    held, pending = 0, iter(self.reads)
    nxt = next(pending, None)
    while nxt is not None or in_flight:
      while nxt is not None and (not in_flight or held + nxt.nbytes <= self.budget):
        nxt.future = self.stores[nxt.name][_slices(nxt.box)].read()
        in_flight.append(nxt)
        held += nxt.nbytes
        nxt = next(pending, None)
      r = in_flight.popleft()
      data = r.future.result()
      r.future = None
      held -= r.nbytes
      self._consume(r, data)
    return {leaf.read.target.path: leaf.array for leaf in self.leaves}

  def _consume(self, r: _Read, data: np.ndarray):
    for inp in r.consumers:
      if len(r.consumers) == 1 and inp.box == r.box:
        inp.buf = data  # the read was exactly this box
      else:
        _copy_in(inp, r.box, data)
      inp.waiting -= 1
      if inp.waiting == 0:
        inp.owner.waiting -= 1
        if inp.owner.waiting == 0:
          self._finish(inp.owner)

  def _finish(self, s: _Slice):
    """Computes a complete slice and puts it on its devices."""
    leaf, t = s.leaf, s.leaf.read.target
    dtype = np.dtype(t.dtype)
    if not s.readers:
      data = None
    elif s.recipe is None:  # an empty slice
      data = np.zeros(ops.box_shape(s.box), dtype)
    else:
      data = np.asarray(_evaluate(s.recipe, s.inputs), dtype=dtype, order='C')
    s.inputs = []
    if leaf.batch:
      leaf.host[s.box] = data
    else:
      zeros = None
      put, where = [], []
      for d in s.devices:
        if d in s.readers:
          put.append(data)
        else:
          zeros = np.zeros(ops.box_shape(s.box), dtype) if zeros is None else zeros
          put.append(zeros)
        where.append(d)
      for d, a in zip(where, jax.device_put(put, where)):
        leaf.placed[d] = a
    leaf.slices_left -= 1
    if leaf.slices_left == 0:
      self._assemble(leaf)

  def _assemble(self, leaf: _Leaf):
    t = leaf.read.target
    shape = tuple(t.shape)
    if leaf.batch:
      host = leaf.host
      leaf.array = jax.make_array_from_callback(shape, leaf.sharding, lambda index: host[_box_of(index, shape)])
      leaf.host = {}
    else:
      devices = leaf.sharding.addressable_devices_indices_map(shape)
      leaf.array = jax.make_array_from_single_device_arrays(shape, leaf.sharding, [leaf.placed[d] for d in devices])
      leaf.placed = {}


def _primary_devices(sharding, replica_axis: str | None) -> set | None:
  """Devices at index 0 of `replica_axis`, if the target is replicated along it."""
  if replica_axis is None or not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  mesh = sharding.mesh
  if replica_axis not in mesh.axis_names or mesh.shape[replica_axis] == 1:
    return None
  used = {a for entry in sharding.spec if entry is not None
          for a in (entry if isinstance(entry, tuple) else (entry,))}
  if replica_axis in used:
    return None  # sharded along it: every device holds different data
  return set(np.take(mesh.devices, 0, axis=mesh.axis_names.index(replica_axis)).flat)


def _broadcast(arr: jax.Array, replica_axis: str) -> jax.Array:
  """Copies the data of replica 0 along `replica_axis` to every replica (the others hold zeros).

  A sum over the axis with zeros everywhere but replica 0, done on the bits (as
  unsigned integers) so that every value, -0.0 and NaN payloads included, comes
  through exactly.
  """
  sharding = arr.sharding
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[np.dtype(arr.dtype).itemsize]

  def spread(x):
    as_bits = jax.lax.bitcast_convert_type(x, bits) if x.dtype != jnp.bool_ else x.astype(jnp.uint8)
    total = jax.lax.psum(as_bits, replica_axis)
    return total.astype(jnp.bool_) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(total, x.dtype)

  fn = jax.shard_map(spread, mesh=sharding.mesh, in_specs=sharding.spec, out_specs=sharding.spec,
                     check_vma=False)
  return jax.jit(fn, out_shardings=sharding)(arr)


def execute(plan: plan_lib.RestorePlan, ckpt: Checkpoint, *, replica_axis: str | None = None,
            budget_bytes: int | None = None) -> dict:
  """Reads every planned leaf into its target sharding; {target path: jax.Array}.

  Each stored chunk under this process's slices is read and decoded once.
  `budget_bytes` bounds the decoded bytes held between read and copy
  (default `DEFAULT_READ_BUDGET_BYTES`). With `replica_axis`, a target replicated
  along that mesh axis is read from storage only by the devices at index 0 of
  it, then broadcast to the others.
  """
  engine = _Engine(plan, ckpt, replica_axis, budget_bytes or DEFAULT_READ_BUDGET_BYTES)
  values = engine.run()
  if replica_axis is not None:
    for leaf in engine.leaves:
      if leaf.primary is not None:
        values[leaf.read.target.path] = _broadcast(values[leaf.read.target.path], replica_axis)
  return values

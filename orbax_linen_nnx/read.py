"""Runs a `RestorePlan`: TensorStore reads of exactly the target's addressable shards.

For each target leaf, the plan's sources are opened lazily and its transform is
applied as a TensorStore view (no data moves). Then, for every distinct slice
that this process's devices hold under the target sharding, only that slice of
the view is read, and placed on the devices that hold it. No process reads a
slice it does not own, and no array is first assembled whole on the host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import concurrent.futures
from typing import Any, Coroutine, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from orbax_linen_nnx import planner as plan_lib
from orbax_linen_nnx import rules
from orbax_linen_nnx import transforms
from orbax_linen_nnx.source import Checkpoint

_T = TypeVar('_T')


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
  """Runs a coroutine to completion, also from inside a running loop (notebooks)."""
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return asyncio.run(coro)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(asyncio.run, coro).result()


# Host copies of slices read but not yet on their devices, at most this many
# bytes at once (a larger slice goes alone). Bounds peak memory above the state.
_HOST_BYTES_IN_FLIGHT = 32 * 2**20


class _ByteBudget:
  """Admits slices while the bytes in flight stay within `limit` (one oversized slice alone)."""

  def __init__(self, limit: int):
    self._limit, self._used = limit, 0
    self._cv = asyncio.Condition()

  @contextlib.asynccontextmanager
  async def hold(self, nbytes: int):
    async with self._cv:
      await self._cv.wait_for(lambda: self._used == 0 or self._used + nbytes <= self._limit)
      self._used += nbytes
    try:
      yield
    finally:
      async with self._cv:
        self._used -= nbytes
        self._cv.notify_all()


class _Stores:
  """Opens each on-disk array once, sharing one TensorStore context."""

  def __init__(self, ckpt: Checkpoint):
    self._ckpt = ckpt
    self._context = ts_utils.get_ts_context(use_ocdbt=ckpt.use_ocdbt)
    self._opened: dict[str, asyncio.Future] = {}
    self.in_flight = _ByteBudget(_HOST_BYTES_IN_FLIGHT)

  def _spec(self, name: str) -> dict[str, Any]:
    info = ocp.type_handlers.ParamInfo(
        name=name,
        parent_dir=self._ckpt.directory,
        is_ocdbt_checkpoint=self._ckpt.use_ocdbt,
        use_zarr3=self._ckpt.use_zarr3,
        ts_context=self._context,
    )
    return ts_utils.build_array_read_spec(info, use_ocdbt=self._ckpt.use_ocdbt).json

  def open(self, name: str) -> asyncio.Future:
    if name not in self._opened:
      self._opened[name] = asyncio.ensure_future(
          ts.open(self._spec(name), context=self._context, open=True, read=True)
      )
    return self._opened[name]


def _hashable(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


async def _lazy(expr, stores: _Stores) -> transforms.Lazy:
  """A stored array, or what rules make of stored arrays, as a lazy array."""
  if isinstance(expr, rules.Derived):
    args = [await _lazy(a, stores) for a in expr.args]
    return await transforms.build(expr.op, args)
  return transforms.TsLazy(await stores.open(expr.name))


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


async def _read_leaf(leaf: plan_lib.LeafRead, stores: _Stores, replica_axis: str | None) -> jax.Array:
  target = leaf.target
  args = [await _lazy(s, stores) for s in leaf.sources]
  for op in leaf.transform:
    args = [await transforms.build(op, args)]
  (view,) = args
  shape, sharding = tuple(target.shape), target.sharding
  primary = _primary_devices(sharding, replica_axis)
  by_slice: dict[tuple, list[jax.Device]] = collections.defaultdict(list)
  index_of: dict[tuple, tuple[slice, ...]] = {}
  device_indices = sharding.addressable_devices_indices_map(shape)
  for device, index in device_indices.items():
    key = _hashable(index, shape)
    by_slice[key].append(device)
    index_of[key] = index

  async def read_slice(key):
    devices = by_slice[key]
    readers = devices if primary is None else [d for d in devices if d in primary]
    nbytes = math.prod(sharding.shard_shape(shape)) * np.dtype(target.dtype).itemsize
    async with stores.in_flight.hold(nbytes if readers else 0):
      data = await view.read(index_of[key]) if readers else None
      placed = _place(data, devices, readers, sharding.shard_shape(shape), target.dtype)
      jax.block_until_ready([a for _, a in placed])  # the host copy can go once this returns
    return placed

  placed = await asyncio.gather(*(read_slice(k) for k in by_slice))
  per_device = dict(pair for group in placed for pair in group)
  arrays = [per_device[d] for d in device_indices]
  arr = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
  return arr if primary is None else _broadcast(arr, replica_axis)


def _place(data, devices, readers, shard_shape, dtype) -> list:
  """Puts a slice on the devices that read it, zeros on those that get it by broadcast."""
  zeros = None
  placed = []
  for d in devices:
    if d in readers:
      placed.append((d, jax.device_put(data, d)))
    else:
      if zeros is None:
        zeros = np.zeros(shard_shape, np.dtype(dtype))
      placed.append((d, jax.device_put(zeros, d)))
  return placed


async def _read_all(plan: plan_lib.RestorePlan, ckpt: Checkpoint, replica_axis: str | None) -> dict:
  stores = _Stores(ckpt)
  arrays = await asyncio.gather(*(_read_leaf(r, stores, replica_axis) for r in plan.reads))
  return {r.target.path: a for r, a in zip(plan.reads, arrays)}


def execute(plan: plan_lib.RestorePlan, ckpt: Checkpoint, *, replica_axis: str | None = None) -> dict:
  """Reads every planned leaf into its target sharding; {target path: jax.Array}.

  With `replica_axis`, a target replicated along that mesh axis is read from
  storage only by the devices at index 0 of it, then broadcast to the others.
  """
  return _run(_read_all(plan, ckpt, replica_axis))

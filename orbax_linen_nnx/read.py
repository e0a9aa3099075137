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
import concurrent.futures
from typing import Any, Coroutine, TypeVar

import jax
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from orbax_linen_nnx import plan as plan_lib
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


class _Stores:
  """Opens each on-disk array once, sharing one TensorStore context."""

  def __init__(self, ckpt: Checkpoint):
    self._ckpt = ckpt
    self._context = ts_utils.get_ts_context(use_ocdbt=ckpt.use_ocdbt)
    self._opened: dict[str, asyncio.Future] = {}

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


async def _read_leaf(leaf: plan_lib.LeafRead, stores: _Stores) -> jax.Array:
  target = leaf.target
  args = [await _lazy(s, stores) for s in leaf.sources]
  for op in leaf.transform:
    args = [await transforms.build(op, args)]
  (view,) = args
  shape, sharding = tuple(target.shape), target.sharding
  by_slice: dict[tuple, list[jax.Device]] = collections.defaultdict(list)
  index_of: dict[tuple, tuple[slice, ...]] = {}
  device_indices = sharding.addressable_devices_indices_map(shape)
  for device, index in device_indices.items():
    key = _hashable(index, shape)
    by_slice[key].append(device)
    index_of[key] = index

  async def read_slice(key):
    data = await view.read(index_of[key])
    return [(d, jax.device_put(data, d)) for d in by_slice[key]]

  placed = await asyncio.gather(*(read_slice(k) for k in by_slice))
  per_device = dict(pair for group in placed for pair in group)
  arrays = [per_device[d] for d in device_indices]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


async def _read_all(plan: plan_lib.RestorePlan, ckpt: Checkpoint) -> dict:
  stores = _Stores(ckpt)
  arrays = await asyncio.gather(*(_read_leaf(r, stores) for r in plan.reads))
  return {r.target.path: a for r, a in zip(plan.reads, arrays)}


def execute(plan: plan_lib.RestorePlan, ckpt: Checkpoint) -> dict:
  """Reads every planned leaf into its target sharding; {target path: jax.Array}."""
  return _run(_read_all(plan, ckpt))

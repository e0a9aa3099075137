"""The abstract state a user restores into: its leaves as `Target`s, and the rebuild.

Accepted: an `nnx.State`, an abstract `nnx.Module` (from `nnx.eval_shape`), or
any pytree (dict, Linen `TrainState`, ...) of `jax.ShapeDtypeStruct` or
`jax.Array` leaves. The result is rebuilt with the same type and structure.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from orbax_linen_nnx import layout
from orbax_linen_nnx.planner import Target

Path = layout.Path


@functools.lru_cache(maxsize=None)
def _replicated_on(devices: tuple[jax.Device, ...]) -> jax.sharding.Sharding:
  mesh = jax.sharding.Mesh(np.array(devices), ('devices',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def default_sharding() -> jax.sharding.Sharding:
  """Sharding given to a target leaf that asks for none: replicated on every device.

  Replication over `jax.devices()` (all processes) keeps such arrays usable in
  the same `jit` as the sharded ones, on one host or many.
  """
  return _replicated_on(tuple(jax.devices()))



def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _is_key(value) -> bool:
  return jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


def key_sharding(data_sharding, ndim: int):
  """The sharding of keys of rank `ndim` whose key data is sharded by `data_sharding`."""
  if isinstance(data_sharding, jax.sharding.NamedSharding):
    spec = jax.sharding.PartitionSpec(*tuple(data_sharding.spec)[:ndim])
    return jax.sharding.NamedSharding(data_sharding.mesh, spec, memory_kind=data_sharding.memory_kind)
  return data_sharding


def _key_data(value, sharding) -> tuple[tuple[int, ...], np.dtype, Any, str]:
  """What a typed PRNG key leaf is read as: its key data (shape, dtype, sharding) and implementation.

  Orbax stores a typed key as its key data, the key's shape plus trailing
  dimensions (threefry: (2,) uint32); the data is sharded as the key is, whole
  along the trailing dimensions.
  """
  data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(value.shape, value.dtype))
  extra = len(data.shape) - len(value.shape)
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(value.shape) - len(sharding.spec))
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, *(None,) * extra),
                                          memory_kind=sharding.memory_kind)
  elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    raise TypeError(f'a PRNG key sharded by {type(sharding).__name__} cannot be restored; use a NamedSharding')
  impl = value.dtype._impl.name  # the name Orbax records (str(jax.random.key_impl(key)))
  return tuple(data.shape), np.dtype(data.dtype), sharding, impl


@dataclasses.dataclass
class AbstractState:
  """A flattened abstract state, ready to be planned and rebuilt."""

  layout: str
  targets: list[Target]
  _slots: list[Target | None]  # per leaf of the flattened state: its target (None: holds no array)
  _leaves: list[Any]
  _rebuild: Callable[[list[Any]], Any]

  def rebuild(self, values: Mapping[Path, Any]) -> Any:
    """The abstract state with `values[path]` put in at each restored leaf."""
    new = []
    for t, leaf in zip(self._slots, self._leaves):
      if t is None or t.path not in values:
        new.append(leaf)
      else:
        value = values[t.path]
        if t.key_impl is not None:
          value = jax.random.wrap_key_data(value, impl=t.key_impl)
        new.append(leaf.copy(value) if _is_variable(leaf) else value)
    return self._rebuild(new)


def flatten(abstract: Any, *, layout_name: str | None = None) -> AbstractState:
  """Reads every leaf of `abstract` as a `Target` (path, shape, dtype, sharding)."""
  if isinstance(abstract, nnx.Module):
    graphdef, state = nnx.split(abstract)
    inner = flatten(state, layout_name=layout_name or layout.NNX)
    return AbstractState(
        inner.layout, inner.targets, inner._slots, inner._leaves,
        lambda leaves: nnx.merge(graphdef, inner._rebuild(leaves)),
    )
  is_nnx = isinstance(abstract, nnx.State)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_variable)
  targets, slots, leaves = [], [], []
  for keys, leaf in flat:
    path = layout.key_path(keys)
    value = leaf.get_raw_value() if _is_variable(leaf) else leaf
    if _is_variable(leaf) and not jax.tree.leaves(value):
      # A Variable holding no array (optax's MaskedNode for a masked-out
      # parameter, an empty state): nothing is stored for it, nothing to read.
      slots.append(None)
      leaves.append(leaf)
      continue
    if not isinstance(value, (jax.ShapeDtypeStruct, jax.Array)):
      raise TypeError(
          f"abstract leaf '{layout.render(path)}' is a {type(value).__name__}, not an"
          ' array description. Pass an abstract state whose leaves are'
          ' jax.ShapeDtypeStruct (nnx.eval_shape / jax.eval_shape) or jax.Array.'
      )
    sharding = getattr(value, 'sharding', None) or default_sharding()
    shape, dtype, key_impl = tuple(value.shape), value.dtype, None
    if _is_key(value):
      shape, dtype, sharding, key_impl = _key_data(value, sharding)
    slots.append(
        Target(
            path=path,
            shape=shape,
            dtype=dtype,
            sharding=sharding,
            variable_type=type(leaf).__name__ if _is_variable(leaf) else None,
            key_impl=key_impl,
        )
    )
    targets.append(slots[-1])
    leaves.append(leaf)
  if layout_name is None:
    layout_name = layout.NNX if is_nnx else layout.detect(t.path for t in targets)
  return AbstractState(layout_name, targets, slots, leaves, treedef.unflatten)

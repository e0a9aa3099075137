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


@dataclasses.dataclass
class AbstractState:
  """A flattened abstract state, ready to be planned and rebuilt."""

  layout: str
  targets: list[Target]
  _leaves: list[Any]
  _rebuild: Callable[[list[Any]], Any]

  def rebuild(self, values: Mapping[Path, Any]) -> Any:
    """The abstract state with `values[path]` put in at each restored leaf."""
    new = []
    for t, leaf in zip(self.targets, self._leaves):
      if t.path not in values:
        new.append(leaf)
      elif _is_variable(leaf):
        new.append(leaf.copy(values[t.path]))
      else:
        new.append(values[t.path])
    return self._rebuild(new)


def flatten(abstract: Any, *, layout_name: str | None = None) -> AbstractState:
  """Reads every leaf of `abstract` as a `Target` (path, shape, dtype, sharding)."""
  if isinstance(abstract, nnx.Module):
    graphdef, state = nnx.split(abstract)
    inner = flatten(state, layout_name=layout_name or layout.NNX)
    return AbstractState(
        inner.layout, inner.targets, inner._leaves,
        lambda leaves: nnx.merge(graphdef, inner._rebuild(leaves)),
    )
  is_nnx = isinstance(abstract, nnx.State)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_variable)
  targets, leaves = [], []
  for keys, leaf in flat:
    path = layout.key_path(keys)
    value = leaf.get_raw_value() if _is_variable(leaf) else leaf
    if not isinstance(value, (jax.ShapeDtypeStruct, jax.Array)):
      raise TypeError(
          f"abstract leaf '{layout.render(path)}' is a {type(value).__name__}, not an"
          ' array description. Pass an abstract state whose leaves are'
          ' jax.ShapeDtypeStruct (nnx.eval_shape / jax.eval_shape) or jax.Array.'
      )
    sharding = getattr(value, 'sharding', None) or default_sharding()
    targets.append(
        Target(
            path=path,
            shape=tuple(value.shape),
            dtype=value.dtype,
            sharding=sharding,
            variable_type=type(leaf).__name__ if _is_variable(leaf) else None,
        )
    )
    leaves.append(leaf)
  if layout_name is None:
    layout_name = layout.NNX if is_nnx else layout.detect(t.path for t in targets)
  return AbstractState(layout_name, targets, leaves, treedef.unflatten)

"""The abstract state a user restores into: its leaves as `Target`s, and the rebuild.

Accepted: an `nnx.State`, an abstract `nnx.Module` (from `nnx.eval_shape`), or
any pytree (dict, Linen `TrainState`, ...) of `jax.ShapeDtypeStruct` or
`jax.Array` leaves. The result is rebuilt with the same type and structure.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from orbax_linen_nnx import layout
from orbax_linen_nnx.planner import PlanError, Target

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


class NotRestoredError(ValueError):
  """A leaf the restore kept as an abstract description was used as if it held values."""


class NotRestored(jax.ShapeDtypeStruct):
  """A target leaf that no source filled and the abstract state gave no value for.

  Still a `jax.ShapeDtypeStruct` (shape, dtype, sharding), so a restored tree
  can be inspected; computing with it, putting it through `jit` or
  `nnx.update`, or flattening it as a pytree raises `NotRestoredError` naming
  the leaf, instead of a failure far away at the first forward pass.
  """

  def __init__(self, path: str, abstract: jax.ShapeDtypeStruct):
    super().__init__(abstract.shape, abstract.dtype, sharding=getattr(abstract, 'sharding', None))
    self.path = path

  def fail(self, *_, **__):
    raise NotRestoredError(
        f"'{self.path}' {tuple(self.shape)} {self.dtype} was not restored: the checkpoint holds no source for"
        ' it, so the restore kept it as the abstract description it was given. Give it a value first:'
        ' restore into a state that holds values there (nnx.state(model) of an initialised model keeps'
        ' them), use fill_nnx_only= for RNG state, or assign it; orbax_linen_nnx.not_restored(tree)'
        ' lists every such leaf.')

  __jax_array__ = __array__ = __getitem__ = __iter__ = __len__ = __bool__ = __float__ = __int__ = fail
  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = fail
  __truediv__ = __rtruediv__ = __neg__ = __pow__ = astype = reshape = fail

  def __repr__(self):
    return f'NotRestored({self.path!r}, shape={tuple(self.shape)}, dtype={self.dtype})'


jax.tree_util.register_pytree_node(NotRestored, lambda x: x.fail(), lambda aux, children: None)


def not_restored(tree: Any) -> list[str]:
  """Paths of the leaves of a restored tree that hold no value (`NotRestored`)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: _is_variable(x) or isinstance(x, NotRestored))
  out = []
  for keys, leaf in flat:
    value = leaf.get_raw_value() if _is_variable(leaf) else leaf
    if isinstance(value, NotRestored):
      out.append(value.path)
  return out


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
  _slots: list[Target | None]  # per leaf of the flattened state: its target (None: holds no array)
  _leaves: list[Any]
  _rebuild: Callable[[list[Any]], Any]
  problems: list[str] = dataclasses.field(default_factory=list)  # shardings that do not fit, see flatten
  placeholders: list[str] = dataclasses.field(default_factory=list)  # NotRestored leaves of the last rebuild

  @property
  def targets(self) -> list[Target]:
    return [t for t in self._slots if t is not None]

  def rebuild(self, values: Mapping[Path, Any]) -> Any:
    """The abstract state with `values[path]` put in at each restored leaf.

    A leaf kept as given that holds only a description becomes `NotRestored`
    (listed in `placeholders`).
    """
    new, self.placeholders = [], []
    for t, leaf in zip(self._slots, self._leaves):
      if t is None:
        new.append(leaf)
      elif t.path not in values:  # kept as given: a description of an array is no value
        value = leaf.get_raw_value() if _is_variable(leaf) else leaf
        if isinstance(value, jax.ShapeDtypeStruct) and not isinstance(value, NotRestored):
          value = NotRestored(layout.render(t.path), value)
          self.placeholders.append(value.path)
          if _is_variable(leaf):
            leaf = leaf.copy()  # Variable.copy(value) would tree-map the placeholder, which raises
            leaf.set_raw_value(value)
          else:
            leaf = value
        new.append(leaf)
      else:
        value = values[t.path]
        if t.key_impl is not None:
          value = jax.random.wrap_key_data(value, impl=t.key_impl)
        new.append(leaf.copy(value) if _is_variable(leaf) else value)
    return self._rebuild(new)


def _context_mesh() -> jax.sharding.Mesh | None:
  """The concrete mesh of `with jax.set_mesh(mesh):` / `jax.sharding.use_mesh`, if any."""
  mesh = jax.sharding.get_mesh()
  return mesh if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty else None


def _fits(mesh: jax.sharding.Mesh | None, abstract_mesh) -> bool:
  return (mesh is not None and tuple(mesh.axis_names) == tuple(abstract_mesh.axis_names)
          and tuple(mesh.axis_sizes) == tuple(abstract_mesh.axis_sizes))


class _Shardings:
  """Makes every target's sharding concrete and checks it, collecting problems (nothing raised)."""

  def __init__(self, mesh: jax.sharding.Mesh | None):
    self.mesh = mesh if mesh is not None else _context_mesh()
    self.unmeshed: dict[str, list[str]] = collections.defaultdict(list)  # abstract mesh -> leaf paths
    self.problems: list[str] = []
    self._world = None

  def resolve(self, path: Path, value) -> Any:
    sharding = getattr(value, 'sharding', None)
    if sharding is None:
      return default_sharding()
    if isinstance(sharding, jax.sharding.PartitionSpec):
      if self.mesh is None:
        self.unmeshed['a PartitionSpec with no mesh'].append(layout.render(path))
        return None
      sharding = jax.sharding.NamedSharding(self.mesh, sharding)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
      if not _fits(self.mesh, sharding.mesh):
        axes = ', '.join(f'{a}={n}' for a, n in zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
        self.unmeshed[f'an AbstractMesh ({axes})'].append(layout.render(path))
        return None
      sharding = jax.sharding.NamedSharding(self.mesh, sharding.spec, memory_kind=sharding.memory_kind)
    self._check(path, tuple(value.shape), sharding)
    return sharding

  def _check(self, path: Path, shape: tuple[int, ...], sharding) -> None:
    where = f"target '{layout.render(path)}' {shape}"
    if self._world is None:
      self._world = set(jax.devices())
    outside = sorted(d.id for d in sharding.device_set if d not in self._world)
    if outside:
      self.problems.append(f'{where}: its sharding uses devices {outside}, which are not among this run\'s'
                           ' devices (jax.devices()); build the mesh from jax.devices()')
    if not isinstance(sharding, jax.sharding.NamedSharding):
      return
    spec, mesh = tuple(sharding.spec), sharding.mesh
    if len(spec) > len(shape):
      self.problems.append(f'{where}: its PartitionSpec {sharding.spec} has {len(spec)} entries for'
                           f' {len(shape)} dimensions; drop the extra entries')
      return
    seen = collections.Counter()
    for d, entry in enumerate(spec):
      names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
      seen.update(names)
      unknown = [a for a in names if a not in mesh.axis_names]
      if unknown:
        self.problems.append(f'{where}: its PartitionSpec {sharding.spec} names mesh axis {unknown[0]!r},'
                             f' which the mesh does not have (axes: {", ".join(map(repr, mesh.axis_names))})')
        continue
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if shape[d] % size:
        self.problems.append(
            f'{where}: dimension {d} ({shape[d]}) is not divisible by mesh axes {names} (size {size})'
            f' of its PartitionSpec {sharding.spec}; shard that dimension along axes whose size divides'
            f' {shape[d]}, or leave it unsharded (None)')
    twice = [a for a, n in seen.items() if n > 1]
    if twice:
      self.problems.append(f'{where}: its PartitionSpec {sharding.spec} uses mesh axis {twice[0]!r} for more'
                           ' than one dimension; each mesh axis may shard one dimension')

  def finish(self) -> list[str]:
    for what, paths in self.unmeshed.items():
      self.problems.insert(0, (
          f'{len(paths)} target(s) are sharded over {what}, and no concrete mesh with those axes is'
          f' in context: {", ".join(repr(p) for p in paths)}. Restore inside `with jax.set_mesh(mesh):`'
          ' (the mesh the abstract state was made under), or pass LinenCompatRestore(..., mesh=mesh)'))
    return self.problems


def flatten(abstract: Any, *, layout_name: str | None = None, mesh: jax.sharding.Mesh | None = None) -> AbstractState:
  """Reads every leaf of `abstract` as a `Target` (path, shape, dtype, sharding).

  Shardings over an `AbstractMesh` (or bare `PartitionSpec`s) are made concrete
  with `mesh`, else the mesh in context; every sharding is checked against its
  leaf. What does not fit is listed in `AbstractState.problems`, for the plan
  to report with its own; leaves that are no arrays raise `PlanError` at once.
  """
  if isinstance(abstract, nnx.Module):
    graphdef, state = nnx.split(abstract)
    inner = flatten(state, layout_name=layout_name or layout.NNX, mesh=mesh)
    return AbstractState(
        inner.layout, inner._slots, inner._leaves,
        lambda leaves: nnx.merge(graphdef, inner._rebuild(leaves)), inner.problems,
    )
  is_nnx = isinstance(abstract, nnx.State)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_variable)
  slots, leaves = [], []
  shardings = _Shardings(mesh)
  not_arrays = []
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
      not_arrays.append(f"'{layout.render(path)}' is a {type(value).__name__}")
      continue
    sharding = shardings.resolve(path, value) or default_sharding()
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
    leaves.append(leaf)
  if not_arrays:
    raise PlanError(
        f'{len(not_arrays)} abstract leaf/leaves are not array descriptions: {"; ".join(not_arrays)}.'
        ' Fix: pass an abstract state whose leaves are jax.ShapeDtypeStruct (nnx.eval_shape /'
        ' jax.eval_shape) or jax.Array; nothing was read.')
  if layout_name is None:
    layout_name = layout.NNX if is_nnx else layout.detect(t.path for t in slots if t is not None)
  return AbstractState(layout_name, slots, leaves, treedef.unflatten, shardings.finish())

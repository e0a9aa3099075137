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

from orbax_linen_nnx.engine import _internals
from orbax_linen_nnx import layout
from orbax_linen_nnx.planning.plans import PlanError, Target

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


# A target leaf above this size that gives no sharding is noted in the plan
# (and warned of) when it is replicated on several devices: every device then
# holds all of it (flax issue 5110: models that ran out of memory so).
UNSHARDED_NOTE_BYTES = 16 * 2**20


def _nbytes(value) -> int:
  return int(np.prod(value.shape, dtype=np.int64)) * np.dtype(value.dtype).itemsize if not _is_key(value) else 0


def _mib(n: int) -> str:
  return f'{n / 2**20:,.1f} MiB'


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


class NotRestoredError(ValueError):
  """A leaf the restore kept as an abstract description was used as if it held values."""


class NotRestored(jax.ShapeDtypeStruct):
  """A target leaf that no source filled and the abstract state gave no value for.

  Only plain pytrees (a dict, a Linen `TrainState`) and abstract modules hold
  these: a restored `nnx.State` leaves such leaves out, so that
  `nnx.update(model, restored)` keeps the model's own values there.

  Still a `jax.ShapeDtypeStruct` and a pytree leaf (shape, dtype, sharding),
  so a restored tree flattens, maps, prints and converts like any other.
  Using it as an array (an eager op, a `jit` or `eval_shape` argument,
  `device_put`, `numpy.asarray`) raises `NotRestoredError` naming the leaf and
  the fix, instead of a failure far away at the first forward pass.

  >>> orbax_linen_nnx.not_restored(restored)  # doctest: +SKIP
  ['model/drop/rngs/key']
  """

  def __init__(self, path: str, abstract: jax.ShapeDtypeStruct):
    super().__init__(abstract.shape, abstract.dtype, sharding=getattr(abstract, 'sharding', None))
    self.path = path

  def fail(self, *_, **__):
    raise NotRestoredError(
      f"'{self.path}' {tuple(self.shape)} {self.dtype} was not restored: the checkpoint holds no source for"
      ' it, so the restore kept it as the abstract description it was given. Give it a value first:'
      ' restore into an nnx.State and nnx.update(model, restored) (the model keeps its own value there),'
      ' restore into a state that holds values there (nnx.state(model) of an initialised model), use'
      ' fill_nnx_only= for RNG state, or assign it; orbax_linen_nnx.not_restored(tree) lists every such'
      ' leaf.'
    )

  __jax_array__ = __array__ = __getitem__ = __iter__ = __len__ = __bool__ = __float__ = __int__ = fail
  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = fail
  __truediv__ = __rtruediv__ = __neg__ = __pow__ = astype = reshape = fail

  def __repr__(self):
    return f'NotRestored({self.path!r}, shape={tuple(self.shape)}, dtype={self.dtype})'

  # ShapeDtypeStruct's equality and hash ignore the path; two placeholders are
  # the same only for the same leaf.
  def __eq__(self, other):
    return isinstance(other, NotRestored) and other.path == self.path and super().__eq__(other)

  def __hash__(self):
    return hash((self.path, super().__hash__()))


_internals.refuse_as_jax_value(NotRestored, NotRestored.fail)


def not_restored(tree: Any) -> list[str]:
  """Paths of the leaves of a restored tree that hold no value (`NotRestored`)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: _is_variable(x) or isinstance(x, NotRestored))
  out = []
  for _, leaf in flat:
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
    sharding = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec, *(None,) * extra), memory_kind=sharding.memory_kind
    )
  elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    raise TypeError(f'a PRNG key sharded by {type(sharding).__name__} cannot be restored; use a NamedSharding')
  impl = _internals.key_impl_name(value.dtype)  # the name Orbax records
  return tuple(data.shape), np.dtype(data.dtype), sharding, impl


@dataclasses.dataclass
class AbstractState:
  """A flattened abstract state, ready to be planned and rebuilt."""

  layout: str
  _slots: list[Target | None]  # per leaf of the flattened state: its target (None: holds no array)
  _leaves: list[Any]
  _rebuild: Callable[[list[Any]], Any]
  problems: list[str] = dataclasses.field(default_factory=list)  # shardings that do not fit, see flatten
  notes: list[str] = dataclasses.field(default_factory=list)  # shardings chosen for leaves that gave none
  large_replicated: list[str] = dataclasses.field(default_factory=list)  # the notes on large leaves among them
  # An nnx.State leaves out what the restore did not fill (nnx.update keeps the
  # model's value there); other trees hold a NotRestored placeholder.
  leaves_out_unfilled: bool = False
  # An nnx.Module target's modules: {path: (attribute position, class name)}, for the pairing an error proposes.
  modules: dict[Path, tuple[int | None, str]] = dataclasses.field(default_factory=dict)
  placeholders: list[str] = dataclasses.field(default_factory=list)  # NotRestored leaves of the last rebuild
  left_out: list[str] = dataclasses.field(default_factory=list)  # leaves the last rebuild left out

  @property
  def targets(self) -> list[Target]:
    return [t for t in self._slots if t is not None]

  def arrays(self) -> list[tuple[Target, Any]]:
    """Each leaf that describes an array, with its target: (target, the leaf as given, Variable or not)."""
    return [(t, leaf) for t, leaf in zip(self._slots, self._leaves) if t is not None]

  def fill(self, values: Mapping[Path, Any]) -> Any:
    """The abstract state with `values[path]` as they are at every leaf (a save's tree: all are given)."""
    return self._rebuild(
      [
        leaf if t is None else (leaf.copy(values[t.path]) if _is_variable(leaf) else values[t.path])
        for t, leaf in zip(self._slots, self._leaves)
      ]
    )

  def rebuild(self, values: Mapping[Path, Any]) -> Any:
    """The abstract state with `values[path]` put in at each restored leaf.

    A leaf kept as given that holds only a description is left out of an
    `nnx.State` (listed in `left_out`) and becomes `NotRestored` elsewhere
    (listed in `placeholders`).
    """
    new, self.placeholders, self.left_out = [], [], []
    for t, leaf in zip(self._slots, self._leaves):
      if t is None:
        new.append(leaf)
      elif t.path not in values:  # kept as given: a description of an array is no value
        value = leaf.get_raw_value() if _is_variable(leaf) else leaf
        if isinstance(value, jax.ShapeDtypeStruct) and not isinstance(value, NotRestored):
          value = NotRestored(layout.render(t.path), value)
          (self.left_out if self.leaves_out_unfilled else self.placeholders).append(value.path)
          if _is_variable(leaf):
            leaf = leaf.copy()  # a copy holding the placeholder, not the description
            leaf.set_raw_value(value)
          else:
            leaf = value
        new.append(leaf)
      else:
        value = values[t.path]
        if t.key_impl is not None:
          value = jax.random.wrap_key_data(value, impl=t.key_impl)
        new.append(leaf.copy(value) if _is_variable(leaf) else value)
    rebuilt = self._rebuild(new)
    restored = lambda _, v: not isinstance(v.get_raw_value() if _is_variable(v) else v, NotRestored)
    if self.left_out:
      rebuilt = nnx.filter_state(rebuilt, restored)
    elif self.placeholders and not isinstance(rebuilt, nnx.Module):
      # An nnx.State inside another tree ({'model': nnx.state(model), 'optimizer': ...}) leaves them out
      # too: nnx.update(model, restored['model']) then keeps the model's own values there.
      rebuilt = jax.tree.map(
        lambda x: nnx.filter_state(x, restored) if isinstance(x, nnx.State) else x,
        rebuilt,
        is_leaf=lambda x: isinstance(x, nnx.State),
      )
      still = set(not_restored(rebuilt))
      self.left_out = [p for p in self.placeholders if p not in still]
      self.placeholders = [p for p in self.placeholders if p in still]
    return rebuilt


def _context_mesh() -> jax.sharding.Mesh | None:
  """The concrete mesh of `with jax.set_mesh(mesh):` / `jax.sharding.use_mesh`, if any."""
  mesh = jax.sharding.get_mesh()
  return mesh if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty else None


def _fits(mesh: jax.sharding.Mesh | None, abstract_mesh) -> bool:
  return (
    mesh is not None
    and tuple(mesh.axis_names) == tuple(abstract_mesh.axis_names)
    and tuple(mesh.axis_sizes) == tuple(abstract_mesh.axis_sizes)
  )


def _abstract(sharding) -> bool:
  return isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh)


def _device_count(sharding) -> int:
  return sharding.mesh.size if _abstract(sharding) else len(sharding.device_set)


class _Shardings:
  """Makes every target's sharding concrete and checks it, collecting problems (nothing raised)."""

  def __init__(self, mesh: jax.sharding.Mesh | None, keep_abstract: bool = False):
    self.mesh = mesh if mesh is not None else _context_mesh()
    self.keep_abstract = keep_abstract  # a plan of a simulated run: devices that need not exist
    self.unmeshed: dict[str, list[str]] = collections.defaultdict(list)  # abstract mesh -> leaf paths
    self.problems: list[str] = []
    self._world: set | None = None

  def resolve(self, path: Path, value) -> Any:
    """The concrete sharding of a leaf; None where it gives none (see `for_unsharded`), or cannot be made."""
    sharding = getattr(value, 'sharding', None)
    if sharding is None:
      return None
    if isinstance(sharding, jax.sharding.PartitionSpec):
      if self.mesh is None:
        self.unmeshed['a PartitionSpec with no mesh'].append(layout.render(path))
        return None
      sharding = jax.sharding.NamedSharding(self.mesh, sharding)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
      if self.keep_abstract and not _fits(self.mesh, sharding.mesh):
        self._check(path, tuple(value.shape), sharding)
        return sharding
      if not _fits(self.mesh, sharding.mesh):
        axes = ', '.join(f'{a}={n}' for a, n in zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
        self.unmeshed[f'an AbstractMesh ({axes})'].append(layout.render(path))
        return None
      sharding = jax.sharding.NamedSharding(
        self.mesh,  # type: ignore[arg-type]  # _fits: a mesh
        sharding.spec,
        memory_kind=sharding.memory_kind,
      )
    self._check(path, tuple(value.shape), sharding)
    return sharding

  def _check(self, path: Path, shape: tuple[int, ...], sharding) -> None:
    where = f"target '{layout.render(path)}' {shape}"
    if self._world is None:
      self._world = set(jax.devices())
    world = self._world
    outside = [] if _abstract(sharding) else sorted(d.id for d in sharding.device_set if d not in world)
    if outside:
      self.problems.append(
        f'{where}: its sharding uses devices {outside}, which are not among this run\'s'
        ' devices (jax.devices()); build the mesh from jax.devices()'
      )
    if not isinstance(sharding, jax.sharding.NamedSharding):
      return
    spec, mesh = tuple(sharding.spec), sharding.mesh
    if len(spec) > len(shape):
      self.problems.append(
        f'{where}: its PartitionSpec {sharding.spec} has {len(spec)} entries for'
        f' {len(shape)} dimensions; drop the extra entries'
      )
      return
    seen: collections.Counter = collections.Counter()
    for d, entry in enumerate(spec):
      names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
      seen.update(names)
      unknown = [a for a in names if a not in mesh.axis_names]
      if unknown:
        self.problems.append(
          f'{where}: its PartitionSpec {sharding.spec} names mesh axis {unknown[0]!r},'
          f' which the mesh does not have (axes: {", ".join(map(repr, mesh.axis_names))})'
        )
        continue
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if shape[d] % size:
        self.problems.append(
          f'{where}: dimension {d} ({shape[d]}) is not divisible by mesh axes {names} (size {size})'
          f' of its PartitionSpec {sharding.spec}; shard that dimension along axes whose size divides'
          f' {shape[d]}, or leave it unsharded (None)'
        )
    twice = [a for a, n in seen.items() if n > 1]
    if twice:
      self.problems.append(
        f'{where}: its PartitionSpec {sharding.spec} uses mesh axis {twice[0]!r} for more'
        ' than one dimension; each mesh axis may shard one dimension'
      )

  def for_unsharded(
    self, given: list[Any], unsharded: list[tuple[Path, int]], notes: list[str], large: list[str]
  ) -> Any:
    """Where the leaves that ask for no sharding go: replicated on the mesh the other leaves use.

    `given` are the other leaves' shardings, `unsharded` the (path, bytes) of
    those that gave none. One mesh among the others: that mesh, so the
    restored state computes in one `jit`. Else the mesh passed or in context;
    several meshes and neither: a problem naming `mesh=`. No mesh anywhere:
    the devices the others use, else every device (`default_sharding()`).
    Leaves above `UNSHARDED_NOTE_BYTES` on several devices go to `large` too:
    each device holds all of them.
    """
    meshes = list(dict.fromkeys(s.mesh for s in given if isinstance(s, jax.sharding.NamedSharding)))
    mesh = meshes[0] if len(meshes) == 1 else self.mesh
    if mesh is not None:
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    elif meshes:
      shown = '; '.join(', '.join(f'{a}={n}' for a, n in m.shape.items()) for m in meshes)
      self.problems.append(
        f'{len(unsharded)} target(s) give no sharding ({", ".join(repr(layout.render(p)) for p, _ in unsharded[:5])}'
        f'{" ..." if len(unsharded) > 5 else ""}) and the others use {len(meshes)} meshes ({shown}): say which'
        ' one they are replicated on with LinenCompatRestore(..., mesh=mesh), or give them shardings'
      )
      return default_sharding()
    else:
      devices = {frozenset(s.device_set) for s in given}
      sharding = given[0] if given and len(devices) == 1 and len(given[0].device_set) == 1 else default_sharding()  # type: ignore[assignment]
    where = (
      f"mesh ({', '.join(f'{a}={n}' for a, n in sharding.mesh.shape.items())})"
      if isinstance(sharding, jax.sharding.NamedSharding)
      else f'{_device_count(sharding)} device(s)'
    )
    if given:  # beside sharded leaves: say where these went
      notes.append(
        f'{len(unsharded)} target(s) give no sharding: replicated on the {where} the others use'
        if meshes
        else f'{len(unsharded)} target(s) give no sharding: replicated on the {where}'
      )
    n = _device_count(sharding)
    for path, nbytes in unsharded:
      if n > 1 and nbytes > UNSHARDED_NOTE_BYTES:
        large.append(
          f"'{layout.render(path)}' ({_mib(nbytes)}) gives no sharding: replicated, every one of the"
          f' {n} devices holds all of it ({_mib(nbytes * n)} in all); give it a sharding to split it'
        )
    notes += large
    return sharding

  def finish(self) -> list[str]:
    for what, paths in self.unmeshed.items():
      self.problems.insert(
        0,
        (
          f'{len(paths)} target(s) are sharded over {what}, and no concrete mesh with those axes is'
          f' in context: {", ".join(repr(p) for p in paths)}. Restore inside `with jax.set_mesh(mesh):`'
          ' (the mesh the abstract state was made under), or pass LinenCompatRestore(..., mesh=mesh)'
        ),
      )
    return self.problems


def module_order(module: nnx.Module) -> dict[Path, tuple[int | None, str]]:
  """{path: (position, class name)} of every submodule, in the order the code made its attributes.

  A module's own `__dict__` keeps its attributes in the order `__init__` set
  them; `nnx.split`, `nnx.State` and `nnx.eval_shape` (which merges a
  graphdef) sort them by name, so an abstract module gives its classes only
  (position None).
  """
  out: dict[Path, tuple[int | None, str]] = {}
  concrete = all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(module)))

  def walk(node, at: Path) -> None:
    if isinstance(node, nnx.Module):
      if at:
        out[at] = (len(out) if concrete else None, type(node).__name__)
      items = [(k, v) for k, v in vars(node).items() if not k.startswith('_')]
    elif isinstance(node, (list, tuple)):
      items = [(str(k), v) for k, v in enumerate(node)]
    elif isinstance(node, dict):
      items = list(node.items())
    else:
      return
    for k, v in items:
      walk(v, at + (str(k),))

  walk(module, ())
  return out


def flatten(
  abstract: Any, *, layout_name: str | None = None, mesh: jax.sharding.Mesh | None = None, keep_abstract: bool = False
) -> AbstractState:
  """Reads every leaf of `abstract` as a `Target` (path, shape, dtype, sharding).

  Shardings over an `AbstractMesh` (or bare `PartitionSpec`s) are made concrete
  with `mesh`, else the mesh in context; every sharding is checked against its
  leaf. What does not fit is listed in `AbstractState.problems`, for the plan
  to report with its own; leaves that are no arrays raise `PlanError` at once.
  `keep_abstract`: a plan only, of a simulated run, keeps AbstractMesh
  shardings that no concrete mesh fits as they are.
  """
  if isinstance(abstract, nnx.Module):
    graphdef, state = nnx.split(abstract)
    inner = flatten(state, layout_name=layout_name or layout.NNX, mesh=mesh, keep_abstract=keep_abstract)
    # A module needs every leaf: what the restore does not fill holds a placeholder.
    return AbstractState(
      inner.layout,
      inner._slots,
      inner._leaves,
      lambda leaves: nnx.merge(graphdef, inner._rebuild(leaves)),
      inner.problems,
      inner.notes,
      inner.large_replicated,
      modules=module_order(abstract),
    )
  is_nnx = isinstance(abstract, nnx.State)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_variable)
  found: list[Any] = []  # per leaf: (path, value, sharding) or None (no array)
  leaves: list[Any] = []
  shardings = _Shardings(mesh, keep_abstract)
  not_arrays = []
  for keys, leaf in flat:
    path = layout.key_path(keys)
    value = leaf.get_raw_value() if _is_variable(leaf) else leaf
    if _is_variable(leaf) and not jax.tree.leaves(value):
      # A Variable holding no array (optax's MaskedNode for a masked-out
      # parameter, an empty state): nothing is stored for it, nothing to read.
      found.append(None)
      leaves.append(leaf)
      continue
    if not isinstance(value, (jax.ShapeDtypeStruct, jax.Array)):
      not_arrays.append(f"'{layout.render(path)}' is a {type(value).__name__}")
      continue
    found.append((path, value, shardings.resolve(path, value), getattr(value, 'sharding', None) is None))
    leaves.append(leaf)
  unsharded = [(path, _nbytes(value)) for path, value, _, none in filter(None, found) if none]
  notes: list[str] = []
  large: list[str] = []
  default = (
    shardings.for_unsharded([s for _, _, s, _ in filter(None, found) if s is not None], unsharded, notes, large)
    if unsharded
    else None
  )
  slots: list[Target | None] = []
  for entry, leaf in zip(found, leaves):
    if entry is None:
      slots.append(None)
      continue
    path, value, sharding, none = entry
    sharding = default if none else (sharding or default_sharding())
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
  if not_arrays:
    raise PlanError(
      f'{len(not_arrays)} abstract leaf/leaves are not array descriptions: {"; ".join(not_arrays)}.'
      ' Fix: pass an abstract state whose leaves are jax.ShapeDtypeStruct (nnx.eval_shape /'
      ' jax.eval_shape) or jax.Array; nothing was read.'
    )
  if layout_name is None:
    layout_name = layout.NNX if is_nnx else layout.detect(t.path for t in slots if t is not None)
  return AbstractState(
    layout_name,
    slots,
    leaves,
    treedef.unflatten,  # type: ignore[attr-defined]
    shardings.finish(),
    notes,
    large,
    leaves_out_unfilled=is_nnx,
  )

"""The save side: an NNX state's arrays as the Linen layout's tree, still sharded on their devices.

`to_linen(state)` plans with the same planner as a restore (`trees.build_save`:
the Linen tree as the target, the NNX state as the source, the rules and stack
conversions run backward), then computes every array that a conversion
changes (a layer of a stack, a moved layer axis, a transposed or fused weight,
the int32 step) with one `jax.jit` over the global arrays: each device computes
its own part, no process gathers anything, and arrays that only change their
name are passed through untouched. The result is a plain pytree that any
Orbax save writes (`LinenCompatSave` does, and so does MaxText's own
`PyTreeSave`), each process writing only its own shards.

    items = to_linen(nnx.state(train_state))
    mngr.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(items)))
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import future

from orbax_linen_nnx.engine import _internals
from orbax_linen_nnx.planning import cost as cost_lib
from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import options as options_lib
from orbax_linen_nnx.planning import plans as plan_lib
from orbax_linen_nnx.planning import trees
from orbax_linen_nnx.engine import write
from orbax_linen_nnx.planning import rules as rules_lib
from orbax_linen_nnx.planning import stacks as stacks_lib
from orbax_linen_nnx.engine import target as target_lib

Path = layout.Path

# How each op is computed on device arrays (read.py realises the same ops as
# TensorStore views, and each op computes itself on the host with `apply`).
ON_DEVICE = {
  ops.Stack: lambda op, v: jnp.stack(v, axis=op.axis),
  ops.Concat: lambda op, v: jnp.concatenate(v, axis=op.axis),
  ops.Slice: lambda op, v: jax.lax.slice_in_dim(v[0], op.start, op.stop, axis=op.axis),
  ops.Take: lambda op, v: jax.lax.index_in_dim(v[0], op.index, axis=op.axis, keepdims=False),
  ops.Transpose: lambda op, v: jnp.transpose(v[0], op.perm),
  ops.MoveAxis: lambda op, v: jnp.moveaxis(v[0], op.source, op.destination),
  ops.Cast: lambda op, v: v[0].astype(op.dtype),
  ops.Reshape: lambda op, v: jnp.reshape(v[0], op.target_shape),
}


# What `ConvertedHandler` has in flight at once: TensorStore's copies of the
# moved pieces it is writing, on top of the arrays themselves.
SAVE_IN_FLIGHT_BYTES = 64 * 2**20


@dataclasses.dataclass(eq=False)
class Converted(plan_lib.Sized):
  """A Linen array a plan's ops make from NNX arrays, written by `ConvertedHandler` from their shards.

  No converted copy of it exists on any device: each process copies its NNX
  shards to the host (as Orbax's own save does for every array) and writes
  each one, moved as the ops say (a view: transposed, one layer, a slice),
  into its box of the Linen array, stored in chunks of those boxes.
  """

  read: plan_lib.LeafRead
  expr: Any
  sources: dict[str, jax.Array]  # the NNX arrays it reads, by plan name
  shape: tuple[int, ...]
  dtype: np.dtype
  sharding: Any  # what Orbax records for it: the sources' sharding, moved with the layout
  chunk: tuple[int, ...]  # the box one NNX shard fills


def _spec_of(expr, shardings: Mapping[str, Any]) -> list | None:
  """The PartitionSpec entries of an expression's output, moved from its sources' by each op's own rule
  (`ops.Op.spec`; None: none to move)."""
  op = getattr(expr, 'op', None)
  if op is None:
    sharding = shardings[expr.name]
    if not isinstance(sharding, jax.sharding.NamedSharding):
      return None
    return list(sharding.spec) + [None] * (len(expr.shape) - len(sharding.spec))
  specs = [_spec_of(a, shardings) for a in expr.args]
  if any(s is None for s in specs):
    return None
  return op.spec(specs)


def carried(read: plan_lib.LeafRead, values: Mapping[str, Any]) -> Converted | None:
  """`read` as a `Converted` leaf, where its ops move boxes and its NNX shards tile it on a regular grid.

  None where it cannot be (a reshape, typed PRNG keys, host arrays): those are
  computed on their devices instead.
  """
  t, expr = read.target, read.expression()
  arrays = {x.name: values[x.name] for x in ops.stored_leaves(expr)}
  if t.key_impl or not write.moves_boxes(expr) or not all(isinstance(a, jax.Array) for a in arrays.values()):
    return None
  images = []  # every shard's box in the Linen array, over all processes (the chunk grid is one for all)
  for n, a in arrays.items():
    boxes = {
      tuple(s.indices(d)[:2] for s, d in zip(index, a.shape))
      for index in a.sharding.devices_indices_map(a.shape).values()
    }
    images += [b for box in boxes for b in ops.images(expr, n, box)]
  step = write.steps(images, t.shape)
  if step is None:
    return None
  first = next(iter(arrays.values())).sharding
  entries = _spec_of(expr, {n: a.sharding for n, a in arrays.items()})
  sharding = (
    jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec(*entries)) if entries is not None else first
  )
  return Converted(read, expr, arrays, tuple(t.shape), np.dtype(t.dtype), sharding, step)


class ConvertedHandler(ocp.type_handlers.TypeHandler):
  """Writes `Converted` leaves from their NNX shards, and every other jax.Array through Orbax's ArrayHandler.

  On disk they are all jax.Arrays, read back as such. The one handler takes
  both because each process keeps one array-metadata file that every write
  appends to: the Converted records are appended after ArrayHandler's own
  (two appends at once lose one). Like Orbax's ArrayHandler, `serialize`
  brings every shard it writes to the host before it returns (training may
  change the arrays right after), and the writes run in the commit future,
  all in flight at once.
  """

  def __init__(self, array_handler):
    self._array = array_handler
    _internals.share_array_metadata_store(self, array_handler)  # as the PyTree handler expects of arrays' handler

  def typestr(self) -> str:
    return self._array.typestr()

  async def metadata(self, infos):
    return await self._array.metadata(infos)

  async def deserialize(self, infos, args=None):
    return await self._array.deserialize(infos, args)

  async def serialize(self, values, infos, args=None):
    args = list(args or [ocp.type_handlers.SaveArgs()] * len(values))
    mine = [i for i, v in enumerate(values) if isinstance(v, Converted)]
    plain = [i for i, v in enumerate(values) if not isinstance(v, Converted)]
    futures = (
      list(
        await self._array.serialize([values[i] for i in plain], [infos[i] for i in plain], [args[i] for i in plain])
        or []
      )
      if plain
      else []
    )
    if not mine:
      return futures
    values, infos, args = [values[i] for i in mine], [infos[i] for i in mine], [args[i] for i in mine]
    shards: dict[str, list] = {}  # NNX array -> this process's shards to write: (box, device data)
    for v in values:
      for n, a in v.sources.items():
        if n not in shards:
          shards[n] = [
            (tuple(s.indices(d)[:2] for s, d in zip(shard.index, a.shape)), shard.data)
            for shard in a.addressable_shards
            if shard.replica_id == 0
          ]
    # To the host as Orbax's ArrayHandler brings every array: all copies started, then each
    # awaited by np.asarray (a copy on an accelerator; on CPU the buffer itself, as Orbax has it).
    for boxes in shards.values():
      for _, data in boxes:
        data.copy_to_host_async()
    host = {n: [(box, np.asarray(data)) for box, data in boxes] for n, boxes in shards.items()}
    del shards
    pieces = [
      [(box, data) for n in v.sources for b, d in host[n] for box, data in ops.carried(v.expr, n, b, d)] for v in values
    ]
    del host
    specs = [
      write.write_spec(info, arg, v.shape, v.chunk, arg.dtype or v.dtype) for v, info, arg in zip(values, infos, args)
    ]
    before = list(futures)

    async def commit():
      arrays = await write.open_arrays(specs, infos)
      await write.write_within(
        [
          (dest[tuple(slice(lo, hi) for lo, hi in box)], data if arg.dtype is None else data.astype(arg.dtype))
          for dest, boxes, arg in zip(arrays, pieces, args)
          for box, data in boxes
        ],
        SAVE_IN_FLIGHT_BYTES,
      )
      pieces.clear()
      for f in before:  # ArrayHandler's records first: both append to this process's one file
        await asyncio.to_thread(f.result)
      await write.record_arrays(specs, [v.sharding for v in values], infos, self._array)

    return futures + [future.CommitFutureAwaitingContractedSignals(commit(), name='orbax_linen_nnx_write_converted')]


def _evaluate(expr, arrays: Mapping[str, jax.Array]) -> jax.Array:
  op = getattr(expr, 'op', None)
  if op is None:
    return arrays[expr.name]
  return ON_DEVICE[type(op)](op, [_evaluate(a, arrays) for a in expr.args])


@functools.lru_cache(maxsize=8)
def _converter(exprs: tuple) -> Any:
  """One jitted function computing every converted leaf (cached per plan: a run saves alike each time)."""
  return jax.jit(lambda arrays: [_evaluate(e, arrays) for e in exprs])


class _NnxState:
  """The NNX state being saved: its leaves as plan sources, their values, its optimizers' empty states."""

  def __init__(self, state: Any):
    self.empties: list[Path] = []  # opt_state positions of empty optax states (Linen saves None there)
    if not isinstance(state, nnx.State) and _holds_modules(state):
      self.empties = _empty_states(state)
      state = nnx.state(state)
    flat = target_lib.flatten(state, layout_name=layout.NNX)
    fields = _train_state_fields({t.path[0] for t in flat.targets if t.path})
    # A port's train state holds its params in `params` itself (TrainState.create(params=variables['params'])).
    self.collection_level = False if fields else None
    if fields:  # a port's own train state: read as {'model': ..., 'optimizer': ...}, as a restore reads it
      opt_state = state.get('opt_state') if isinstance(state, Mapping) else getattr(state, 'opt_state', None)
      self.empties = [fields['opt_state'] + p for p in _empties(opt_state)] if opt_state is not None else []
    self.sources, self.types, self.values = [], {}, {}
    for t, leaf in flat.arrays():
      if fields:
        t = dataclasses.replace(t, path=fields[t.path[0]] + t.path[1:])
      name = layout.render(t.path)
      self.sources.append(plan_lib.SourceArray(t.path, name, t.shape, np.dtype(t.dtype), key_impl=t.key_impl))
      self.types[t.path] = _kind_of(leaf)
      self.values[name] = leaf.get_raw_value() if isinstance(leaf, nnx.Variable) else leaf

  def require_values(self) -> None:
    """Raises unless every leaf holds an array (a save needs values, its plan only shapes)."""
    abstract = [n for n, v in self.values.items() if not isinstance(v, (jax.Array, np.ndarray))]
    if abstract:
      raise ValueError(
        f'LinenCompatSave needs the state\'s arrays, but {len(abstract)} leaves hold none (abstract'
        f' descriptions): {", ".join(abstract[:8])}{" ..." if len(abstract) > 8 else ""}. Save the'
        ' state of a real model (nnx.state(model)); to_linen(..., dry_run=True) plans an abstract one.'
      )


# The fields of a Linen-style train state (`flax.training.train_state.TrainState`, a port's own
# `struct.dataclass`) holding NNX state, and where an NNX train state keeps each.
_TRAIN_STATE_FIELDS = {
  'params': ('model',),
  'batch_stats': ('model',),
  'opt_state': ('optimizer', 'opt_state'),
  'step': ('optimizer', 'step'),
}


def _train_state_fields(top: set[str]) -> dict[str, Path]:
  """`_TRAIN_STATE_FIELDS` where a state's top-level names are a train state's (params beside opt_state or
  step, nothing else), else {}."""
  if 'params' in top and top & {'opt_state', 'step'} and top <= set(_TRAIN_STATE_FIELDS):
    return _TRAIN_STATE_FIELDS
  return {}


def _kind_of(leaf: Any) -> str | None:
  """The Variable type that decides where a leaf goes: subclasses count as their base (nnx.LoRAParam is a Param)."""
  if not isinstance(leaf, nnx.Variable):
    return None
  for base in (nnx.Param, nnx.BatchStat, nnx.Cache, nnx.Intermediate):
    if isinstance(leaf, base):
      return base.__name__
  return type(leaf).__name__


def _holds_modules(obj: Any) -> bool:
  """Whether `obj` is an NNX module or a pytree holding some (else: a state or a plain tree of arrays)."""
  is_module = lambda x: isinstance(x, nnx.Module)
  return any(is_module(x) for x in jax.tree.leaves(obj, is_leaf=is_module))


def _empty_states(obj: Any) -> list[Path]:
  """Paths, under each `nnx.Optimizer`'s `opt_state`, of optax states that hold no array.

  Linen's TrainState saves them as None entries (`opt_state/1` for adam's
  EmptyState); `nnx.state` drops them, so they are read from the optimizer
  itself. Only positions above the subtrees that mirror the params are taken.
  """
  out = []
  for path, node in nnx.iter_graph(obj):
    if isinstance(node, nnx.Optimizer):
      out += [tuple(str(p) for p in path) + ('opt_state',) + p for p in _empties(node.opt_state)]
  return out


def _empties(tree: Any, at: Path = ()) -> list[Path]:
  if isinstance(tree, (nnx.Variable, nnx.State)):
    return []
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    items: Iterable[tuple[Any, Any]] = zip(tree._fields, tree)
  elif isinstance(tree, (tuple, list)):
    items = enumerate(tree)
  elif isinstance(tree, Mapping):
    items = tree.items()
  else:
    return []
  if not jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    return [at]
  return [p for k, v in items for p in _empties(v, at + (str(k),))]


def _planned(state, options: options_lib.SaveOptions, plan=None):
  """(the NNX state's leaves, the Linen tree to write exactly or None, the save's plan)."""
  nnx_state = _NnxState(state)
  target = options.target
  written = None if target is None else target_lib.flatten(target, layout_name=layout.LINEN)
  if plan is None:
    plan = trees.build_save(
      nnx_state.sources,
      nnx_state.types,
      rules=options.rules,
      stacks=options.stacks,
      aux=options.aux,
      targets=None if written is None else written.targets,
      collection_level=nnx_state.collection_level,
    )
  return nnx_state, written, plan


def plan_save(state: Any, options: options_lib.SaveOptions = options_lib.SAVE_DEFAULTS) -> plan_lib.RestorePlan:
  """The plan of saving `state` in the Linen layout; raises unless `state` holds arrays (see `to_linen`)."""
  nnx_state, _, plan = _planned(state, options)
  nnx_state.require_values()
  return dataclasses.replace(plan, cost=save_cost(plan, nnx_state.values))


def nnx_values(state: Any) -> dict[str, Any]:
  """The arrays (or abstract leaves) of an NNX state by the names its save plan gives them."""
  return _NnxState(state).values


def save_cost(plan: plan_lib.RestorePlan, values: Mapping[str, Any], topology: Any = None) -> plan_lib.Cost:
  """What each process writes of the save `plan` and what its devices hold of conversions (`cost.save_estimate`)."""
  shardings = {
    n: getattr(v, 'sharding', None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for n, v in values.items()
  }  # host arrays: written by this process
  on_device = {
    r.target.path
    for r in plan.reads
    if (r.transform or isinstance(r.sources[0], ops.Derived))
    and (r.target.key_impl or not write.moves_boxes(r.expression()) or r.target.path[:1] == (layout.NNX_AUX,))
  }
  return cost_lib.save_estimate(plan, shardings, on_device, topology=topology)


def linen_trees(
  state: Any,
  options: options_lib.SaveOptions = options_lib.SAVE_DEFAULTS,
  *,
  dry_run: bool = False,
  plan: plan_lib.RestorePlan | None = None,
  carry: bool = False,
) -> Any:
  """(the Linen tree, the NNX-only state written beside it or None): what `LinenCompatSave` writes.

  See `to_linen`; with `aux='sidecar'` the `nnx_aux` subtree (RNG streams,
  custom Variables) is returned apart, for a PyTree of its own beside the
  Linen tree, where Linen readers never see it. With `carry`, every Linen
  array the ops can write from the NNX shards as they are is a `Converted`
  leaf (for `ConvertedHandler`: no converted copy on any device); the others
  are computed on their devices.
  """
  nnx_state, written, plan = _planned(state, options, plan)
  aux = options.aux
  if dry_run:
    return plan
  nnx_state.require_values()
  lost = [s.name for s in plan.skipped if trees.nnx_only_type(nnx_state.types.get(s.path))]
  if lost:
    plan_lib.warn(
      f'{len(lost)} NNX-only arrays are not saved (aux=None): {", ".join(lost)}; a restore of this'
      " checkpoint starts them afresh. aux='sidecar' keeps them beside the Linen tree."
    )
  values, converted = {}, []
  for r in plan.reads:
    if r.transform or isinstance(r.sources[0], ops.Derived):
      leaf = carried(r, nnx_state.values) if carry and r.target.path[:1] != (layout.NNX_AUX,) else None
      if leaf is not None:
        values[r.target.path] = leaf
      else:
        converted.append(r)
    else:  # the array itself, under its Linen name
      values[r.target.path] = nnx_state.values[r.sources[0].name]
  if converted:
    exprs = tuple(r.expression() for r in converted)
    names = {x.name for e in exprs for x in ops.stored_leaves(e)}
    inputs = {
      n: (jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
      for n in names
      for v in (nnx_state.values[n],)
    }
    for r, array in zip(converted, _converter(exprs)(inputs)):
      values[r.target.path] = jax.random.wrap_key_data(array, impl=r.target.key_impl) if r.target.key_impl else array
  if written is not None:  # exactly the caller's tree (its type, lists, None entries); the rest beside it
    own = {t.path for t in written.targets}
    aside: dict = {}
    for path, value in values.items():
      if path not in own:
        trees.put(aside, path, value)
    return written.fill(values), aside.get(layout.NNX_AUX)
  tree: dict = {}
  for path, value in values.items():
    trees.put(tree, path, value)
  for p in nnx_state.empties:  # optax states holding no array: None entries, as Linen saves them
    if p[:2] == ('optimizer', 'opt_state'):
      trees.put(tree, p[1:], None)
  tree = trees.as_linen_lists(tree)
  return tree, (tree.pop(layout.NNX_AUX, None) if aux == layout.SIDECAR else None)


def to_linen(
  state: Any,
  *,
  rules: rules_lib.Rules = None,
  stacks: stacks_lib.StackAxes | None = None,
  aux: str | None = layout.NNX_AUX,
  target: Any = None,
  dry_run: bool = False,
  plan: plan_lib.RestorePlan | None = None,
) -> Any:
  """An NNX train state's arrays as the pytree a Linen run of the same model saves.

  `state` is an `nnx.State`, a module, a dict of modules
  (`{'model': model, 'optimizer': nnx.Optimizer(...)}`), or the tree of arrays
  an NNX checkpoint restores to as saved (`.../value` leaves); a module or dict also
  tells which optax states are empty, which Linen saves as None entries
  (adam's `opt_state/1`); from an `nnx.State` the chain list ends at its last
  non-empty state, as MaxText writes it. The options are `LinenCompatSave`'s,
  but one tree is returned, so NNX-only state is in it (`aux='nnx_aux'`,
  MaxText's layout, the default here) or left out (`aux=None`); with
  `dry_run=True` the plan is returned and nothing is computed (an abstract
  state is enough); `plan` is one made so before for this state. The arrays
  keep their devices: converted ones are computed where their shards live, the
  others are the state's own arrays.

      items = to_linen({'model': model, 'optimizer': optimizer}, rules={'Dense_0': 'fc1'})
      mngr.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(items)))
  """
  if aux == layout.SIDECAR:
    raise ValueError(
      "to_linen returns one tree: NNX-only state goes in it (aux='nnx_aux') or nowhere"
      " (aux=None); LinenCompatSave(..., aux='sidecar') writes it beside the Linen tree"
    )
  options = options_lib.SaveOptions(rules=rules, stacks=stacks, aux=aux, target=target)
  out = linen_trees(state, options, dry_run=dry_run, plan=plan)
  return out if dry_run else out[0]

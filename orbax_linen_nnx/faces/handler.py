"""`LinenCompatHandler`: the thin Orbax glue around plan and read."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from orbax_linen_nnx.faces import args as args_lib
from orbax_linen_nnx.planning import cost as cost_lib
from orbax_linen_nnx import layout
from orbax_linen_nnx.engine import outcome
from orbax_linen_nnx.engine import prepare as prepare_lib
from orbax_linen_nnx.planning import plans
from orbax_linen_nnx.engine import read
from orbax_linen_nnx.faces import save as save_lib
from orbax_linen_nnx.engine import source as source_lib
from orbax_linen_nnx.engine import target


@contextlib.contextmanager
def _gc_paused():
  """Python's cyclic garbage collector off while a restore plans and reads.

  Planning makes objects per array and per slice; with JAX's heap alive, each
  collection those allocations trigger walks every tracked object (opening
  1,736 arrays measured 0.27 s with the collector, 0.16 s without). Nothing a
  restore makes needs the collector: reference counting frees it.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def plan(
  directory: epath.PathLike,
  abstract_state: Any,
  *,
  processes: int | None = None,
  device_process: Sequence[int] | None = None,
  **options,
) -> plans.RestorePlan:
  """The `RestorePlan` of restoring `abstract_state` from a checkpoint; reads no array.

  `directory` is the item directory (`<run>/<step>/default`), a step directory
  of a single-item checkpoint, or a run directory (its latest finished step).
  `options` are those of `LinenCompatRestore`. The plan's `cost` tells what
  every process will read, decode, place and hold. `processes=N` simulates a
  run of N processes (the target's shardings may be over a
  `jax.sharding.AbstractMesh` of devices that do not exist here): the mesh's
  devices, row-major, split into N equal consecutive runs, or as
  `device_process` (a process index per mesh position, row-major) says.

  >>> print(plan(run_dir / '100' / 'default', abstract, rules={'Dense_0': 'fc1'}))  # doctest: +SKIP
  >>> plan(run_dir, abstract_over_pod_mesh, processes=64).cost.summary()  # doctest: +SKIP
  """
  topology = cost_lib.Topology(processes, device_process) if processes or device_process is not None else None
  args = args_lib.LinenCompatRestore(abstract_state, **options)
  with _gc_paused():
    prepared = prepare_lib.prepare(directory, args.abstract_state, args.options, topology=topology)
  prepare_lib.check_cost(args.options, prepared)
  return prepared.plan


def restore(source: Any, abstract_state: Any, *, step: int | None = None, item: str | None = None, **options) -> Any:
  """Restores `abstract_state` from a checkpoint a manager cannot route `LinenCompatRestore` to.

  `source` is either
  - a `CheckpointManager` built with `item_handlers` for its items (MaxText's:
    `item_names=('items',)`, `item_handlers={'items': PyTreeCheckpointHandler(...)}`),
    which accepts no other handler for them: the step (default: the latest)
    and `item` are read here instead, through the same handler; or
  - a directory: a bare checkpoint item as published (upstream Gemma), a step
    directory, or a run directory (its `step`, by default the latest finished).
  `item` picks the item when a step holds several PyTree items (MaxText's
  `items` beside its data iterator's `iter` needs none: only one is a
  PyTree). `options` are those of `LinenCompatRestore`.

  >>> restored = restore(mngr, abstract, step=100, item='items')  # doctest: +SKIP
  >>> params = restore('/ckpts/gemma3-4b', abstract_model, rules=gemma_rules)  # doctest: +SKIP
  """
  if isinstance(source, ocp.CheckpointManager):
    if step is None:
      step = source.latest_step()
      if step is None:
        raise source_lib.CheckpointNotFoundError(f'{source.directory} holds no finished checkpoint step')
    source = source.directory
  directory = source_lib.locate(source, step=step, item=item)
  with ocp.Checkpointer(LinenCompatHandler()) as checkpointer:
    return checkpointer.restore(directory, args=args_lib.LinenCompatRestore(abstract_state, **options))


def _warn_unfilled(state: target.AbstractState) -> None:
  """Warns of the leaves the restore did not fill, and of large leaves replicated for want of a sharding."""
  # RNG streams a Linen checkpoint never holds are left to the model as documented (the plan lists them as
  # kept): no warning for what every resume of a model with Dropout does. Anything else left out is a surprise.
  surprising = [p for p in state.left_out if not layout.is_rng_path(p.split('/'))]
  if surprising:
    plans.warn(
      f'{len(surprising)} leaves have no source in the checkpoint and are left out of the'
      f' restored nnx.State: {", ".join(surprising)}. nnx.update(model, restored) keeps the model\'s own'
      ' values there; the plan lists them as kept.'
    )
  if state.placeholders:
    plans.warn(
      f'{len(state.placeholders)} leaves were not restored (no source; the abstract state gave'
      f' no value) and hold NotRestored placeholders that raise when used as arrays: {", ".join(state.placeholders)}.'
      ' Restore into an nnx.State (then nnx.update(model, restored) keeps the model\'s values there) or into a'
      ' state with values there (nnx.state(model) of an initialised model), or fill them before use.'
    )
  if state.large_replicated:
    plans.warn('; '.join(state.large_replicated))


class SavedAsStandard:
  """`typestr`: the class's own name for Orbax's handler registry, Standard's for what a save records.

  Orbax records `handler.typestr()` of an instance in the step's metadata as
  the handler that reads the item back when no args are given. A save writes
  exactly what `StandardCheckpointHandler` writes, so the record names that
  handler: Linen tooling restores the item with no args, and without this
  package installed. The class itself keeps its own unique name, under which
  `register_with_handler` files it.
  """

  def __get__(self, obj, cls):
    if obj is None:
      return lambda: f'{cls.__module__}.{cls.__qualname__}'
    return ocp.StandardCheckpointHandler.typestr


@dataclasses.dataclass(frozen=True)
class _Refused:
  """A commit future that raises the save's refusal (for `wait_until_finished` to surface)."""

  error: Exception

  def result(self, timeout: float | None = None) -> None:
    raise self.error


class LinenCompatHandler(ocp.AsyncCheckpointHandler):
  """Restores a PyTree checkpoint saved in one layout into a state of the other; saves NNX as Linen.

  Registered with `LinenCompatRestore` and `LinenCompatSave`, so
  `CheckpointManager.restore(step, args=LinenCompatRestore(...))` and
  `CheckpointManager.save(step, args=LinenCompatSave(state))` need no setup.
  A save converts the state on its devices (`save.to_linen`) and hands the
  Linen tree to Orbax's `StandardCheckpointHandler`: Orbax's serialisation,
  async save and atomic commit, each process writing its own shards. The
  checkpoint it writes is a standard one and names that handler, so Linen code
  restores it without this package.
  """

  def __init__(self):
    self._standard = ocp.StandardCheckpointHandler()  # restores the tree as saved
    # One handler for every array, converted or not (see ConvertedHandler), over Orbax's own ArrayHandler.
    arrays = save_lib.ConvertedHandler(ocp.type_handlers.get_type_handler(jax.Array))
    registry = ocp.type_handlers.create_type_handler_registry(
      *((t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)),
      (jax.Array, arrays),
      (save_lib.Converted, arrays),
    )
    self._writer = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)  # the Linen tree
    self._sidecar = ocp.StandardCheckpointHandler()  # NNX-only state, in the item's nnx_aux/ directory

  typestr = SavedAsStandard()

  def standard_args(self, args, carry: bool = False) -> tuple[ocp.args.PyTreeSave, ocp.args.StandardSave | None]:
    """The saves that `args` (a `LinenCompatSave`) makes: the Linen tree, and the sidecar (or None).

    With `carry`, arrays whose layout changes are `save.Converted` leaves,
    which only this handler's writer writes (from their NNX shards); without,
    they are computed on their devices and any PyTree save writes the tree.
    """
    if not isinstance(args, args_lib.LinenCompatSave):
      raise TypeError(
        f'LinenCompatHandler saves LinenCompatSave(state) args, not {type(args).__name__}:'
        ' LinenCompatRestore only restores. Save with LinenCompatSave(state) (the Linen layout)'
        ' or ocp.args.StandardSave(state) (the state as it is)'
      )
    with _gc_paused():
      tree, sidecar = save_lib.linen_trees(args.state, args.options, plan=args.plan, carry=carry)
    save_args = None if args.save_args is None else jax.tree.map(lambda _: args.save_args, tree)
    main = ocp.args.PyTreeSave(tree, save_args=save_args, custom_metadata=args.custom_metadata)
    return main, (None if sidecar is None else ocp.args.StandardSave(sidecar))

  async def async_save(self, directory: epath.Path, args=None):
    try:
      source_lib.check_storage(directory, saving=True)
    except source_lib.UnsupportedStorageError as e:
      # Raised from the commit, as Orbax's own errors there are: raised now, the directory creation Orbax
      # started before calling this handler would never be awaited, and its thread would hold the
      # process for its signal timeout.
      return [_Refused(e)]
    main, sidecar = self.standard_args(args, carry=True)
    futures = list(await self._writer.async_save(directory, args=main) or [])
    if sidecar is not None:  # a PyTree of its own inside the item, written and committed with it
      futures += await self._sidecar.async_save(directory / source_lib.SIDECAR_DIR, args=sidecar) or []
    return futures

  def save(self, directory: epath.Path, args=None):
    source_lib.check_storage(directory, saving=True)
    main, sidecar = self.standard_args(args, carry=True)
    self._writer.save(directory, args=main)
    if sidecar is not None:
      self._sidecar.save(directory / source_lib.SIDECAR_DIR, args=sidecar)

  def restore(self, directory: epath.Path, args=None) -> Any:
    if args is None or getattr(args, 'abstract_state', None) is None:
      if args is not None and not hasattr(args, 'abstract_state'):
        raise TypeError(f'LinenCompatHandler restores LinenCompatRestore args, not {type(args).__name__}')
      return self._standard.restore(directory)  # no target: the tree as saved, like StandardRestore()
    options = args.options
    with outcome.shared(timeout_s=options.timeout_s), _gc_paused():
      # Its own process's cost, or every process's where strict_cost must fail alike on all.
      topology = cost_lib.Topology(only=None if options.strict_cost else jax.process_index())
      prepared = prepare_lib.prepare(directory, args.abstract_state, options, topology=topology)
      prepare_lib.check_cost(options, prepared)
      restore_plan, state = prepared.plan, prepared.state
      if args.dry_run:
        return restore_plan
      values = read.execute(
        restore_plan, prepared.checkpoint, replica_axis=options.replica_axis, budget_bytes=options.read_budget_bytes
      )
    if options.fill_nnx_only is not None:
      for t in restore_plan.kept:
        if t.nnx_only:
          abstract = jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)
          if t.key_impl is None:
            values[t.path] = options.fill_nnx_only(layout.render(t.path), abstract)
            continue
          keys = jax.eval_shape(lambda d, impl=t.key_impl: jax.random.wrap_key_data(d, impl=impl), abstract)
          keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=target.key_sharding(t.sharding, keys.ndim))
          values[t.path] = jax.random.key_data(options.fill_nnx_only(layout.render(t.path), keys))
    restored = state.rebuild(values)
    _warn_unfilled(state)
    return restored

  def metadata(self, directory: epath.Path) -> Any:
    return ocp.PyTreeCheckpointHandler().metadata(directory)

  def finalize(self, directory: epath.Path) -> None:
    self._writer.finalize(directory)
    if (directory / source_lib.SIDECAR_DIR).exists():
      self._sidecar.finalize(directory / source_lib.SIDECAR_DIR)

  def close(self):
    self._standard.close()
    self._writer.close()
    self._sidecar.close()


# The args name this handler for CheckpointManager's registry: LinenCompatSave as its save args,
# LinenCompatRestore as its restore args. A manager's registry files a handler under the one save and
# one restore args class registered for it (the first of each); registering both classes for both
# made LinenCompatRestore the save args too, so a manager that had saved once refused the next save.
ocp.args.register_with_handler(LinenCompatHandler, for_save=True)(args_lib.LinenCompatSave)
ocp.args.register_with_handler(LinenCompatHandler, for_restore=True)(args_lib.LinenCompatRestore)

"""`LinenCompatHandler`: the thin Orbax glue around plan and read."""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from orbax_linen_nnx import layout
from orbax_linen_nnx import outcome
from orbax_linen_nnx import planner as plan_lib
from orbax_linen_nnx import read
from orbax_linen_nnx import source
from orbax_linen_nnx import target


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


def _prepare(directory: epath.PathLike, args) -> tuple[source.Checkpoint, target.AbstractState, plan_lib.RestorePlan]:
  for name, value in (('source_layout', args.source_layout), ('target_layout', args.target_layout)):
    if value is not None and value not in layout.LAYOUTS:
      raise ValueError(f'{name} must be one of {layout.LAYOUTS} or None, got {value!r}')
  ckpt = source.open_checkpoint(directory)
  state = target.flatten(args.abstract_state, layout_name=args.target_layout)
  restore_plan = plan_lib.build(
      ckpt.arrays,
      state.targets,
      source_layout=args.source_layout or ckpt.layout,
      target_layout=state.layout,
      rules=args.rules,
      partial=args.partial,
      stacks=args.stacks,
      where=str(ckpt.directory),
  )
  return ckpt, state, restore_plan


def plan(directory: epath.PathLike, abstract_state: Any, **options) -> plan_lib.RestorePlan:
  """The `RestorePlan` of restoring `abstract_state` from a checkpoint item; reads no array.

  `directory` is the item directory (`<run>/<step>/default`, or the step
  directory of a single-item checkpoint). `options` are those of
  `LinenCompatRestore`.

  >>> print(plan(run_dir / '100' / 'default', abstract, rules={'Dense_0': 'fc1'}))  # doctest: +SKIP
  """
  from orbax_linen_nnx.args import LinenCompatRestore  # args imports this module

  with _gc_paused():
    return _prepare(directory, LinenCompatRestore(abstract_state, **options))[2]


class LinenCompatHandler(ocp.CheckpointHandler):
  """Restores a PyTree checkpoint saved in one layout into a state of the other.

  Registered with `LinenCompatRestore`, so `CheckpointManager.restore(step,
  args=LinenCompatRestore(...))` needs no setup. Restore-only: it never writes
  to the checkpoint; save with `ocp.args.StandardSave`.
  """

  def save(self, directory: epath.Path, *args, **kwargs):
    raise TypeError(
        'LinenCompatRestore only restores; save with ocp.args.StandardSave(state).'
    )

  def restore(self, directory: epath.Path, args=None) -> Any:
    if args is None:
      raise ValueError('LinenCompatHandler.restore needs args=LinenCompatRestore(abstract_state)')
    with outcome.shared(timeout_s=args.timeout_s), _gc_paused():
      ckpt, state, restore_plan = _prepare(directory, args)
      if args.dry_run:
        return restore_plan
      values = read.execute(restore_plan, ckpt, replica_axis=args.replica_axis,
                            budget_bytes=args.read_budget_bytes)
    if args.fill_nnx_only is not None:
      for t in restore_plan.kept:
        if t.nnx_only:
          abstract = jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)
          values[t.path] = args.fill_nnx_only(layout.render(t.path), abstract)
    return state.rebuild(values)

  def metadata(self, directory: epath.Path) -> Any:
    return ocp.PyTreeCheckpointHandler().metadata(directory)

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self):
    pass

"""`prepare`: the one way every face goes from a checkpoint to a plan.

It opens the checkpoint (`source`), reads the target (an abstract state,
flattened by `target`; another checkpoint's tree; or a layout's tree, from
`trees`), plans with `planner.build` and one options object, and costs the
plan (`cost`). The planner itself opens nothing: this module is where the
plan meets storage.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from orbax_linen_nnx.planning import cost as cost_lib
from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import options as options_lib
from orbax_linen_nnx.engine import source as source_lib
from orbax_linen_nnx.engine import target as target_lib
from orbax_linen_nnx.planning import trees
from orbax_linen_nnx.planning import plans
from orbax_linen_nnx.planning.planner import build
from orbax_linen_nnx.planning.plans import RestorePlan, Target


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A read ready to run: the opened checkpoint, the flattened abstract state (None for a target that is
  another checkpoint's tree or a layout), and the plan."""

  plan: RestorePlan
  checkpoint: Any  # source.Checkpoint
  state: Any  # target.AbstractState, or None


def checkpoint_tree(ckpt: Any) -> list[Target]:
  """A checkpoint's own tree as targets (its paths, shapes and dtypes; no shardings)."""
  return [Target(a.path, tuple(a.shape), np.dtype(a.dtype), None, key_impl=a.key_impl) for a in ckpt.arrays]


def _into_layout(ckpt: Any, to: str, options: Any) -> RestorePlan:
  """The plan of reading `ckpt` as the tree layout `to`'s training state saves, with no model (`options`: a
  `RestoreOptions` or `SaveOptions`, whose `rules` and `stacks` it takes)."""
  if to not in layout.LAYOUTS:
    raise ValueError(f'to must be one of {layout.LAYOUTS}, got {to!r}')
  if ckpt.layout == to:
    raise ValueError(
      f'{ckpt.directory} is already in the {to} layout; to restack or rename it, give the'
      ' tree it should become as a target (a checkpoint, or module:function returning an'
      ' abstract state)'
    )
  if to == layout.NNX:
    return trees.build_nnx(ckpt.arrays, rules=options.rules, stacks=options.stacks, where=str(ckpt.directory))
  # NNX state Linen has no place for (RNG streams) goes under nnx_aux, as MaxText writes it.
  types = {a.path: 'RngState' for a in ckpt.arrays if layout.is_rng_path(a.path)}
  return trees.build_save(
    ckpt.arrays,
    types,
    rules=options.rules,
    stacks=options.stacks,
    action=f'cannot convert {ckpt.directory} to the linen layout',
  )


def prepare(
  checkpoint: Any,
  abstract: Any,
  options: Any = options_lib.DEFAULTS,
  *,
  problems: Sequence[str] = (),
  phases: dict[str, float] | None = None,
  topology: Any = None,
) -> Prepared:
  """Opens `checkpoint` (a path, or an opened `source.Checkpoint`) and plans reading it as `abstract`.

  The one way every face goes from a checkpoint to a plan: `LinenCompatHandler`,
  `orbax_linen_nnx.plan`, `restore`, Orbax v1, the command line (`plan`,
  `convert`, `compare`) and the benchmarks. `abstract` is what to read it as:
  an abstract state (a restore; flattened with `options`), another opened
  `source.Checkpoint` (its tree: `convert --target CKPT`, `compare`), or a
  layout name, 'nnx' or 'linen' (the tree that layout's training state saves:
  `convert --to`; into 'linen' that is a save, whose `options` may be the
  `SaveOptions` it is made with). `options` is a `RestoreOptions` otherwise.
  For an abstract state the options' own problems
  (`RestoreOptions.problems`) are the plan's, and the plan's `cost` is every
  process's (`topology`: a `cost.Topology`, default the devices' own
  processes) for a read with the options' `replica_axis` and
  `read_budget_bytes`; a convert's cost is its write job's
  (`convert.with_cost_note`). `phases`, where given, gets the seconds each
  step took. Raises `PlanError` with every problem; reads no array.
  """
  if isinstance(abstract, str):
    ckpt = checkpoint if isinstance(checkpoint, source_lib.Checkpoint) else source_lib.open_checkpoint(checkpoint)
    return Prepared(_into_layout(ckpt, abstract, options), ckpt, None)
  if not isinstance(options, options_lib.RestoreOptions):
    raise TypeError(f'a read into {type(abstract).__name__} takes RestoreOptions, not {type(options).__name__}')
  source_layout, target_layout = options.source_layout, options.target_layout
  for name, value in (('source_layout', source_layout), ('target_layout', target_layout)):
    if value is not None and value not in layout.LAYOUTS:
      raise ValueError(f'{name} must be one of {layout.LAYOUTS} or None, got {value!r}')
  clock = time.perf_counter()
  ckpt = checkpoint if isinstance(checkpoint, source_lib.Checkpoint) else source_lib.open_checkpoint(checkpoint)
  opened = time.perf_counter()
  if isinstance(abstract, source_lib.Checkpoint):
    plan = build(
      ckpt.arrays,
      checkpoint_tree(abstract),
      source_layout=source_layout or ckpt.layout,
      target_layout=target_layout or abstract.layout,
      rules=options.rules,
      partial=options.partial,
      stacks=options.stacks,
      where=str(ckpt.directory),
      problems=list(problems),
    )
    return Prepared(plan, ckpt, None)
  state = target_lib.flatten(
    abstract, layout_name=target_layout, mesh=options.mesh, keep_abstract=topology is not None and topology.simulated
  )
  plan = build(
    ckpt.arrays,
    state.targets,
    source_layout=source_layout or ckpt.layout,
    target_layout=state.layout,
    rules=options.rules,
    partial=options.partial,
    stacks=options.stacks,
    where=str(ckpt.directory),
    problems=list(problems) + state.problems + options.problems(state),
    modules=state.modules,
  )
  if state.notes:
    plan = dataclasses.replace(plan, notes=plan.notes + tuple(state.notes))
  planned = time.perf_counter()
  plan = dataclasses.replace(
    plan,
    cost=cost_lib.estimate(
      plan,
      cost_lib.grids_of(plan, ckpt.stores),
      topology=topology,
      replica_axis=options.replica_axis,
      budget_bytes=options.read_budget_bytes,
    ),
  )
  if phases is not None:
    phases['open_and_list'] = opened - clock
    phases['plan'] = planned - opened
    phases['cost'] = time.perf_counter() - planned
  return Prepared(plan, ckpt, state)


def check_cost(
  options: options_lib.RestoreOptions,
  prepared: Prepared,
  *,
  more: Sequence[str] = (),
  strict_name: str = 'strict_cost=True',
  warn: Callable[[str], None] = plans.warn,
) -> None:
  """Warns of the expensive mistakes the plan's cost shows; with `strict_cost`, raises `PlanError` instead
  (before any read, alike on every process: each sees every process's cost).

  The checks of every face: a restore's (`LinenCompatRestore`, `plan()`), and the command line's, which adds
  a convert's own (`more`: what its write job holds above `--host-memory-limit`), names the option as its
  flag (`strict_name`) and warns on stderr (`warn`).
  """
  found = []
  if prepared.plan.cost is not None:  # a read into an abstract state (a checkpoint's tree carries no shardings)
    found = cost_lib.problems(
      prepared.plan.cost, max_over_read=options.max_over_read, host_memory_limit_bytes=options.host_memory_limit_bytes
    )
  found += list(more)
  if options.strict_cost:
    found = (list(prepared.state.large_replicated) if prepared.state is not None else []) + found
    if found:
      raise plans.PlanError(
        f'{len(found)} cost problem(s) with {strict_name}; nothing was read.\n  ' + '\n  '.join(found)
      )
  for line in found:
    warn(line)

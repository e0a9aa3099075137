"""The trees a Linen and an NNX training state save, for writing one from the other with no model.

`build_save` plans writing an NNX state as the tree a Linen run of the same
model saves (what `LinenCompatSave` and `to_linen` write); `build_nnx` plans
reading a Linen checkpoint as the tree an NNX run saves (what `convert --to
nnx` writes). Both derive their targets from the sources, then pair them with
`planner.build`, so what they plan a restore can plan back. `put` and
`as_linen_lists` build such a tree from its leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import planner
from orbax_linen_nnx.planning import rules as rules_lib
from orbax_linen_nnx.planning import stacks as stacks_lib
from orbax_linen_nnx.planning.plans import RestorePlan, SourceArray, Target

Path = layout.Path

# NNX state recomputed by every run and never saved (MaxText does not save it either).
EPHEMERAL_TYPES = frozenset({'Cache', 'Intermediate'})


def put(tree: dict, path: Path, value: Any) -> None:
  """`value` at `path` of a tree of nested dicts (made as needed; a value already there stays)."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree.setdefault(path[-1], value)


def as_linen_lists(node: Any, under_opt_state: bool = False) -> Any:
  """Optax's chains (tuples: int-keyed in NNX) as the lists Linen's tree holds, None where empty."""
  if not isinstance(node, dict):
    return node
  out = {
    k: (v if k == 'params' and under_opt_state else as_linen_lists(v, under_opt_state or k == 'opt_state'))
    for k, v in node.items()
  }
  if under_opt_state and out and all(k.isdigit() for k in out):
    chain = [None] * (max(int(k) for k in out) + 1)
    for k, v in out.items():
      chain[int(k)] = v
    return chain
  return out


def _rewritten(described, rules, stacks: stacks_lib.Stacks, source: str, to: str) -> tuple[list, dict[Path, int], bool]:
  """The sources after the rules (`planner.rewrite`'s entries), per-layer stacks' depths, and whether it is a
  train state."""
  rules = rules_lib.split_auto(rules)[0]  # the renames 'auto' infers come later, in planner.build
  rule_objs = planner.rule_list(rules, source == layout.LINEN, [])  # build reports the rules' own problems
  _, entries = planner.rewrite(described, rule_objs, rules_lib.Tally(), stacks, source)
  depth = stacks_lib.depths([m.param for _, m, _, _ in entries], stacks, to)
  return entries, depth, any(leaf.meaning.section != ('model',) for _, leaf in described)


def _as_written(param: Path, original: Path | None) -> Path | None:
  """The Linen names of a path the rules renamed: as the rules wrote them (a setup-style `layers/0`, as
  Hugging Face's Flax models name layers, stays); None where no rule renamed it (then per-layer entries
  are joined as Linen names lists: `blocks/0` -> `blocks_0`)."""
  return None if original is None or param == original else param


def _auto_without_target(rules: rules_lib.Rules, frm: str, to: str) -> list[str]:
  """The problem with rules='auto' where the other layout's tree is derived from this one's (no target)."""
  if not rules_lib.split_auto(rules)[1]:
    return []
  return [
    f"rules='auto' has nothing to pair with: with no target, the {to} names are derived from the {frm}"
    ' ones. Fix: give the tree to pair with (a save: LinenCompatSave(..., target=jax.eval_shape(lambda:'
    ' linen_state)); plan, convert: --target CKPT|MODULE:FUNCTION instead of --to), or state the renames'
  ]


def nnx_only_type(vtype: str | None) -> bool:
  """A persistent NNX Variable type Linen has no collection for (RNG streams, custom Variables)."""
  return vtype not in (None, 'Param', 'BatchStat') and vtype not in EPHEMERAL_TYPES


def build_save(
  sources: Sequence[SourceArray],
  variable_types: Mapping[Path, str | None],
  *,
  rules: rules_lib.Rules = None,
  stacks: stacks_lib.StackAxes | None = None,
  aux: str | None = layout.NNX_AUX,
  targets: Sequence[Target] | None = None,
  action: str = 'LinenCompatSave cannot write the NNX state in the Linen layout',
  collection_level: bool | None = None,
) -> RestorePlan:
  """The plan of writing an NNX state in the Linen layout: `build` with the Linen tree as target.

  The Linen tree is what a Linen run of the same model saves: params under
  `params/params` (`params` alone for a model without optimizer), the
  optimizer's subtrees that mirror them under `opt_state/.../params`, an int32
  `step`; the rules (written Linen -> NNX) name and shape it; `stacks` moves a
  stack's layer axis (`{'layers': {'nnx': 0, 'linen': 1}}`) or unrolls it
  (`{'layers': {'linen': None}}` -> `layers_0`, ...). Batch statistics go where
  Linen code keeps them: a `batch_stats` field beside `params` (which then
  holds `variables['params']`, as in Flax's BatchNorm guide), or the
  `batch_stats` collection of a model's variables. RNG streams and custom
  Variables, which Linen has no place for, go under `nnx_aux/model/...` as
  their NNX paths name them; `aux` says where that subtree is written:
  `'sidecar'` beside the Linen tree (the caller writes it apart), `'nnx_aux'`
  in it, with the batch statistics too (MaxText's layout), None nowhere
  (reported as skipped). Caches and intermediates are always left out.
  `collection_level` says whether a train state's `params` holds the
  variables dict (`params/params/...`, `TrainState.create(params=variables)`)
  or the params themselves (`params/...`, as a port's own train state with a
  `params` field holds them); None: the first, unless batch statistics sit
  beside the params. `targets` (a Linen abstract state's leaves) replaces the derived tree: the
  state is written as exactly that tree. The pairing itself is `build`'s, so a
  plan that `build` can make back (`LinenCompatRestore` with the same rules
  and stacks) restores it.

  >>> src = [SourceArray(('model', 'fc1', 'kernel'), 'model/fc1/kernel', (3, 8), 'float32')]
  >>> print(build_save(src, {src[0].path: 'Param'}, rules={'Dense_0': 'fc1'}).reads[0])
  params/Dense_0/kernel (3, 8) float32  <-  model/fc1/kernel  (by rename fc1)
  """
  problems: list[str] = []  # build reports the rules' own problems
  if aux not in layout.AUX_PLACES:
    problems.append(
      f'aux={aux!r}: NNX-only state goes in {layout.SIDECAR!r} (beside the Linen tree),'
      f' {layout.NNX_AUX!r} (in it, as MaxText writes it) or, with aux=None, nowhere'
    )
    aux = layout.SIDECAR
  spec = stacks_lib.Stacks.parse(stacks, problems).with_default(layout.NNX, layout.LINEN)
  if targets is None:
    problems += _auto_without_target(rules, layout.NNX, layout.LINEN)
  described = list(zip(sources, layout.describe([s.path for s in sources], layout.NNX)))
  skip = [
    s.path
    for s, leaf in described
    if variable_types.get(s.path) in EPHEMERAL_TYPES
    or (aux is None and nnx_only_type(variable_types.get(s.path)) and leaf.meaning.section == ('model',))
  ]
  described = [(s, leaf) for s, leaf in described if s.path not in skip]
  entries, depth, train_state = _rewritten(described, rules, spec, layout.NNX, layout.LINEN)
  original = {src.path: leaf.meaning.param for src, leaf in described}
  kinds = {m: variable_types.get(ops.stored_leaves(expr)[0].path) for expr, m, _, _ in entries}
  # Batch statistics beside the params (Flax's BatchNorm guide): `params` then holds variables['params'].
  stats = aux != layout.NNX_AUX and any(k == 'BatchStat' for m, k in kinds.items() if m.section == ('model',))
  single = stats if collection_level is None else not collection_level  # params/<path>: no 'params' level
  derived = []
  for expr, m, _, _ in entries:
    first = ops.stored_leaves(expr)[0]
    vtype, key_impl = kinds[m], getattr(expr, 'key_impl', None)
    shape, dtype = tuple(expr.shape), expr.dtype
    if m.section == ('step',):
      derived.append(Target(('step',), shape, np.dtype('int32'), None))  # Linen's TrainState.step
      continue
    put_aside = nnx_only_type(vtype) or (vtype == 'BatchStat' and not stats)
    if m.section == ('model',) and put_aside:  # where `aux` puts it; stacks and rules leave it as it is
      derived.append(
        Target(layout.base_of(m.section, layout.LINEN, aside=True) + m.param, shape, dtype, None, key_impl=key_impl)
      )
      continue
    base = layout.base_of(
      m.section,
      layout.LINEN,
      train_state=train_state,
      collection_level=not single,
      has_param=bool(m.param),
      batch_stat=vtype == 'BatchStat',
    )
    if base is None:
      problems.append(
        f"{first} is neither model, optimizer state nor step of an NNX train state"
        " ({'model': ..., 'optimizer': nnx.Optimizer}); save it with ocp.args.StandardSave"
      )
      continue
    if not m.param:
      derived.append(Target(base, shape, dtype, None, key_impl=key_impl))
      continue
    written = None if spec.declared(m.param, layout.LINEN) else _as_written(m.param, original.get(first.path))
    for param, s in stacks_lib.placed(m.param, shape, spec, depth, layout.LINEN, problems):
      derived.append(Target(base + (written or param), s, dtype, None, key_impl=key_impl))
  if targets is not None:
    # Exactly the caller's Linen tree; NNX-only state it has no place for goes in `aux`'s place.
    aux_in_target = any(t.path[:1] == (layout.NNX_AUX,) for t in targets)
    extra = [t for t in derived if t.path[:1] == (layout.NNX_AUX,) and not aux_in_target and aux == layout.SIDECAR]
    derived = list(targets) + extra
  derived.sort(key=lambda t: t.path)
  plan = planner.build(
    sources,
    derived,
    source_layout=layout.NNX,
    target_layout=layout.LINEN,
    rules=rules,
    stacks=spec,
    where='the NNX state',
    problems=problems,
    skip=skip,
    action=action,
  )
  aside = [r for r in plan.reads if r.target.path[:1] == (layout.NNX_AUX,)] if aux == layout.SIDECAR else []
  if aside and not (targets is not None and any(t.path[:1] == (layout.NNX_AUX,) for t in targets)):
    plan = dataclasses.replace(
      plan,
      notes=plan.notes
      + (
        f'{len(aside)} nnx_aux/ arrays (RNG streams, custom Variables) are written beside the Linen tree, in the'
        " item's nnx_aux/ directory: Linen readers never see them, LinenCompatRestore reads them back",
      ),
    )
  return plan


def build_nnx(
  sources: Sequence[SourceArray],
  *,
  rules: rules_lib.Rules = None,
  stacks: stacks_lib.StackAxes | None = None,
  where: str = 'the checkpoint',
) -> RestorePlan:
  """The plan of reading a Linen checkpoint as the NNX layout, with no model: `build` with a derived target.

  The NNX tree is what `nnx.state({'model': ..., 'optimizer': nnx.Optimizer})`
  of the same model saves: every model variable (params, batch stats, MaxText's
  `nnx_aux` state) under `model/<path>/value` (`<path>/value` for a model
  alone), the optimizer's states under `optimizer/opt_state/...` without the
  `params` level, a uint32 `optimizer/step/value`; per-layer modules keep
  their names (`layers_3/...`: attributes, as MaxText's unscanned NNX decoders
  name them), and the names the rules write stay as written. The rules (Linen -> NNX) name and shape it; `stacks`
  moves a
  stack's layer axis (`{'layers': {'linen': 1, 'nnx': 0}}`), unrolls it
  (`{'layers': {'nnx': None}}` -> `layers/0`, ...) or stacks `layers_N`
  (`{'layers': {'nnx': 0}}`). A Linen stack's axis defaults to `nn.scan`'s 1.

  >>> src = [SourceArray(('params', 'Dense_0', 'kernel'), 'params.Dense_0.kernel', (3, 8), 'float32')]
  >>> print(build_nnx(src, rules={'Dense_0': 'fc1'}).reads[0])
  fc1/kernel/value (3, 8) float32  <-  params.Dense_0.kernel  (by rename Dense_0)
  """
  problems: list[str] = _auto_without_target(rules, layout.LINEN, layout.NNX)
  spec = stacks_lib.Stacks.parse(stacks, problems).with_default(layout.LINEN, layout.NNX)
  described = list(zip(sources, layout.describe([s.path for s in sources], layout.LINEN)))
  entries, depth, train_state = _rewritten(described, rules, spec, layout.LINEN, layout.NNX)
  targets = []
  for expr, m, _, _ in entries:
    shape, dtype, key_impl = tuple(expr.shape), expr.dtype, getattr(expr, 'key_impl', None)
    base = layout.base_of(m.section, layout.NNX, train_state=train_state)
    if base is None:
      problems.append(
        f"{ops.stored_leaves(expr)[0]} is neither model variables, optimizer state nor step"
        " of a Linen TrainState; give the NNX tree it goes to (a target)"
      )
      continue
    if m.section == ('step',):
      targets.append(Target(layout.stored(base), shape, np.dtype('uint32'), None))  # nnx.Optimizer's
      continue
    placed = stacks_lib.placed(m.param, shape, spec, depth, layout.NNX, problems) if m.param else [((), shape)]
    for param, s in placed:
      targets.append(Target(layout.stored(base + param), s, dtype, None, key_impl=key_impl))
  targets.sort(key=lambda t: t.path)
  return planner.build(
    sources,
    targets,
    source_layout=layout.LINEN,
    target_layout=layout.NNX,
    rules=rules,
    stacks=spec,
    where=where,
    problems=problems,
  )

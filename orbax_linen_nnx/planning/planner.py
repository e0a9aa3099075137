"""The pairing: every target leaf with the stored array(s) it is read from, from metadata alone.

`build` is the whole of it, in named steps: the sources as the rules rewrite
them (`rewrite`), indexed by what they mean (`_Index`), each target matched by
meaning or through a layer stack (`_match`), the stack ops (`stacks.plan`),
and the reads with their casts (`_reads`). Problems are collected, never
raised one at a time; `diagnose` words them. Where rules written for one layer
fail on a stack whose layer axis nobody stated, the shapes may tell that axis:
the pairing is tried once more with it.

`prepare` is the one way every face (the Orbax handler, the command line, the
benchmarks) opens a checkpoint, reads an abstract state and plans.

    >>> plan = prepare(run_dir / '100', abstract, rules={'Dense_0': 'fc1'}).plan  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from orbax_linen_nnx.planning import diagnose
from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops
from orbax_linen_nnx.planning import plans
from orbax_linen_nnx.planning import rules as rules_lib
from orbax_linen_nnx.planning import stacks as stacks_lib
from orbax_linen_nnx.planning.plans import LeafRead, RestorePlan, SourceArray, Target

Path = layout.Path

# Which Linen collection each NNX variable type lives in.
_COLLECTION_OF_TYPE = {'Param': 'params', 'BatchStat': 'batch_stats', 'Cache': 'cache', 'Intermediate': 'intermediates'}


def rule_list(rules: rules_lib.Rules, linen_to_nnx: bool, problems: list[str]) -> list[rules_lib.Rule]:
  """The rules in the direction of the restore (inverted NNX -> Linen); a rule that cannot be, a problem."""
  try:
    return rules_lib.as_rules(rules, backward=not linen_to_nnx)
  except rules_lib.RuleError as e:
    problems.append(str(e))
    return []


def rewrite(
  described: Sequence[tuple[SourceArray, layout.Leaf]],
  rules: Sequence[rules_lib.Rule],
  tally: rules_lib.Tally,
  stacks: stacks_lib.Stacks,
  source_layout: str,
) -> tuple[dict, list]:
  """What every source means, after the rules rewrote each model subtree into the target's names.

  Rules rewrite each model subtree (the params, and every optimizer subtree
  that mirrors them) into arrays named and shaped as on the target side; under
  a stack whose source-side layer axis `stacks` states they see one layer
  (`stacks.one_layer`). `described` pairs each source with what it means
  (`layout.describe`). Returns ({source path: its `layout.Leaf`}, [(array or
  rule-made array, Meaning, collection, rules that made it)]).
  """
  entries = []
  raw: dict[Path, layout.Leaf] = {}  # source path -> what it means, before any rule
  subtrees: dict[Path, dict[str, Any]] = collections.defaultdict(dict)
  for s, leaf in described:
    raw[s.path] = leaf
    if leaf.meaning.param:
      subtrees[leaf.meaning.section]['/'.join(leaf.meaning.param)] = stacks_lib.one_layer(
        s, leaf.meaning.param, stacks, source_layout
      )
    else:
      entries.append((s, leaf.meaning, leaf.collection, ()))
  for section, leaves in subtrees.items():
    made_by: dict[str, tuple] = {}
    for path, expr in rules_lib.apply_all(rules, leaves, made_by, tally).items():
      expr = stacks_lib.with_layers(expr)
      first = ops.stored_leaves(expr)[0]
      param = tuple(p for p in path.split('/') if p)
      entries.append((expr, layout.Meaning(section, param), raw[first.path].collection, made_by.get(path, ())))
  return raw, entries


@dataclasses.dataclass
class _Index:
  """The rewritten sources by what they mean (layers normalised), and what named each."""

  by_meaning: dict[layout.Meaning, list[tuple]]
  history: dict[int, tuple]  # id(expr) -> rules that made it
  named_as: dict[int, str]  # id(expr) -> what it means, as the source names it (layers not normalised)

  @classmethod
  def of(cls, entries, problems: list[str]) -> '_Index':
    index = cls(collections.defaultdict(list), {}, {})
    for expr, m, collection, made in entries:
      index.by_meaning[layout.Meaning(m.section, stacks_lib.normalize(m.param))].append((expr, collection))
      index.history[id(expr)] = made
      index.named_as[id(expr)] = str(m)
    for m, found in index.by_meaning.items():
      if len(found) > 1:
        names = ', '.join(f"'{layout.render(s.path)}'" for s, _ in found)
        problems.append(f"sources {names} all map to '{m}'; rename one of them with rules=")
    return index


@dataclasses.dataclass
class _Matched:
  """Each target: paired by meaning (`direct`), to stack or unstack, kept as given, or missing."""

  direct: list = dataclasses.field(default_factory=list)  # (target, source, model path)
  to_stack: list = dataclasses.field(default_factory=list)  # (target, root, {layer: source})
  to_unstack: list = dataclasses.field(default_factory=list)  # (target, root, source, layer)
  kept: list[Target] = dataclasses.field(default_factory=list)
  missing: list = dataclasses.field(default_factory=list)  # (meaning, target)
  unfilled: list = dataclasses.field(default_factory=list)  # (meaning, target): kept for `partial`, no source
  looked_for: dict = dataclasses.field(default_factory=dict)  # str(meaning) -> meaning, of missing targets
  used: set = dataclasses.field(default_factory=set)  # stored source paths something reads
  as_saved: set = dataclasses.field(default_factory=set)  # nnx_aux state, held as the NNX model holds it
  named: dict = dataclasses.field(default_factory=dict)  # target path -> its model path as the target names it
  meaning: dict = dataclasses.field(default_factory=dict)  # target path -> its meaning, as the target names it


def _match(targets, tgt_leaves, index: _Index, partial: bool, problems: list[str]) -> _Matched:
  out = _Matched()
  layers = stacks_lib.LayerSources({m: found[0][0] for m, found in index.by_meaning.items()})
  for t, leaf in zip(targets, tgt_leaves):
    out.named[t.path] = leaf.meaning.param
    out.meaning[t.path] = leaf.meaning
    m = layout.Meaning(leaf.meaning.section, stacks_lib.normalize(leaf.meaning.param))
    found = index.by_meaning.get(m)
    if found:
      s, collection = found[0]
      out.used.update(x.path for x in ops.stored_leaves(s))
      want = _COLLECTION_OF_TYPE.get(t.variable_type or '')
      if collection == layout.NNX_AUX:
        want = 'params' if want == 'params' else None  # nnx_aux holds every Variable type but Param
      if want and collection and collection != want:
        problems.append(
          f"{t} is an nnx.{t.variable_type} but {s} is in Linen collection '{collection}' (expected '{want}')"
        )
      elif (k := diagnose.key_problem(t, s)) is not None:
        problems.append(k)
      else:
        out.direct.append((t, s, m.param))
        if layout.NNX_AUX in (collection, leaf.collection):
          out.as_saved.add(t.path)  # no layer axis to move
    elif per_layer := layers.to_stack(m):
      root, by_index = per_layer
      out.to_stack.append((t, root, by_index))
      out.used.update(x.path for src in by_index.values() for x in ops.stored_leaves(src))
    elif stacked := layers.to_unstack(m):
      root, src, i = stacked
      out.to_unstack.append((t, root, src, i))
      out.used.update(x.path for x in ops.stored_leaves(src))
    elif t.nnx_only or partial:
      out.kept.append(t)
      if not t.nnx_only:
        out.unfilled.append((leaf.meaning, t))
    else:
      out.missing.append((leaf.meaning, t))
      out.looked_for[str(leaf.meaning)] = leaf.meaning
      problems.append(
        plans.LeafProblem(
          f"{t} has no source (looked for '{leaf.meaning}')"
          + diagnose.near_misses(m, index.by_meaning, index.history, index.named_as),
          'missing',
          leaf.meaning,
          t,
        )
      )
  return out


def _unknown_stacks(stacks: stacks_lib.Stacks, index: _Index, matched: _Matched) -> list[str]:
  """A `stacks=` entry naming no model path of either side."""
  params = [m.param for m in index.by_meaning] + [stacks_lib.normalize(p) for p in matched.named.values()]
  problems = []
  for name, root, _ in stacks.items():
    if not any(p[: len(root)] == root for p in params):
      roots = sorted({'/'.join(p[:k]) for p in params for k in range(1, len(p)) if p[k].isdigit()})
      problems.append(
        f"stacks= names {name!r}, which is no model path of the checkpoint or the target"
        f" (layer stacks found: {', '.join(map(repr, roots)) or 'none per layer'})"
      )
  return problems


def _reads(
  targets, matched: _Matched, layer_ops: dict, index: _Index, linen_to_nnx: bool, problems: list[str]
) -> list[LeafRead]:
  """One `LeafRead` per target that has a source: its layer ops, then a cast to its dtype."""
  for t, s, _ in matched.direct:
    if t.path not in layer_ops and tuple(s.shape) != tuple(t.shape):
      problems.append(
        plans.LeafProblem(
          f'{t} cannot be read from {s}: shapes differ' + diagnose.shape_fix(t, s, matched.named[t.path], linen_to_nnx),
          'shape',
          matched.meaning[t.path],
          (t, s),
        )
      )
    else:
      layer_ops.setdefault(t.path, ((s,), ()))
  reads = []
  for t in targets:
    if t.path in layer_ops:
      srcs, transform = layer_ops[t.path]
      if plans.is_numpy_dtype(t.dtype) and np.dtype(srcs[0].dtype) != np.dtype(t.dtype):
        transform = transform + (ops.Cast(np.dtype(srcs[0].dtype), np.dtype(t.dtype)),)
      made = tuple(dict.fromkeys(r for x in srcs for r in index.history.get(id(x), ())))
      reads.append(LeafRead(t, tuple(srcs), transform, made))
  return reads


def _skipped(described, target_layout: str, tgt_leaves, skip: Sequence[Path]) -> set[Path]:
  """Sources left out: those asked to be, and NNX-only state a Linen target has no place for.

  A Linen target with an `nnx_aux` subtree has that place; without one, such
  sources are skipped (reported, no error).
  """
  aux_place = any(l.collection == layout.NNX_AUX for l in tgt_leaves)
  out = set(skip)
  for s, leaf in described:
    if (
      (layout.is_rng_path(s.path) or leaf.collection == layout.NNX_AUX)
      and target_layout == layout.LINEN
      and not aux_place
    ):
      out.add(s.path)
  return out


@dataclasses.dataclass
class _Attempt:
  """One pairing: the plan it makes, or its problems and what the error needs to say them."""

  plan: RestorePlan | None
  problems: list[str]
  missing: list
  unused: list
  unfit: dict
  unfilled: list = dataclasses.field(default_factory=list)  # targets `partial` keeps, for rules='auto' to pair
  unmatched: list = dataclasses.field(default_factory=list)  # names of the rules (rename entries) that matched nothing


def _pair(sources, targets, *, source_layout, target_layout, rules, partial, stacks, problems, skip) -> _Attempt:
  """Pairs every target with its sources under one reading of `stacks` (see `build`)."""
  linen_to_nnx = not (source_layout == layout.NNX and target_layout == layout.LINEN)
  problems = list(problems)
  rule_objs, tally = rule_list(rules, linen_to_nnx, problems), rules_lib.Tally()
  tgt_leaves = layout.describe([t.path for t in targets], target_layout)
  described = list(zip(sources, layout.describe([s.path for s in sources], source_layout)))
  skip = _skipped(described, target_layout, tgt_leaves, skip)
  tally.targets = stacks_lib.target_shapes(targets, tgt_leaves, stacks, target_layout)
  raw, entries = rewrite(
    [(s, leaf) for s, leaf in described if s.path not in skip], rule_objs, tally, stacks, source_layout
  )
  problems += tally.problems + rules_lib.unmatched_problems(rule_objs, tally)

  index = _Index.of(entries, problems)
  matched = _match(targets, tgt_leaves, index, partial, problems)
  layer_ops = stacks_lib.plan(
    [d for d in matched.direct if d[0].path not in matched.as_saved],
    matched.to_stack,
    matched.to_unstack,
    stacks,
    source_layout,
    target_layout,
    problems,
  )
  problems += _unknown_stacks(stacks, index, matched)
  reads = _reads(targets, matched, layer_ops, index, linen_to_nnx, problems)

  # A target that holds only the model leaves the optimizer state and step
  # unread on purpose: report them as unused, but they are no error.
  model_only = all(l.meaning.section == ('model',) for l in tgt_leaves)
  unused = []
  for s in sources:
    if s.path in matched.used or s.path not in raw or s.path in tally.dropped:
      continue
    m = raw[s.path].meaning
    unused.append((m, s))
    if not partial and not (model_only and m.section != ('model',)):
      problems.append(
        plans.LeafProblem(
          f'{s} is not used by any target' + diagnose.why_not(m, matched.looked_for.get(str(m))), 'unused', m, s
        )
      )
  plan = (
    None
    if problems
    else RestorePlan(
      source_layout=source_layout,
      target_layout=target_layout,
      reads=tuple(reads),
      kept=tuple(matched.kept),
      unused=tuple(s for _, s in unused),
      skipped=tuple(s for s in sources if s.path in skip),
      dropped=tuple(
        (s, tally.dropped[s.path]) for s in sources if s.path in tally.dropped and s.path not in matched.used
      ),
      rules_matched=tuple((rule, tuple(sorted(paths))) for rule, paths in tally.matched.items()),
    )
  )
  unmatched = [n for r in rule_objs for n in r.names() if not tally.matches.get(n)]
  return _Attempt(plan, problems, matched.missing, unused, tally.unfit, matched.unfilled, unmatched)


def build(
  sources: Sequence[SourceArray],
  targets: Sequence[Target],
  *,
  source_layout: str,
  target_layout: str,
  rules: rules_lib.Rules = None,
  partial: bool = False,
  stacks: stacks_lib.StackAxes | stacks_lib.Stacks | None = None,
  where: str = 'the checkpoint',
  problems: Sequence[str] = (),
  skip: Sequence[Path] = (),
  action: str | None = None,
  modules: Mapping[Path, tuple[int | None, str]] | None = None,
) -> RestorePlan:
  """Pairs every target leaf with its source array(s), from metadata alone.

  Raises `PlanError` listing every problem (targets with no source, sources
  nothing uses, shapes that differ, ambiguous sources) before any read.
  Sources whose paths are in `skip` are reported as skipped and not used;
  `action` replaces the head of the error ('LinenCompatRestore cannot restore
  from ...'); `modules` gives an `nnx.Module` target's modules as
  {model path: (attribute position, class name)}, for the renames an error proposes.

  >>> src = [SourceArray(('params', 'Dense_0', 'kernel'), 'params.Dense_0.kernel', (3, 8), 'float32')]
  >>> tgt = [Target(('fc1', 'kernel'), (3, 8), 'float32', None)]
  >>> build(src, tgt, source_layout='linen', target_layout='nnx', rules={'Dense_0': 'fc1'}).reads[0].sources[0].name
  'params.Dense_0.kernel'
  """
  problems = list(problems)  # found before planning (shardings, options): reported with the plan's
  spec = stacks_lib.Stacks.parse(stacks, problems)
  rules, auto = rules_lib.split_auto(rules)
  try:  # a value that is no rule at all: said alone, before any pairing
    rules_lib.as_rules(rules, backward=False)
  except rules_lib.RuleError as e:
    raise plans.PlanError(str(e)) from None
  linen_to_nnx = not (source_layout == layout.NNX and target_layout == layout.LINEN)
  pair = dict(source_layout=source_layout, target_layout=target_layout, rules=rules, partial=partial, skip=skip)
  first = attempt = _pair(sources, targets, stacks=spec, problems=problems, **pair)
  left = first.missing + first.unfilled  # with `partial`, the targets it would keep are paired all the same
  if auto and (left or first.unused):
    # rules='auto': the renames the given rules leave, from the two trees; only a unique pairing is used.
    found = diagnose.inferred_renames(left, first.unused, linen_to_nnx, modules)
    renames, by_order = found.renames, found.by_order
    if not renames and not found.open and (nothing := diagnose.auto_paired_nothing(left, first.unused, where)):
      if not partial:
        raise plans.PlanError(nothing)
      plans.warn(nothing)
    elif found.unsettled and (found.open or not partial):  # with `partial`, modules without a partner are kept
      raise diagnose.auto_error(found, rules, where, linen_to_nnx)
    if renames:
      inferred = dict(pair, rules=rules_lib.with_renames(rules, renames, linen_to_nnx=linen_to_nnx))
      attempt = _pair(sources, targets, stacks=spec, problems=list(problems), **inferred)
      if not attempt.problems:
        notes = (
          tuple(f"rules='auto' paired {k} -> {v}" for k, v in renames.items())
          + tuple(f"rules='auto': {line}" for line in by_order)
          + tuple(
            f"rules='auto' found no partner for {m} (partial=True: kept as given, or unused)" for m in found.unpaired
          )
          + (f"rules='auto' inferred rules=[rename({renames!r})] (plan --suggest-rules writes them as a module)",)
        )
        assert attempt.plan is not None  # a pairing without problems has its plan
        return dataclasses.replace(attempt.plan, notes=attempt.plan.notes + notes, inferred_renames=renames)
      first, pair = attempt, inferred
  # Rules written for one layer fail on a stack whose layer axis nobody stated.
  # Where the source's shapes tell that axis unambiguously, pair once more with
  # it; that plan is kept only if it has no problem at all.
  guessed = stacks_lib.guess_source_axes(first.unfit, sources, source_layout, spec) if first.problems else {}
  if guessed:
    attempt = _pair(sources, targets, stacks=spec.with_source(guessed), problems=problems, **pair)
  if not attempt.problems:
    notes = tuple(
      f"layer axis {a} of source stack '{'/'.join(r)}' inferred from its shapes: rules see one layer"
      for r, a in guessed.items()
    )
    assert attempt.plan is not None  # a pairing without problems has its plan
    return dataclasses.replace(attempt.plan, notes=attempt.plan.notes + notes)
  error = diagnose.error(
    first.problems,
    missing=first.missing,
    unused=first.unused,
    linen_to_nnx=linen_to_nnx,
    modules=modules,
    rules=rules,
    where=where,
    source_layout=source_layout,
    target_layout=target_layout,
    action=action,
    unmatched=first.unmatched,
  )
  if guessed:
    hint = ', '.join(f"{'/'.join(r)!r}: {{'source': {a}}}" for r, a in guessed.items())
    raise type(error)(
      f'{error}\n(Rules written for one layer see one only under a stack whose layer axis'
      f' stacks= states; the shapes suggest stacks={{{hint}}}, which did not plan either.)'
    )
  raise error

"""Why a restore cannot be planned, and the fix that works: the words of every `PlanError`.

The planner finds the problems; this module says them: the renames that pair
missing targets with unused sources (whole modules, one to one: see
`pairing`), the transpose or reshape that makes a shape the target's, why a
source that reads like a missing target was not paired with it, the sources
nearest to what a target looked for and the rules that named them. Pure:
plan data in, text out.
"""

from __future__ import annotations

import difflib
import itertools
import math
from typing import Any, Mapping, Sequence

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import pairing
from orbax_linen_nnx.planning import rules as rules_lib
from orbax_linen_nnx.planning.plans import Fix, LeafProblem, PlanError, Target

Path = layout.Path


def inferred_renames(missing, unused, linen_to_nnx: bool, modules) -> pairing.Pairing:
  """What `rules='auto'` uses: the pairing of the unused sources' modules with the missing targets'
  (sources: the Linen side, whichever way the restore goes); modules left without a partner are unsettled."""
  want = {m.param: tuple(t.shape) for m, t in missing if m.section == ('model',) and len(m.param) > 1}
  have = {m.param: tuple(s.shape) for m, s in unused if m.section == ('model',) and len(m.param) > 1}
  if not want or not have:
    return pairing.Pairing()
  linen, nnx_side = (have, want) if linen_to_nnx else (want, have)
  found = pairing.pair(pairing.tree(linen), pairing.tree(nnx_side, modules if linen_to_nnx else None))
  found.unsettled += [f'{m} has no partner' for m in found.unpaired]
  return found


def auto_paired_nothing(missing, unused, where: str) -> str | None:
  """What to say where `rules='auto'` found no rename although model leaves are left on both sides (None:
  nothing is left on one side, so there was nothing to pair)."""
  want = sorted({layout.render(m.param[:-1]) for m, _ in missing if m.section == ('model',) and len(m.param) > 1})
  have = sorted({layout.render(m.param[:-1]) for m, _ in unused if m.section == ('model',) and len(m.param) > 1})
  if not want or not have:
    return None
  shown = lambda names: ', '.join(names[:6]) + (f' (+{len(names) - 6} more)' if len(names) > 6 else '')
  return (
    f"rules='auto' paired nothing: the target's modules {shown(want)} have no source and {where}'s"
    f' modules {shown(have)} are unused, and no module of one holds what a module of the other holds'
    ' (the same leaves, the same shapes). Fix: state the renames (and any transpose or reshape) as rules;'
    ' the error without rules proposes them'
  )


def auto_error(found: pairing.Pairing, rules: rules_lib.Rules, where: str, linen_to_nnx: bool = True) -> PlanError:
  """Why `rules='auto'` cannot restore: the rename, on their own names, that settles the first open pair,
  then the modules it could not tell apart and what it did settle."""
  guessed = [k for k, _ in found.open if k]
  settled = {k: v for k, v in found.renames.items() if not any(k == g or k.startswith(g + '/') for g in guessed)}
  settled_text = f'It settled rename({settled!r}).' if settled else 'It settled no rename.'
  given = '' if rules is None else f' after the given rules {rules!r}'
  rename = {}
  if open_pairs := [(a, b) for a, b in found.open if a and b]:
    linen, nnx_name = open_pairs[0]
    rename = {linen: nnx_name}
    line = f"rules=[rename({rename!r}), 'auto']" if rules is None else f"add rename({rename!r}) before 'auto' in rules="
    fix = (
      f" with a rename before 'auto', e.g. {line} if {linen} is what {nnx_name} holds (else give its partner"
      ' instead; a given rename wins),'
    )
  else:
    fix = " with a rename before 'auto' (a given rename wins),"
  why = (
    fix + ' or restore from an initialised nnx.Module (its attribute order tells modules that look alike apart)'
    if linen_to_nnx
    else fix.rstrip(',') + ' (an NNX checkpoint keeps no attribute order to tell them apart)'
  )
  head = (
    f"'auto' (the inferred renames) cannot pair the modules of {where} with the target's one to one{given};"
    ' nothing was read.'
  )
  fixes = (
    Fix(
      'auto_rename',
      f'state the pairs it could not tell apart{why}',
      rename,
      rules,
      notes=(
        f'if {next(iter(rename))} is what {rename[next(iter(rename))]} holds (else give its partner'
        ' instead; a given rename wins)',
      )
      if rename
      else (),
    ),
  )
  problems = tuple(found.unsettled) + (settled_text,)
  return PlanError.of(head, problems, fixes)


def rename_fix(
  suggestion: dict[str, str],
  notes: list[str],
  rules: rules_lib.Rules,
  unmatched: Sequence[str] = (),
  auto: bool = False,
) -> Fix:
  """The rules= that adds `suggestion` to the caller's own rules, less the entries that matched nothing (a
  typo such as 'Conv_O' would fail the same way again)."""
  said = f" ({'; '.join(notes)})" if notes else ''
  if rules is None or isinstance(rules, Mapping):
    kept = {k: v for k, v in (rules or {}).items() if k not in unmatched}
    whole = {**kept, **suggestion}
    return Fix(
      'rename',
      f'rename modules with rules={whole!r}{said}',
      dict(suggestion),
      whole,
      auto and rules is None,
      tuple(notes),
    )
  return Fix(
    'rename', f'rename modules: add rename({suggestion!r}) to rules={said}', dict(suggestion), None, False, tuple(notes)
  )


def shape_fix(t: Target, s: Any, param: Path, linen_to_nnx: bool) -> str:
  """The rule that makes a source's shape the target's, where one does; else what differs.

  Rules are written Linen -> NNX: a fix is stated from the Linen shape to the
  NNX one, on the path as named where it goes in the list (after the renames
  going Linen -> NNX, before them going back).
  """
  linen, nnx_shape = (tuple(s.shape), tuple(t.shape)) if linen_to_nnx else (tuple(t.shape), tuple(s.shape))
  path = '/'.join(param)
  where = 'at the end of' if linen_to_nnx else 'first in'
  if sorted(linen) == sorted(nnx_shape) and len(linen) <= 6:
    perms = [p for p in itertools.permutations(range(len(linen))) if tuple(linen[i] for i in p) == nnx_shape]
    if len(perms) == 1:
      return f"; fix: add transpose('{path}', {perms[0]}) {where} rules="
  if math.prod(linen) == math.prod(nnx_shape):
    return f"; fix: add reshape('{path}', {linen}, {nnx_shape}) {where} rules="
  if len(linen) == len(nnx_shape):
    dims = [i for i, (a, b) in enumerate(zip(t.shape, s.shape)) if a != b]
    if len(dims) == 1:
      d = dims[0]
      return (
        f'; only dimension {d} differs ({t.shape[d]} in the target, {s.shape[d]} in the checkpoint): the'
        ' model is configured differently from the run that saved it'
      )
  return ''


def why_not(source: layout.Meaning, target: layout.Meaning | None) -> str:
  """Why a source whose path reads like a missing target's was not paired with it."""
  if target is None or target == source:
    return ''
  if target.param and not source.param:
    return (
      f"; it reads like '{target}', but is not read as a mirror of model variable"
      f" '{'/'.join(target.param)}': no optimizer subtree above it holds only paths of model"
      ' variables'
    )
  return f"; it reads like '{target}', but as '{'/'.join(source.section)}' + '{'/'.join(source.param)}'"


def near_misses(m: layout.Meaning, by_meaning, history, named_as) -> str:
  """The sources, as named after the rules, closest to what a missing target looked for, and who named them.

  A wrong rule shows at once: `{n}_proj` written where `{n}` took two segments
  makes 'attn/query/kernel_proj', which stands right next to the
  'attn/query_proj/kernel' looked for.
  """
  same = {str(k): found[0][0] for k, found in by_meaning.items() if k.section == m.section}
  close = difflib.get_close_matches(str(m), list(same), n=3, cutoff=0.75)
  if not close:
    return ''
  named = [
    f"'{named_as.get(id(same[c]), c)}'"
    f" ({'made by ' + ' then '.join(history[id(same[c])]) if history.get(id(same[c])) else 'as stored'})"
    for c in close
  ]
  return f"; closest sources after the rules: {', '.join(named)}"


def key_problem(t: Target, s: Any) -> str | None:
  """Why typed PRNG keys cannot be read from `s` into `t`, if they cannot."""
  held = getattr(s, 'key_impl', None)
  if t.key_impl and held and held != t.key_impl:
    return (
      f"{t} holds {t.key_impl} keys but {s} holds {held} keys; make the target's keys as"
      f" jax.random.key(seed, impl='{held}') (nnx.Rngs takes keys as well as seeds)"
    )
  return None


def error(
  problems: Sequence[str],
  *,
  missing,
  unused,
  linen_to_nnx: bool,
  modules,
  rules: rules_lib.Rules,
  where: str,
  source_layout: str,
  target_layout: str,
  action: str | None,
  unmatched: Sequence[str] = (),
) -> PlanError:
  """The `PlanError` of a plan with `problems`: the fixes that apply, then every problem, by module.

  `missing` and `unused` are the (meaning, target) and (meaning, source) pairs
  nothing paired; `action` replaces the head ('LinenCompatRestore cannot
  restore from ...'), and a save (which has an action) offers no partial=True.
  """
  fixes = []
  suggestion, unsettled, settled = _suggestion(missing, unused, linen_to_nnx, modules)
  if suggestion:
    fixes.append(rename_fix(suggestion, unsettled, rules, unmatched, auto=settled))
  if (missing or unused) and not action:  # a save has no partial: it writes the whole state
    fixes.append(Fix('partial', 'pass partial=True to restore only the leaves that match'))
  lines = by_module(problems, modules if linen_to_nnx else None, linen_to_nnx)
  grouped = len(lines) < len(problems)
  head = (
    action
    or f'LinenCompatRestore cannot restore from {where} ({source_layout} layout) into the given {target_layout} state'
  ) + (
    f': {len(lines)} problem(s)'
    + (f' ({len(problems)} leaves)' if grouped else '')
    + f'; nothing was {"written" if action else "read"}.'
  )
  return PlanError.of(head, lines, fixes, tuple(problems) if grouped else ())


def _suggestion(missing, unused, linen_to_nnx: bool, modules) -> tuple[dict, list[str], bool]:
  """The renames an error proposes, its notes, and whether rules='auto' infers exactly them."""
  found = inferred_renames(missing, unused, linen_to_nnx, modules)
  return (
    found.renames,
    found.by_order + [u for u in found.unsettled if not u.endswith(' has no partner')],
    bool(found.renames) and not found.unsettled,
  )


def _model_leaves(group: Sequence[LeafProblem]) -> tuple[dict[str, tuple], int]:
  """A module's leaves in the model section (name -> shape), and how many others (optimizer mirrors) it has."""
  shapes = {}
  for p in group:
    if p.meaning.section == ('model',):
      shapes[p.meaning.param[-1]] = tuple(p.array.shape)
  return shapes, len(group) - len(shapes)


def _leaves_text(shapes: Mapping[str, tuple], others: int, group: Sequence[LeafProblem]) -> str:
  if not shapes:  # only mirrors (an optimizer's) of a module the model section pairs
    return ', '.join(f"{'/'.join(p.meaning.section)}/{p.meaning.param[-1]} {tuple(p.array.shape)}" for p in group)
  return ', '.join(f'{k} {v}' for k, v in sorted(shapes.items())) + (f' (+{others} optimizer leaves)' if others else '')


def by_module(problems: Sequence[str], modules, linen_to_nnx: bool) -> list[str]:
  """`problems` with the leaves of one module said in one line: a module no source holds, a module no
  target reads (its leaves' names and shapes, with its optimizer mirrors counted), a shape that differs
  in a variable and its optimizer mirrors. A module with one such leaf keeps its leaf's own line.

  A module without a source is offered the unused modules closest to it, by kind and shape together
  (a BatchNorm target is offered BatchNorm sources first)."""
  groups: dict[tuple, list[LeafProblem]] = {}
  key_of = {}
  for i, p in enumerate(problems):
    if not isinstance(p, LeafProblem):
      continue
    if p.kind in ('missing', 'unused') and len(p.meaning.param) > 1:
      key_of[i] = (p.kind, p.meaning.param[:-1])
    elif p.kind == 'shape':
      key_of[i] = ('shape', p.meaning.param)
    else:
      continue
    groups.setdefault(key_of[i], []).append(p)
  unused_modules = {k[1]: _model_leaves(g)[0] for k, g in groups.items() if k[0] == 'unused' and len(g) > 1}
  out, said = [], set()
  for i, p in enumerate(problems):
    key = key_of.get(i)
    if key is None or len(groups[key]) == 1:
      out.append(p)
      continue
    if key in said:
      continue
    said.add(key)
    group = groups[key]
    kind, path = key
    if kind == 'shape':
      out.append(f'{group[0]} (and the {len(group) - 1} optimizer leaves that mirror it)')
      continue
    shapes, others = _model_leaves(group)
    name = layout.render(path)
    if kind == 'missing':
      hint = closest_modules(path, shapes, unused_modules, modules, linen_to_nnx)
      out.append(f"target module '{name}' has no source: {_leaves_text(shapes, others, group)}{hint}")
    else:
      out.append(f"source module '{name}' is not used by any target: {_leaves_text(shapes, others, group)}")
  return out


def closest_modules(
  path: Path,
  shapes: Mapping[str, tuple],
  candidates: Mapping[Path, Mapping[str, tuple]],
  modules,
  linen_to_nnx: bool,
  n: int = 2,
) -> str:
  """The unused source modules most like a target module: kind and shapes together, then leaf names,
  then the name. Offered only where a candidate holds the same leaves or is of the same kind."""
  if not shapes or not candidates:
    return ''
  want = pairing.tree({path + (k,): v for k, v in shapes.items()}, modules)
  want = next(m for m in pairing.leaf_modules(want) if m.path and m.leaves)
  ranked = []
  for other, leaves in candidates.items():
    if not leaves:
      continue
    have = next(m for m in pairing.leaf_modules(pairing.tree({other + (k,): v for k, v in leaves.items()})))
    kind = pairing.kinds_agree(want, have) if linen_to_nnx else pairing.kinds_agree(have, want)
    same_names = set(leaves) == set(shapes)
    same_shapes = dict(leaves) == dict(shapes)
    ranks = sorted(len(v) for v in leaves.values()) == sorted(len(v) for v in shapes.values())
    if kind is False or not (same_names or kind):
      continue
    score = (
      same_names and same_shapes,
      kind is True,
      same_names,
      ranks,
      difflib.SequenceMatcher(None, layout.render(path), layout.render(other)).ratio(),
    )
    why = ([f'a {have.kind}'] if kind is True else []) + [
      'the same leaves and shapes' if same_shapes else 'the same leaves, other shapes' if same_names else 'other leaves'
    ]
    ranked.append((score, f"'{layout.render(other)}' ({', '.join(why)})"))
  ranked.sort(key=lambda r: r[0], reverse=True)
  return f"; closest unused: {', '.join(t for _, t in ranked[:n])}" if ranked else ''

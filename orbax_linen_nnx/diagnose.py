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
from orbax_linen_nnx import pairing
from orbax_linen_nnx import rules as rules_lib
from orbax_linen_nnx.plans import PlanError, SourceArray, Target

Path = layout.Path


def suggest_renames(missing: Sequence[tuple[layout.Meaning, Target]],
                     unused: Sequence[tuple[layout.Meaning, SourceArray]],
                     linen_to_nnx: bool, modules: Mapping[Path, tuple[int | None, str]] | None) -> tuple[dict, list[str]]:
  """The module renames (Linen name -> NNX name) that pair missing targets with unused sources, one to one.

  Modules are paired by all their leaves together (see `pairing`); `modules`
  gives the NNX target's attribute order and classes where the target is an
  `nnx.Module`. Returns the renames and what the shapes could not settle.
  """
  want = {m.param: tuple(t.shape) for m, t in missing if m.section == ('model',) and len(m.param) > 1}
  have = {m.param: tuple(s.shape) for m, s in unused if m.section == ('model',) and len(m.param) > 1}
  if not want or not have:
    return {}, []
  linen, nnx_side = (have, want) if linen_to_nnx else (want, have)
  found = pairing.pair(pairing.tree(linen), pairing.tree(nnx_side, modules if linen_to_nnx else None))
  return found.renames, found.by_order + found.unsettled


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
  return (f"rules='auto' paired nothing: the target's modules {shown(want)} have no source and {where}'s"
          f' modules {shown(have)} are unused, and no module of one holds what a module of the other holds'
          ' (the same leaves, the same shapes). Fix: state the renames (and any transpose or reshape) as rules;'
          ' the error without rules proposes them')


def auto_error(found: pairing.Pairing, rules: rules_lib.Rules, where: str, linen_to_nnx: bool = True) -> PlanError:
  """Why `rules='auto'` cannot restore: the modules it could not tell apart, what it did settle, and the
  rename, on their own names, that settles the first open pair."""
  guessed = [k for k, _ in found.open if k]
  settled = {k: v for k, v in found.renames.items() if not any(k == g or k.startswith(g + '/') for g in guessed)}
  settled = f'It settled rename({settled!r}).' if settled else 'It settled no rename.'
  given = '' if rules is None else f' after the given rules {rules!r}'
  if open_pairs := [(a, b) for a, b in found.open if a and b]:
    linen, nnx_name = open_pairs[0]
    line = (f"rules=[rename({ {linen: nnx_name} !r}), 'auto']" if rules is None else
            f"add rename({ {linen: nnx_name} !r}) before 'auto' in rules=")
    fix = (f' with a rename before \'auto\', e.g. {line} if {linen} is what {nnx_name} holds (else give its partner'
           ' instead; a given rename wins),')
  else:
    fix = " with a rename before 'auto' (a given rename wins),"
  return PlanError(
      f"rules='auto' cannot pair the modules of {where} with the target's one to one{given}; nothing was read.\n"
      + '\n'.join(f'  {u}' for u in found.unsettled) + f'\n{settled} Fix: state the pairs it could not tell apart'
      + (fix + ' or restore from an initialised nnx.Module (its attribute order tells modules that look alike apart)'
         if linen_to_nnx else fix.rstrip(',') + ' (an NNX checkpoint keeps no attribute order to tell them apart)'))


def rename_fix(suggestion: dict[str, str], notes: list[str], rules: rules_lib.Rules,
               unmatched: Sequence[str] = ()) -> str:
  """The rules= that adds `suggestion` to the caller's own rules, less the entries that matched nothing (a
  typo such as 'Conv_O' would fail the same way again)."""
  if rules is None or isinstance(rules, Mapping):
    kept = {k: v for k, v in (rules or {}).items() if k not in unmatched}
    fix = f'rename modules with rules={({**kept, **suggestion})!r}'
  else:
    fix = f'rename modules: add rename({suggestion!r}) to rules='
  return fix + (f" ({'; '.join(notes)})" if notes else '')


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
      return (f'; only dimension {d} differs ({t.shape[d]} in the target, {s.shape[d]} in the checkpoint): the'
              ' model is configured differently from the run that saved it')
  return ''


def why_not(source: layout.Meaning, target: layout.Meaning | None) -> str:
  """Why a source whose path reads like a missing target's was not paired with it."""
  if target is None or target == source:
    return ''
  if target.param and not source.param:
    return (f"; it reads like '{target}', but is not read as a mirror of model variable"
            f" '{'/'.join(target.param)}': no optimizer subtree above it holds only paths of model"
            ' variables')
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
  named = [f"'{named_as.get(id(same[c]), c)}'"
           f" ({'made by ' + ' then '.join(history[id(same[c])]) if history.get(id(same[c])) else 'as stored'})"
           for c in close]
  return f"; closest sources after the rules: {', '.join(named)}"


def key_problem(t: Target, s: Any) -> str | None:
  """Why typed PRNG keys cannot be read from `s` into `t`, if they cannot."""
  held = getattr(s, 'key_impl', None)
  if t.key_impl and held and held != t.key_impl:
    return (f"{t} holds {t.key_impl} keys but {s} holds {held} keys; make the target's keys as"
            f" jax.random.key(seed, impl='{held}') (nnx.Rngs takes keys as well as seeds)")
  return None


def error(problems: Sequence[str], *, missing, unused, linen_to_nnx: bool, modules, rules: rules_lib.Rules,
          where: str, source_layout: str, target_layout: str, action: str | None,
          unmatched: Sequence[str] = ()) -> PlanError:
  """The `PlanError` of a plan with `problems`: every problem, then the fixes that apply.

  `missing` and `unused` are the (meaning, target) and (meaning, source) pairs
  nothing paired; `action` replaces the head ('LinenCompatRestore cannot
  restore from ...'), and a save (which has an action) offers no partial=True.
  """
  fixes = []
  suggestion, unsettled = suggest_renames(missing, unused, linen_to_nnx, modules)
  if suggestion:
    fixes.append(rename_fix(suggestion, unsettled, rules, unmatched))
  if (missing or unused) and not action:  # a save has no partial: it writes the whole state
    fixes.append('pass partial=True to restore only the leaves that match')
  head = (action or f'LinenCompatRestore cannot restore from {where} ({source_layout} layout) into the'
          f' given {target_layout} state') + (f': {len(problems)} problem(s);'
                                              f' nothing was {"written" if action else "read"}.')
  tail = f"Fix: {'; or '.join(fixes)}." if fixes else ''
  return PlanError('\n'.join([head] + [f'  {p}' for p in problems] + ([tail] if tail else [])))

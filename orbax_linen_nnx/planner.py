"""The restore plan: every target leaf and the on-disk array(s) it is read from.

A `RestorePlan` is computed from checkpoint metadata and the abstract target
alone, before any array byte is read. It is plain data: print it to see what a
restore will do, compare it in tests, hand it to `read.execute` to run it.

    >>> print(plan)                                     # doctest: +SKIP
    linen -> nnx: 11 arrays to read, 2 kept as given, 0 unused sources
      model/fc1/kernel (3, 8) float32  <-  params.params.Dense_0.kernel
      optimizer/step () uint32  <-  step  [cast int32 -> uint32]
      kept  model/rngs/default/key  (NNX-only state)
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import itertools
import math
import os
import re
import sys
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from orbax_linen_nnx import layout
from orbax_linen_nnx import pairing
from orbax_linen_nnx import rules as rules_lib
from orbax_linen_nnx import stacks as stacks_lib
from orbax_linen_nnx import ops
from orbax_linen_nnx.ops import Cast

Path = layout.Path


def _fmt(shape, dtype) -> str:
  return f'{tuple(shape)} {np.dtype(dtype).name if _is_numpy_dtype(dtype) else dtype}'


def _is_numpy_dtype(dtype) -> bool:
  try:
    np.dtype(dtype)
    return True
  except TypeError:
    return False


@dataclasses.dataclass(frozen=True)
class SourceArray:
  """An array in the checkpoint: its tree path, on-disk name, shape and dtype."""

  path: Path
  name: str
  shape: tuple[int, ...]
  dtype: Any
  key_impl: str | None = None  # a typed PRNG key stored as its key data: the key implementation

  def __str__(self) -> str:
    keys = f' ({self.key_impl} key data)' if self.key_impl else ''
    return f"source '{layout.render(self.path)}' {_fmt(self.shape, self.dtype)}{keys}"


@dataclasses.dataclass(frozen=True)
class Target:
  """A leaf of the abstract state: what the restore must produce there.

  `variable_type` is the NNX Variable class name when the target is an NNX
  state ('Param', 'BatchStat', 'RngKey', ...), else None.
  """

  path: Path
  shape: tuple[int, ...]
  dtype: Any
  sharding: Any
  variable_type: str | None = None
  key_impl: str | None = None  # a typed PRNG key: read as its key data (shape, dtype), then wrapped

  @property
  def nnx_only(self) -> bool:
    """State Linen never saves (RNG keys and counts)."""
    return self.variable_type in ('RngKey', 'RngCount', 'RngState') or layout.is_rng_path(self.path)

  def __str__(self) -> str:
    keys = f' ({self.key_impl} key data)' if self.key_impl else ''
    return f"target '{layout.render(self.path)}' {_fmt(self.shape, self.dtype)}{keys}"


def _compact(names: list[str]) -> str:
  """'a.layers_0.k', ..., 'a.layers_7.k' -> 'a.layers_{0..7}.k' (the plan stays readable)."""
  parts = [re.split(r'(\d+)', n) for n in names]
  if len(names) > 2 and len({len(p) for p in parts}) == 1:
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(differ) == 1 and [p[differ[0]] for p in parts] == [str(i) for i in range(len(names))]:
      head = parts[0][:differ[0]]
      return ''.join(head) + f'{{0..{len(names) - 1}}}' + ''.join(parts[0][differ[0] + 1:])
  return ', '.join(names)


@dataclasses.dataclass(frozen=True)
class LeafRead:
  """One target leaf, the source array(s) it comes from and how it is transformed.

  `sources` are stored arrays (`SourceArray`) or arrays rules make from them
  (`ops.Derived`). `transform` is applied in order to lazy views of the
  sources; empty means the target is the source as it is. `rules` names the
  rules that produced the sources.
  """

  target: Target
  sources: tuple[Any, ...]
  transform: tuple[Any, ...] = ()
  rules: tuple[str, ...] = ()

  def expression(self) -> Any:
    """The sources with the transform applied: one tree of ops (`ops.Derived`) over stored arrays."""
    args = list(self.sources)
    for op in self.transform:
      args = [ops.derive(op, args, self.target.path)]
    (expr,) = args
    return expr

  def __str__(self) -> str:
    names = _compact([s.name for s in self.sources])
    ops = f"  [{'; '.join(str(t) for t in self.transform)}]" if self.transform else ''
    made = f"  (by {', '.join(self.rules)})" if self.rules else ''
    keys = f'  (as {self.target.key_impl} key data)' if self.target.key_impl else ''
    return (
        f'{layout.render(self.target.path)} {_fmt(self.target.shape, self.target.dtype)}'
        f'  <-  {names}{ops}{made}{keys}'
    )


@dataclasses.dataclass(frozen=True)
class RestorePlan:
  """What a restore will read, keep and leave out, decided before any read.

  Attributes:
    source_layout: 'linen' or 'nnx', the checkpoint's layout.
    target_layout: 'linen' or 'nnx', the abstract state's layout.
    reads: one `LeafRead` per target leaf that is restored from the checkpoint.
    kept: target leaves left as given in the abstract state (NNX-only state such
      as RNG keys; with `partial=True`, also targets with no source).
    unused: source arrays nothing reads (only possible with `partial=True`).
    skipped: NNX-only source arrays (RNG state) that a Linen target has no place
      for; reported, never an error.
    dropped: (source array, rule) for every source a `drop` rule left out.
    rules_matched: (rule, model paths it matched) for every rule that matched.
    notes: what the planner inferred that the caller did not state.
  """

  source_layout: str
  target_layout: str
  reads: tuple[LeafRead, ...]
  kept: tuple[Target, ...] = ()
  unused: tuple[SourceArray, ...] = ()
  skipped: tuple[SourceArray, ...] = ()
  dropped: tuple[tuple[SourceArray, str], ...] = ()
  rules_matched: tuple[tuple[str, tuple[str, ...]], ...] = ()
  notes: tuple[str, ...] = ()

  def __str__(self) -> str:
    lines = [
        f'{self.source_layout} -> {self.target_layout}: {len(self.reads)} arrays to'
        f' read, {len(self.kept)} kept as given, {len(self.unused)} unused sources,'
        f' {len(self.skipped)} NNX-only sources skipped'
        + (f', {len(self.dropped)} dropped by rules' if self.dropped else '')
    ]
    lines += [f'  {r}' for r in self.reads]
    lines += [
        f"  kept    {layout.render(t.path)} {_fmt(t.shape, t.dtype)}"
        f"  ({'NNX-only state' if t.nnx_only else 'no source'})"
        for t in self.kept
    ]
    lines += [f'  unused  {s.name} {_fmt(s.shape, s.dtype)}' for s in self.unused]
    lines += [f'  skipped {s.name} {_fmt(s.shape, s.dtype)} (NNX-only)' for s in self.skipped]
    lines += [f'  dropped {s.name} {_fmt(s.shape, s.dtype)} (by {rule})' for s, rule in self.dropped]
    for rule, paths in self.rules_matched:
      shown = ', '.join(paths[:3]) + (f', ... ({len(paths)} in all)' if len(paths) > 3 else '')
      lines.append(f'  rule    {rule} matched {shown}')
    lines += [f'  note    {n}' for n in self.notes]
    return '\n'.join(lines)

  def read_for(self, path: str | Path) -> LeafRead:
    """The `LeafRead` of a target path ('model/fc1/kernel' or a tuple)."""
    if isinstance(path, str):
      path = tuple(p for p in path.split('/') if p)
    for r in self.reads:
      if r.target.path == tuple(path):
        return r
    raise KeyError(f'no read planned for target {layout.render(path)!r}')


class PlanError(ValueError):
  """A restore that cannot be planned; lists every problem found. Nothing was read."""


class LinenCompatWarning(UserWarning):
  """A restore or save that went ahead but left something the caller should know of (the plan lists it)."""


def warn(message: str) -> None:
  """A `LinenCompatWarning` attributed to the caller's line: the first frame outside Orbax and this package."""
  level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called warn
  while frame is not None and any(f'{os.sep}{pkg}{os.sep}' in frame.f_code.co_filename
                                  for pkg in ('orbax', 'orbax_linen_nnx', 'concurrent')):
    level, frame = level + 1, frame.f_back
  warnings.warn(f'orbax_linen_nnx: {message}', LinenCompatWarning, stacklevel=level)


# Which Linen collection each NNX variable type lives in.
_COLLECTION_OF_TYPE = {'Param': 'params', 'BatchStat': 'batch_stats', 'Cache': 'cache',
                       'Intermediate': 'intermediates'}


def _suggest_renames(missing: Sequence[tuple[layout.Meaning, Target]],
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


def _rename_fix(suggestion: dict[str, str], notes: list[str], rules: rules_lib.Rules) -> str:
  """The rules= that adds `suggestion` to the caller's own rules."""
  if rules is None or isinstance(rules, Mapping):
    fix = f'rename modules with rules={({**(rules or {}), **suggestion})!r}'
  else:
    fix = f'rename modules: add rename({suggestion!r}) to rules='
  return fix + (f" ({'; '.join(notes)})" if notes else '')


def _shape_fix(t: Target, s: Any, param: Path, linen_to_nnx: bool) -> str:
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


def _why_not(source: layout.Meaning, target: layout.Meaning | None) -> str:
  """Why a source whose path reads like a missing target's was not paired with it."""
  if target is None or target == source:
    return ''
  if target.param and not source.param:
    return (f"; it reads like '{target}', but is not read as a mirror of model variable"
            f" '{'/'.join(target.param)}': no optimizer subtree above it holds only paths of model"
            ' variables')
  return f"; it reads like '{target}', but as '{'/'.join(source.section)}' + '{'/'.join(source.param)}'"


def _near_misses(m: layout.Meaning, by_meaning, history, named_as) -> str:
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


def _key_problem(t: Target, s: Any) -> str | None:
  """Why typed PRNG keys cannot be read from `s` into `t`, if they cannot."""
  held = getattr(s, 'key_impl', None)
  if t.key_impl and held and held != t.key_impl:
    return (f"{t} holds {t.key_impl} keys but {s} holds {held} keys; make the target's keys as"
            f" jax.random.key(seed, impl='{held}') (nnx.Rngs takes keys as well as seeds)")
  return None


def _rules(rules: rules_lib.Rules, linen_to_nnx: bool, problems: list[str]) -> tuple[list, rules_lib.Tally]:
  try:
    rule_list = rules_lib.as_rules(rules, backward=not linen_to_nnx)
  except rules_lib.RuleError as e:
    problems.append(str(e))
    rule_list = []
  return rule_list, rules_lib.Tally()


@dataclasses.dataclass(frozen=True)
class _OneLayer:
  """A stacked source as the rules see it: one layer (the layer axis left out)."""

  stacked: SourceArray
  axis: int

  path = property(lambda self: self.stacked.path)
  name = property(lambda self: self.stacked.name)
  dtype = property(lambda self: self.stacked.dtype)
  key_impl = property(lambda self: self.stacked.key_impl)
  shape = property(lambda self: stacks_lib.drop_axis(self.stacked.shape, self.axis))


def _with_layers(expr):
  """A rule's expression over `_OneLayer`s as the same ops over the whole stacks.

  The layer axis is moved first (a view), every op runs on one more leading
  axis, and the layer axis goes back where the source had it, so the planner's
  stack conversions see a stacked source as before.
  """
  def lift(e):
    if isinstance(e, _OneLayer):
      return e.stacked if e.axis == 0 else ops.derive(ops.MoveAxis(e.axis, 0), [e.stacked], e.path)
    if not isinstance(e, ops.Derived):
      return e
    return ops.derive(e.op.lifted(n), [lift(a) for a in e.args], e.path)

  layers = [x for x in ops.stored_leaves(expr) if isinstance(x, _OneLayer)]
  if not layers:
    return expr
  n = layers[0].stacked.shape[layers[0].axis]
  if not isinstance(expr, ops.Derived):  # renamed only: the stack itself
    return expr.stacked
  out = lift(expr)
  return out if layers[0].axis == 0 else ops.derive(ops.MoveAxis(0, layers[0].axis), [out], expr.path)


def _target_shapes(targets, tgt_leaves, stacks, target_layout) -> dict[Path, list[tuple[int, ...]]]:
  """{model path: shapes} of the targets, for rules that bind sizes from them (`rearrange`).

  A rule under a stack sees one layer: a per-layer target is also listed
  without its index, and one under a stack whose target-side layer axis
  `stacks=` states also with that axis left out.
  """
  shapes: dict[Path, list[tuple[int, ...]]] = collections.defaultdict(list)
  for t, leaf in zip(targets, tgt_leaves):
    norm = stacks_lib.normalize(leaf.meaning.param)
    if not norm:
      continue
    shapes[norm].append(tuple(t.shape))
    for k, seg in enumerate(norm[:-1]):
      if seg.isdigit():
        shapes[norm[:k] + norm[k + 1:]].append(tuple(t.shape))
      elif (axis := stacks_lib.explicit_axis(stacks, norm[:k + 1], target_layout, 'target')) is not None \
          and 0 <= axis < len(t.shape):
        shapes[norm].append(stacks_lib.drop_axis(t.shape, axis))
  return {k: list(dict.fromkeys(v)) for k, v in shapes.items()}


def _rewrite(described: Sequence[tuple[SourceArray, layout.Leaf]], rule_list, tally, stacks,
             source_layout: str) -> tuple[dict, list]:
  """What every source means, after the rules rewrote each model subtree into the target's names.

  Rules rewrite each model subtree (the params, and every optimizer subtree
  that mirrors them) into arrays named and shaped as on the target side.
  `described` pairs each source with what it means (`layout.describe`).
  Returns ({source path: its `layout.Leaf`}, [(array or rule-made array,
  Meaning, collection, rules that made it)]).
  """
  entries = []
  raw: dict[Path, layout.Leaf] = {}  # source path -> what it means, before any rule
  subtrees: dict[Path, dict[str, Any]] = collections.defaultdict(dict)
  # Under a stack whose layer axis is declared for this side, rules see one
  # layer: a rule written for one layer fits the stack (see _with_layers).
  declared = [(root, axis) for root in map(stacks_lib.root_of, stacks or ())
              if (axis := stacks_lib.explicit_axis(stacks, root, source_layout, 'source')) is not None]
  for s, leaf in described:
    raw[s.path] = leaf
    if leaf.meaning.param:
      norm = stacks_lib.normalize(leaf.meaning.param)
      for root, axis in declared:
        if (norm[: len(root)] == root and len(norm) > len(root) and not norm[len(root)].isdigit()
            and 0 <= axis < len(s.shape)):
          s = _OneLayer(s, axis)
          break
      subtrees[leaf.meaning.section]['/'.join(leaf.meaning.param)] = s
    else:
      entries.append((s, leaf.meaning, leaf.collection, ()))
  for section, leaves in subtrees.items():
    made_by: dict[str, tuple] = {}
    for path, expr in rules_lib.apply_all(rule_list, leaves, made_by, tally).items():
      expr = _with_layers(expr)
      first = ops.stored_leaves(expr)[0]
      param = tuple(p for p in path.split('/') if p)
      entries.append((expr, layout.Meaning(section, param), raw[first.path].collection, made_by.get(path, ())))
  return raw, entries


def _stack_guess(unfit, sources, source_layout, stacks) -> dict[Path, int]:
  """{stack root: layer axis} for the sources rules could not fit, where shapes tell it.

  The root is the longest model path above an unfit leaf under which at least
  two arrays sit and exactly one axis has the same size in all of them.
  """
  params: dict[Path, dict[Path, tuple]] = {}  # per section: model path -> shape
  of_path: dict[Path, Path] = {}
  for s, leaf in zip(sources, layout.describe([s.path for s in sources], source_layout)):
    if leaf.meaning.param:
      norm = stacks_lib.normalize(leaf.meaning.param)
      params.setdefault(leaf.meaning.section, {})[norm] = tuple(s.shape)
      of_path[s.path] = (leaf.meaning.section, norm)
  guessed: dict[Path, int] = {}
  for path in unfit:
    if path not in of_path:
      continue
    section, norm = of_path[path]
    for k in range(len(norm) - 1, 0, -1):
      root = norm[:k]
      if any(seg.isdigit() for seg in root) or stacks_lib.explicit_axis(stacks, root, source_layout, 'source') is not None:
        break
      shapes = [shape for p, shape in params[section].items() if p[:k] == root and len(p) > k]
      if len(shapes) < 2:
        continue
      axes = stacks_lib.common_axes(shapes)
      if len(axes) == 1:
        guessed[root] = axes[0]
        break
  return guessed


def build(
    sources: Sequence[SourceArray],
    targets: Sequence[Target],
    *,
    source_layout: str,
    target_layout: str,
    rules: rules_lib.Rules = None,
    partial: bool = False,
    stacks: stacks_lib.StackAxes | None = None,
    where: str = 'the checkpoint',
    problems: Sequence[str] = (),
    skip: Sequence[Path] = (),
    action: str | None = None,
    modules: Mapping[Path, tuple[int | None, str]] | None = None,
    _infer_stacks: bool = True,
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
  given = dict(sources=sources, targets=targets, source_layout=source_layout, target_layout=target_layout,
               rules=rules, partial=partial, where=where, problems=problems, skip=skip, action=action,
               modules=modules)
  linen_to_nnx = not (source_layout == layout.NNX and target_layout == layout.LINEN)
  problems = list(problems)  # found before planning (shardings, options): reported with the plan's
  rule_list, tally = _rules(rules, linen_to_nnx, problems)
  stacks = stacks_lib.checked(stacks, problems)
  tgt_leaves = layout.describe([t.path for t in targets], target_layout)
  # A Linen target with an `nnx_aux` subtree has a place for NNX-only state;
  # without one, such sources are skipped (reported, no error).
  aux_place = any(l.collection == layout.NNX_AUX for l in tgt_leaves)
  skip = set(skip)
  described = list(zip(sources, layout.describe([s.path for s in sources], source_layout)))
  for s, leaf in described:
    if (layout.is_rng_path(s.path) or leaf.collection == layout.NNX_AUX) and target_layout == layout.LINEN \
        and not aux_place:
      skip.add(s.path)
  skipped = [s for s in sources if s.path in skip]
  tally.targets = _target_shapes(targets, tgt_leaves, stacks, target_layout)
  raw, entries = _rewrite([(s, leaf) for s, leaf in described if s.path not in skip], rule_list, tally,
                          stacks, source_layout)
  problems += tally.problems
  problems += rules_lib.unmatched_problems(rule_list, tally)

  by_meaning: dict[layout.Meaning, list[tuple]] = collections.defaultdict(list)
  history: dict[int, tuple] = {}  # id(expr) -> rules that made it
  named_as: dict[int, str] = {}  # id(expr) -> what it means, as the source names it (layers not normalised)
  for expr, m, collection, made in entries:
    by_meaning[layout.Meaning(m.section, stacks_lib.normalize(m.param))].append((expr, collection))
    history[id(expr)] = made
    named_as[id(expr)] = str(m)
  for m, found in by_meaning.items():
    if len(found) > 1:
      names = ', '.join(f"'{layout.render(s.path)}'" for s, _ in found)
      problems.append(f"sources {names} all map to '{m}'; rename one of them with rules=")

  kept: list[Target] = []
  used: set[Path] = set()
  missing: list[tuple[Path, Target]] = []
  looked_for: dict[str, layout.Meaning] = {}  # what missing targets were looked for as
  layers = stacks_lib.LayerSources({m: found[0][0] for m, found in by_meaning.items()})

  direct, to_stack, to_unstack = [], [], []
  as_saved = set()  # nnx_aux holds NNX state as the NNX model holds it: no layer axis to move
  named = {}  # target path -> its model path as the target names it
  for t, leaf in zip(targets, tgt_leaves):
    named[t.path] = leaf.meaning.param
    m = layout.Meaning(leaf.meaning.section, stacks_lib.normalize(leaf.meaning.param))
    found = by_meaning.get(m)
    if found:
      s, collection = found[0]
      used.update(x.path for x in ops.stored_leaves(s))
      want = _COLLECTION_OF_TYPE.get(t.variable_type or '')
      if collection == layout.NNX_AUX:
        want = 'params' if want == 'params' else None  # nnx_aux holds every Variable type but Param
      if want and collection and collection != want:
        problems.append(
            f"{t} is an nnx.{t.variable_type} but {s} is in Linen collection"
            f" '{collection}' (expected '{want}')"
        )
      elif (k := _key_problem(t, s)) is not None:
        problems.append(k)
      else:
        direct.append((t, s, m.param))
        if layout.NNX_AUX in (collection, leaf.collection):
          as_saved.add(t.path)
      continue
    per_layer = layers.to_stack(m)
    if per_layer:
      root, by_index = per_layer
      to_stack.append((t, root, by_index))
      used.update(x.path for src in by_index.values() for x in ops.stored_leaves(src))
      continue
    stacked = layers.to_unstack(m)
    if stacked:
      root, src, index = stacked
      to_unstack.append((t, root, src, index))
      used.update(x.path for x in ops.stored_leaves(src))
      continue
    if t.nnx_only or partial:
      kept.append(t)
    else:
      missing.append((leaf.meaning, t))
      looked_for[str(leaf.meaning)] = leaf.meaning
      problems.append(f"{t} has no source (looked for '{leaf.meaning}')" + _near_misses(m, by_meaning, history, named_as))

  # target path -> (sources, layer transform)
  layer_ops = stacks_lib.plan([d for d in direct if d[0].path not in as_saved], to_stack, to_unstack, stacks,
                              source_layout, target_layout, problems)
  for name in stacks or ():
    root = stacks_lib.root_of(name)
    params = [m.param for m in by_meaning] + [stacks_lib.normalize(p) for p in named.values()]
    if not any(p[: len(root)] == root for p in params):
      roots = sorted({'/'.join(p[: k]) for p in params for k in range(1, len(p)) if p[k].isdigit()})
      problems.append(f"stacks= names {name!r}, which is no model path of the checkpoint or the target"
                      f" (layer stacks found: {', '.join(map(repr, roots)) or 'none per layer'})")
  reads = []
  for t, s, _ in direct:
    if t.path not in layer_ops and tuple(s.shape) != tuple(t.shape):
      problems.append(f'{t} cannot be read from {s}: shapes differ'
                      + _shape_fix(t, s, named[t.path], linen_to_nnx))
    else:
      layer_ops.setdefault(t.path, ((s,), ()))
  for t in targets:
    if t.path in layer_ops:
      srcs, transform = layer_ops[t.path]
      if _is_numpy_dtype(t.dtype) and np.dtype(srcs[0].dtype) != np.dtype(t.dtype):
        transform = transform + (Cast(np.dtype(srcs[0].dtype), np.dtype(t.dtype)),)
      made = tuple(dict.fromkeys(r for x in srcs for r in history.get(id(x), ())))
      reads.append(LeafRead(t, tuple(srcs), transform, made))

  # A target that holds only the model leaves the optimizer state and step
  # unread on purpose: report them as unused, but they are no error.
  model_only = all(l.meaning.section == ('model',) for l in tgt_leaves)
  unused_pairs = []
  for s in sources:
    if s.path in used or s.path not in raw or s.path in tally.dropped:
      continue
    m = raw[s.path].meaning
    unused_pairs.append((m, s))
    if not partial and not (model_only and m.section != ('model',)):
      problems.append(f'{s} is not used by any target' + _why_not(m, looked_for.get(str(m))))

  if problems:
    fixes = []
    suggestion, unsettled = _suggest_renames(missing, unused_pairs, linen_to_nnx, modules)
    if suggestion:
      fixes.append(_rename_fix(suggestion, unsettled, rules))
    if (missing or unused_pairs) and not action:  # a save has no partial: it writes the whole state
      fixes.append('pass partial=True to restore only the leaves that match')
    head = (action or f'LinenCompatRestore cannot restore from {where} ({source_layout} layout) into the'
            f' given {target_layout} state') + (f': {len(problems)} problem(s);'
                                                f' nothing was {"written" if action else "read"}.')
    tail = f"Fix: {'; or '.join(fixes)}." if fixes else ''
    error = PlanError('\n'.join([head] + [f'  {p}' for p in problems] + ([tail] if tail else [])))
    # Rules written for one layer fail on a stack whose layer axis nobody
    # stated. Where the source's shapes tell that axis unambiguously, plan
    # again with it; that plan is kept only if it has no problem at all.
    guessed = _stack_guess(tally.unfit, sources, source_layout, stacks) if _infer_stacks else {}
    if not guessed:
      raise error
    more = {k: dict(v) for k, v in (stacks or {}).items()}
    for root, axis in guessed.items():
      key = next((k for k in more if stacks_lib.root_of(k) == root), '/'.join(root))
      more.setdefault(key, {})['source'] = axis
    try:
      found = build(**given, stacks=more, _infer_stacks=False)
    except PlanError:
      hint = ', '.join(f"{'/'.join(r)!r}: {{'source': {a}}}" for r, a in guessed.items())
      raise PlanError(f'{error}\n(Rules written for one layer see one only under a stack whose layer axis'
                      f' stacks= states; the shapes suggest stacks={{{hint}}}, which did not plan either.)') from None
    notes = tuple(f"layer axis {a} of source stack '{'/'.join(r)}' inferred from its shapes: rules see one layer"
                  for r, a in guessed.items())
    return dataclasses.replace(found, notes=found.notes + notes)

  return RestorePlan(
      source_layout=source_layout,
      target_layout=target_layout,
      reads=tuple(reads),
      kept=tuple(kept),
      unused=tuple(s for _, s in unused_pairs),
      skipped=tuple(skipped),
      dropped=tuple((s, tally.dropped[s.path]) for s in sources if s.path in tally.dropped and s.path not in used),
      rules_matched=tuple((rule, tuple(sorted(paths))) for rule, paths in tally.matched.items()),
  )


# NNX state recomputed by every run and never saved (MaxText does not save it either).
_EPHEMERAL_TYPES = frozenset({'Cache', 'Intermediate'})


def _declared(param: Path, stacks, side: str) -> tuple[Path, dict] | None:
  """The stack root above `param` whose layer axis the user declared for `side`, and its axes."""
  norm = stacks_lib.normalize(param)
  for name, axes in (stacks or {}).items():
    root = stacks_lib.root_of(name)
    if norm[: len(root)] == root and len(norm) > len(root) and isinstance(axes, dict) and side in axes:
      return root, axes
  return None


def _depths(entries, stacks, side: str) -> dict[Path, int]:
  """Layers per declared stack root that the source holds one module per layer (`layers/3/...`)."""
  depth: dict[Path, int] = {}
  for _, m, _, _ in entries:
    found = _declared(m.param, stacks, side) if m.param else None
    if found:
      root, _ = found
      index = stacks_lib.normalize(m.param)[len(root)]
      if index.isdigit():
        depth[root] = max(depth.get(root, 0), int(index) + 1)
  return depth


# Where each layout keeps a stack's layer axis when the user names only the other side's.
_DEFAULT_LAYER_AXIS = {layout.NNX: stacks_lib.NNX_LAYER_AXIS, layout.LINEN: 1}  # nnx.vmap; nn.scan (MaxText)
_NAMES = {layout.LINEN: layout.linen_names, layout.NNX: layout.nnx_names}  # per-layer: layers_3, layers/3


def _placed(param: Path, shape: tuple[int, ...], stacks, depth, to: str, problems: list[str]) -> list[tuple[Path, tuple]]:
  """Where a model variable (or its mirror) goes in layout `to`: [(its names there, shape)].

  Per-layer names follow `to` (`layers_3` in Linen, `layers/3` in NNX). Under a
  stack the user declared a layer axis for on the `to` side, a stack has its
  layer axis moved there, or, with `None`, is cut into one array per layer;
  per-layer modules are stacked at that axis (the target is named once, by
  layer 0; the planner gathers every layer into it).
  """
  names = _NAMES[to]
  found = _declared(param, stacks, to)
  if found is None:
    return [(names(param), shape)]
  root, axes = found
  frm = layout.NNX if to == layout.LINEN else layout.LINEN
  norm = stacks_lib.normalize(param)
  if norm[len(root)].isdigit():  # one module per layer
    if axes[to] is None:
      return [(names(param), shape)]
    if norm[len(root)] != '0':
      return []
    return [(names(root) + names(norm[len(root) + 1:]), stacks_lib.insert_axis(shape, int(axes[to]), depth[root]))]
  source = axes.get(frm, _DEFAULT_LAYER_AXIS[frm])
  if source is None or not 0 <= int(source) < len(shape):
    problems.append(f"'{layout.render(param)}' {shape} cannot be a layer stack at axis {source}"
                    f" (stacks={{{str(root[0])!r}: {axes!r}}}); give the {frm} layer axis as {frm!r}: axis")
    return [(names(param), shape)]
  rest = names(norm[len(root):])
  if axes[to] is None:
    return [(names(root + (str(i),)) + rest, stacks_lib.drop_axis(shape, source))
            for i in range(shape[source])]
  return [(names(param), stacks_lib.move_axis(shape, source, int(axes[to])))]


def _with_source_axis(stacks, source: str, to: str) -> dict:
  """`stacks` where a stack named only on the `to` side gets the source layout's usual layer axis."""
  return {k: ({source: _DEFAULT_LAYER_AXIS[source], **v} if to in v else v) for k, v in (stacks or {}).items()}


def _rewritten(described, rules, stacks, source: str, to: str) -> tuple[list, dict[Path, int], bool]:
  """The sources after the rules (`_rewrite`'s entries), per-layer stacks' depths, and whether it is a train state."""
  rule_list, tally = _rules(rules, source == layout.LINEN, [])  # build reports the rules' own problems
  _, entries = _rewrite(described, rule_list, tally, stacks, source)
  return entries, _depths(entries, stacks, to), any(leaf.meaning.section != ('model',) for _, leaf in described)


def nnx_only_type(vtype: str | None) -> bool:
  """A persistent NNX Variable type Linen has no collection for (RNG streams, custom Variables)."""
  return vtype not in (None, 'Param', 'BatchStat') and vtype not in _EPHEMERAL_TYPES


def build_save(
    sources: Sequence[SourceArray],
    variable_types: Mapping[Path, str | None],
    *,
    rules: rules_lib.Rules = None,
    stacks: stacks_lib.StackAxes | None = None,
    aux: str | None = layout.NNX_AUX,
    targets: Sequence[Target] | None = None,
    action: str = 'LinenCompatSave cannot write the NNX state in the Linen layout',
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
  `targets` (a Linen abstract state's leaves) replaces the derived tree: the
  state is written as exactly that tree. The pairing itself is `build`'s, so a
  plan that `build` can make back (`LinenCompatRestore` with the same rules
  and stacks) restores it.

  >>> src = [SourceArray(('model', 'fc1', 'kernel'), 'model/fc1/kernel', (3, 8), 'float32')]
  >>> print(build_save(src, {src[0].path: 'Param'}, rules={'Dense_0': 'fc1'}).reads[0])
  params/Dense_0/kernel (3, 8) float32  <-  model/fc1/kernel  (by rename fc1)
  """
  problems: list[str] = []  # build reports the rules' own problems
  if aux not in layout.AUX_PLACES:
    problems.append(f'aux={aux!r}: NNX-only state goes in {layout.SIDECAR!r} (beside the Linen tree),'
                    f' {layout.NNX_AUX!r} (in it, as MaxText writes it) or, with aux=None, nowhere')
    aux = layout.SIDECAR
  stacks = _with_source_axis(stacks_lib.checked(stacks, problems), layout.NNX, layout.LINEN)
  described = list(zip(sources, layout.describe([s.path for s in sources], layout.NNX)))
  skip = [s.path for s, leaf in described if variable_types.get(s.path) in _EPHEMERAL_TYPES
          or (aux is None and nnx_only_type(variable_types.get(s.path)) and leaf.meaning.section == ('model',))]
  described = [(s, leaf) for s, leaf in described if s.path not in skip]
  entries, depth, train_state = _rewritten(described, rules, stacks, layout.NNX, layout.LINEN)
  kinds = {m: variable_types.get(ops.stored_leaves(expr)[0].path) for expr, m, _, _ in entries}
  # Batch statistics beside the params (Flax's BatchNorm guide): `params` then holds variables['params'].
  stats = aux != layout.NNX_AUX and any(k == 'BatchStat' for m, k in kinds.items() if m.section == ('model',))
  derived = []
  for expr, m, _, _ in entries:
    first = ops.stored_leaves(expr)[0]
    vtype, key_impl = kinds[m], getattr(expr, 'key_impl', None)
    shape, dtype = tuple(expr.shape), expr.dtype
    if m.section == ('step',):
      derived.append(Target(('step',), shape, np.dtype('int32'), None))  # Linen's TrainState.step
      continue
    if m.section == ('model',) and (nnx_only_type(vtype) or (vtype == 'BatchStat' and not stats)):
      derived.append(Target((layout.NNX_AUX, 'model') + m.param, shape, dtype, None, key_impl=key_impl))
      continue
    if m.section == ('model',):
      base = ('batch_stats',) if vtype == 'BatchStat' else ('params', 'params') if train_state and not stats \
          else ('params',)
    elif m.section[0] == 'opt_state':
      base = m.section + (('params',) if m.param and not stats else ())
    else:
      problems.append(f"{first} is neither model, optimizer state nor step of an NNX train state"
                      " ({'model': ..., 'optimizer': nnx.Optimizer}); save it with ocp.args.StandardSave")
      continue
    if not m.param:
      derived.append(Target(base, shape, dtype, None, key_impl=key_impl))
      continue
    for param, s in _placed(m.param, shape, stacks, depth, layout.LINEN, problems):
      derived.append(Target(base + param, s, dtype, None, key_impl=key_impl))
  if targets is not None:
    # Exactly the caller's Linen tree; NNX-only state it has no place for goes in `aux`'s place.
    aux_in_target = any(t.path[:1] == (layout.NNX_AUX,) for t in targets)
    extra = [t for t in derived if t.path[:1] == (layout.NNX_AUX,) and not aux_in_target and aux == layout.SIDECAR]
    derived = list(targets) + extra
  derived.sort(key=lambda t: t.path)
  plan = build(sources, derived, source_layout=layout.NNX, target_layout=layout.LINEN, rules=rules,
               stacks=stacks, where='the NNX state', problems=problems, skip=skip, action=action)
  aside = [r for r in plan.reads if r.target.path[:1] == (layout.NNX_AUX,)] if aux == layout.SIDECAR else []
  if aside and not (targets is not None and any(t.path[:1] == (layout.NNX_AUX,) for t in targets)):
    plan = dataclasses.replace(plan, notes=plan.notes + (
        f'{len(aside)} nnx_aux/ arrays (RNG streams, custom Variables) are written beside the Linen tree, in the'
        " item's nnx_aux/ directory: Linen readers never see them, LinenCompatRestore reads them back",))
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
  `params` level, a uint32 `optimizer/step/value`; per-layer modules as
  `layers/3/...`. The rules (Linen -> NNX) name and shape it; `stacks` moves a
  stack's layer axis (`{'layers': {'linen': 1, 'nnx': 0}}`), unrolls it
  (`{'layers': {'nnx': None}}` -> `layers/0`, ...) or stacks `layers_N`
  (`{'layers': {'nnx': 0}}`). A Linen stack's axis defaults to `nn.scan`'s 1.

  >>> src = [SourceArray(('params', 'Dense_0', 'kernel'), 'params.Dense_0.kernel', (3, 8), 'float32')]
  >>> print(build_nnx(src, rules={'Dense_0': 'fc1'}).reads[0])
  fc1/kernel/value (3, 8) float32  <-  params.Dense_0.kernel  (by rename Dense_0)
  """
  problems: list[str] = []
  stacks = _with_source_axis(stacks_lib.checked(stacks, problems), layout.LINEN, layout.NNX)
  described = list(zip(sources, layout.describe([s.path for s in sources], layout.LINEN)))
  entries, depth, train_state = _rewritten(described, rules, stacks, layout.LINEN, layout.NNX)
  targets = []
  for expr, m, _, _ in entries:
    shape, dtype, key_impl = tuple(expr.shape), expr.dtype, getattr(expr, 'key_impl', None)
    if m.section == ('step',):
      targets.append(Target(('optimizer', 'step', 'value'), shape, np.dtype('uint32'), None))  # nnx.Optimizer's
      continue
    if m.section == ('model',):
      base = ('model',) if train_state else ()
    elif m.section[0] == 'opt_state':
      base = ('optimizer',) + m.section
    else:
      problems.append(f"{ops.stored_leaves(expr)[0]} is neither model variables, optimizer state nor step"
                      " of a Linen TrainState; give the NNX tree it goes to (a target)")
      continue
    for param, s in (_placed(m.param, shape, stacks, depth, layout.NNX, problems) if m.param else [((), shape)]):
      targets.append(Target(base + param + ('value',), s, dtype, None, key_impl=key_impl))
  targets.sort(key=lambda t: t.path)
  return build(sources, targets, source_layout=layout.LINEN, target_layout=layout.NNX, rules=rules,
               stacks=stacks, where=where, problems=problems)

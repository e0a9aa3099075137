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
import re
from typing import Any, Sequence

import numpy as np

from orbax_linen_nnx import layout
from orbax_linen_nnx import rules as rules_lib
from orbax_linen_nnx import stacks as stacks_lib
from orbax_linen_nnx.ops import Cast, MoveAxis, Stack, Take

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

  def __str__(self) -> str:
    return f"source '{layout.render(self.path)}' {_fmt(self.shape, self.dtype)}"


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

  @property
  def nnx_only(self) -> bool:
    """State Linen never saves (RNG keys and counts)."""
    return self.variable_type in ('RngKey', 'RngCount', 'RngState') or layout.is_rng_path(self.path)

  def __str__(self) -> str:
    return f"target '{layout.render(self.path)}' {_fmt(self.shape, self.dtype)}"


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
  (`rules.Derived`). `transform` is applied in order to lazy views of the
  sources; empty means the target is the source as it is. `rules` names the
  rules that produced the sources.
  """

  target: Target
  sources: tuple[Any, ...]
  transform: tuple[Any, ...] = ()
  rules: tuple[str, ...] = ()

  def __str__(self) -> str:
    names = _compact([s.name for s in self.sources])
    ops = f"  [{'; '.join(str(t) for t in self.transform)}]" if self.transform else ''
    made = f"  (by {', '.join(self.rules)})" if self.rules else ''
    return (
        f'{layout.render(self.target.path)} {_fmt(self.target.shape, self.target.dtype)}'
        f'  <-  {names}{ops}{made}'
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
  """

  source_layout: str
  target_layout: str
  reads: tuple[LeafRead, ...]
  kept: tuple[Target, ...] = ()
  unused: tuple[SourceArray, ...] = ()
  skipped: tuple[SourceArray, ...] = ()

  def __str__(self) -> str:
    lines = [
        f'{self.source_layout} -> {self.target_layout}: {len(self.reads)} arrays to'
        f' read, {len(self.kept)} kept as given, {len(self.unused)} unused sources,'
        f' {len(self.skipped)} NNX-only sources skipped'
    ]
    lines += [f'  {r}' for r in self.reads]
    lines += [
        f"  kept    {layout.render(t.path)} {_fmt(t.shape, t.dtype)}"
        f"  ({'NNX-only state' if t.nnx_only else 'no source'})"
        for t in self.kept
    ]
    lines += [f'  unused  {s.name} {_fmt(s.shape, s.dtype)}' for s in self.unused]
    lines += [f'  skipped {s.name} {_fmt(s.shape, s.dtype)} (NNX-only)' for s in self.skipped]
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


# Which Linen collection each NNX variable type lives in.
_COLLECTION_OF_TYPE = {'Param': 'params', 'BatchStat': 'batch_stats', 'Cache': 'cache',
                       'Intermediate': 'intermediates'}


def _suggest_renames(missing: Sequence[tuple[Path, Target]],
                     unused: Sequence[tuple[Path, SourceArray]],
                     linen_to_nnx: bool) -> dict[str, str]:
  """Guesses module renames from missing targets and unused sources of equal shape."""
  pool = collections.defaultdict(list)
  for param, s in unused:
    if param:
      pool[(param[-1], tuple(s.shape))].append(param)
  suggestion: dict[str, str] = {}
  for param, t in missing:
    candidates = pool.get((param[-1], tuple(t.shape))) if param else None
    if not candidates:
      continue
    src = candidates.pop(0)
    # Drop the common suffix: ('Dense_0', 'kernel') vs ('fc1', 'kernel') -> Dense_0 -> fc1.
    n = 0
    while n < min(len(src), len(param)) - 1 and src[-1 - n] == param[-1 - n]:
      n += 1
    a, b = layout.render(src[: len(src) - n]), layout.render(param[: len(param) - n])
    linen, nnx_name = (a, b) if linen_to_nnx else (b, a)
    suggestion.setdefault(linen, nnx_name)
  return suggestion


def _choose(root: Path, entries, candidates: list[set], explicit, hint: str, problems: list[str],
            conventional=lambda choice: False):
  """The one layer-axis choice that fits every leaf of a stack, or None (problem noted).

  Shapes decide; where several choices fit, the one that `conventional` accepts
  (NNX's layer axis 0) settles it if it is the only such one.
  """
  if explicit is not None:
    return explicit
  common = set.intersection(*candidates) if candidates else set()
  usual = {c for c in common if conventional(c)}
  if len(common) == 1 or len(usual) == 1:
    return (common if len(common) == 1 else usual).pop()
  name = layout.render(root)
  if common:
    problems.append(f"cannot tell the layer axis of stack '{name}': {sorted(common)} all fit"
                    f' every leaf (a dimension equals the layer count); {hint}')
  else:
    fits = '; '.join(f'{t} fits {sorted(c) or "none"}' for (t, *_), c in zip(entries, candidates))
    problems.append(f"no layer axis fits every leaf of stack '{name}' ({fits}); {hint}")
  return None


def _stack(entries, stacks, source_layout, target_layout, problems) -> dict:
  """Per-layer sources -> one stacked target, grouped by stack root."""
  groups = collections.defaultdict(list)
  for t, root, layers in entries:
    groups[root].append((t, layers))
  out = {}
  for root, group in groups.items():
    n = max(max(layers) for _, layers in group) + 1
    ok = []
    for t, layers in group:
      gaps = sorted(set(range(n)) - set(layers))
      srcs = [layers[i] for i in sorted(layers)]
      odd = [x for x in srcs if (tuple(x.shape), x.dtype) != (tuple(srcs[0].shape), srcs[0].dtype)]
      if gaps:
        problems.append(f"{t} stacks layers 0..{n - 1} of '{layout.render(root)}' but layer(s)"
                        f' {gaps} have no source (next to {srcs[0]})')
      elif odd:
        problems.append(f'{t}: the layers to stack differ: {srcs[0]} but {odd[0]}')
      else:
        wanted = [t.shape[a] for a in range(len(t.shape)) if stacks_lib.insert_axis(srcs[0].shape, a, t.shape[a]) == tuple(t.shape)]
        if wanted and n not in wanted:
          problems.append(f"{t} holds {wanted[0]} layers of '{layout.render(root)}' but the"
                          f' checkpoint has layers 0..{n - 1} only; layer(s)'
                          f' {list(range(n, wanted[0]))} are missing')
        else:
          ok.append((t, srcs))
    if not ok:
      continue
    axis = _choose(root, ok, [stacks_lib.stack_axes(srcs[0].shape, t.shape, n) for t, srcs in ok],
                   stacks_lib.explicit_axis(stacks, root, target_layout, 'target'),
                   stacks_lib.hint(root, source_layout, target_layout), problems,
                   lambda b: target_layout == layout.NNX and b == stacks_lib.NNX_LAYER_AXIS)
    for t, srcs in ok if axis is not None else ():
      if stacks_lib.insert_axis(srcs[0].shape, axis, n) != tuple(t.shape):
        problems.append(f'{t} cannot be stacked from {n} x {srcs[0]} at axis {axis}')
      else:
        out[t.path] = (tuple(srcs), (Stack(axis),))
  return out


def _unstack(entries, stacks, source_layout, target_layout, problems) -> dict:
  """One stacked source -> per-layer targets, grouped by stack root."""
  groups = collections.defaultdict(list)
  for t, root, src, index in entries:
    groups[root].append((t, src, index))
  out = {}
  for root, group in groups.items():
    n = max(i for _, _, i in group) + 1
    cands = [{a for a in range(len(s.shape)) if stacks_lib.drop_axis(s.shape, a) == tuple(t.shape)
              and s.shape[a] == n} for t, s, _ in group]
    axis = _choose(root, group, cands, stacks_lib.explicit_axis(stacks, root, source_layout, 'source'),
                   stacks_lib.hint(root, source_layout, target_layout), problems,
                   lambda a: source_layout == layout.NNX and a == stacks_lib.NNX_LAYER_AXIS)
    for t, s, i in group if axis is not None else ():
      if stacks_lib.drop_axis(s.shape, axis) != tuple(t.shape) or i >= s.shape[axis]:
        problems.append(f'{t} cannot be layer {i} of {s} along axis {axis}')
      else:
        out[t.path] = ((s,), (Take(axis, i),))
  return out


def _move(direct, stacks, source_layout, target_layout, problems) -> dict:
  """Stacked source -> stacked target with the layer axis elsewhere."""
  out = {}
  for t, s, param in direct:  # stacks the user declared: every leaf under them moves
    for name in stacks or {}:
      root = stacks_lib.normalize(tuple(p for p in name.split('/') if p))
      a = stacks_lib.explicit_axis(stacks, root, source_layout, 'source')
      b = stacks_lib.explicit_axis(stacks, root, target_layout, 'target')
      if param[: len(root)] == root and None not in (a, b) and a != b:
        if stacks_lib.move_axis(s.shape, a, b) == tuple(t.shape):
          out[t.path] = ((s,), (MoveAxis(a, b),))
        else:
          problems.append(f'{t} cannot be {s} with its layer axis moved {a} -> {b}')
  groups = collections.defaultdict(list)
  for t, s, param in direct:
    if t.path not in out and tuple(s.shape) != tuple(t.shape):
      groups[param[:1]].append((t, s, param))
  for group in groups.values():
    params = [p for _, _, p in group]
    root = params[0][: min(len(p) for p in params) - 1]
    while any(p[: len(root)] != root for p in params):
      root = root[:-1]
    cands = [stacks_lib.move_candidates(s.shape, t.shape) for t, s, _ in group]
    if not all(cands):
      continue  # some leaf is no stack at all: reported as a shape mismatch
    nnx_axis = stacks_lib.NNX_LAYER_AXIS
    choice = _choose(root, group, cands, None, stacks_lib.hint(root, source_layout, target_layout), problems,
                     lambda c: (source_layout != layout.NNX or c[0] == nnx_axis)
                     and (target_layout != layout.NNX or c[1] == nnx_axis))
    if choice is None:
      continue
    a, b, n = choice
    for t, s, param in direct:  # same-shape leaves of the stack (square dims) move too
      if (t.path not in out and param[: len(root)] == root and len(s.shape) > a
          and s.shape[a] == n and stacks_lib.move_axis(s.shape, a, b) == tuple(t.shape)):
        out[t.path] = ((s,), (MoveAxis(a, b),))
  return out


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
) -> RestorePlan:
  """Pairs every target leaf with its source array(s), from metadata alone.

  Raises `PlanError` listing every problem (targets with no source, sources
  nothing uses, shapes that differ, ambiguous sources) before any read.

  >>> src = [SourceArray(('params', 'Dense_0', 'kernel'), 'params.Dense_0.kernel', (3, 8), 'float32')]
  >>> tgt = [Target(('fc1', 'kernel'), (3, 8), 'float32', None)]
  >>> build(src, tgt, source_layout='linen', target_layout='nnx', rules={'Dense_0': 'fc1'}).reads[0].sources[0].name
  'params.Dense_0.kernel'
  """
  linen_to_nnx = not (source_layout == layout.NNX and target_layout == layout.LINEN)
  problems: list[str] = []
  try:
    rule_list = rules_lib.as_rules(rules, backward=not linen_to_nnx)
  except rules_lib.RuleError as e:
    problems.append(str(e))
    rule_list = []
  tally = rules_lib.Tally()

  # Rules rewrite each model subtree (the params, and every optimizer subtree
  # that mirrors them) into arrays named and shaped as on the target side.
  src_leaves = layout.describe([s.path for s in sources], source_layout)
  skipped, entries = [], []
  raw: dict[Path, layout.Leaf] = {}  # source path -> what it means, before any rule
  subtrees: dict[Path, dict[str, Any]] = collections.defaultdict(dict)
  for s, leaf in zip(sources, src_leaves):
    if layout.is_rng_path(s.path) and target_layout == layout.LINEN:
      skipped.append(s)
      continue
    raw[s.path] = leaf
    if leaf.meaning.param:
      subtrees[leaf.meaning.section]['/'.join(leaf.meaning.param)] = s
    else:
      entries.append((s, leaf.meaning, leaf.collection, ()))
  for section, leaves in subtrees.items():
    made_by: dict[str, tuple] = {}
    for path, expr in rules_lib.apply_all(rule_list, leaves, made_by, tally).items():
      first = rules_lib.stored_leaves(expr)[0]
      param = tuple(p for p in path.split('/') if p)
      entries.append((expr, layout.Meaning(section, param), raw[first.path].collection, made_by.get(path, ())))
  problems += tally.problems
  problems += [f"rule '{name}' matched no source leaf" for name in rules_lib.unmatched(rule_list, tally)]

  by_meaning: dict[layout.Meaning, list[tuple]] = collections.defaultdict(list)
  history: dict[int, tuple] = {}  # id(expr) -> rules that made it
  for expr, m, collection, made in entries:
    by_meaning[layout.Meaning(m.section, stacks_lib.normalize(m.param))].append((expr, collection))
    history[id(expr)] = made
  for m, found in by_meaning.items():
    if len(found) > 1:
      names = ', '.join(f"'{layout.render(s.path)}'" for s, _ in found)
      problems.append(f"sources {names} all map to '{m}'; rename one of them with rules=")

  kept: list[Target] = []
  used: set[Path] = set()
  missing: list[tuple[Path, Target]] = []
  tgt_leaves = layout.describe([t.path for t in targets], target_layout)
  # Per-layer sources by (section, param without its layer index, index position).
  per_layer: dict[tuple, dict[int, SourceArray]] = collections.defaultdict(dict)
  for m, found in by_meaning.items():
    for k, seg in enumerate(m.param):
      if k and seg.isdigit():
        per_layer[(m.section, m.param[:k] + m.param[k + 1:], k)][int(seg)] = found[0][0]

  direct, to_stack, to_unstack = [], [], []
  for t, leaf in zip(targets, tgt_leaves):
    m = layout.Meaning(leaf.meaning.section, stacks_lib.normalize(leaf.meaning.param))
    found = by_meaning.get(m)
    if found:
      s, collection = found[0]
      used.update(x.path for x in rules_lib.stored_leaves(s))
      want = _COLLECTION_OF_TYPE.get(t.variable_type or '')
      if want and collection and collection != want:
        problems.append(
            f"{t} is an nnx.{t.variable_type} but {s} is in Linen collection"
            f" '{collection}' (expected '{want}')"
        )
      else:
        direct.append((t, s, m.param))
      continue
    layers = next(((k, per_layer[(m.section, m.param, k)]) for k in range(1, len(m.param))
                   if (m.section, m.param, k) in per_layer), None)
    if layers:
      to_stack.append((t, m.param[:layers[0]], layers[1]))
      used.update(x.path for src in layers[1].values() for x in rules_lib.stored_leaves(src))
      continue
    stacked = next(((k, by_meaning[layout.Meaning(m.section, m.param[:k] + m.param[k + 1:])][0][0])
                    for k in range(1, len(m.param)) if m.param[k].isdigit()
                    and layout.Meaning(m.section, m.param[:k] + m.param[k + 1:]) in by_meaning), None)
    if stacked:
      k, src = stacked
      to_unstack.append((t, m.param[:k], src, int(m.param[k])))
      used.update(x.path for x in rules_lib.stored_leaves(src))
      continue
    if t.nnx_only or partial:
      kept.append(t)
    else:
      missing.append((leaf.meaning.param, t))
      problems.append(f"{t} has no source (looked for '{leaf.meaning}')")

  layer_ops = {}  # target path -> (sources, layer transform)
  layer_ops.update(_stack(to_stack, stacks, source_layout, target_layout, problems))
  layer_ops.update(_unstack(to_unstack, stacks, source_layout, target_layout, problems))
  layer_ops.update(_move(direct, stacks, source_layout, target_layout, problems))
  reads = []
  for t, s, _ in direct:
    if t.path not in layer_ops and tuple(s.shape) != tuple(t.shape):
      problems.append(f'{t} cannot be read from {s}: shapes differ')
    else:
      layer_ops.setdefault(t.path, ((s,), ()))
  for t in targets:
    if t.path in layer_ops:
      srcs, ops = layer_ops[t.path]
      if _is_numpy_dtype(t.dtype) and np.dtype(srcs[0].dtype) != np.dtype(t.dtype):
        ops = ops + (Cast(np.dtype(srcs[0].dtype), np.dtype(t.dtype)),)
      made = tuple(dict.fromkeys(r for x in srcs for r in history.get(id(x), ())))
      reads.append(LeafRead(t, tuple(srcs), ops, made))

  # A target that holds only the model leaves the optimizer state and step
  # unread on purpose: report them as unused, but they are no error.
  model_only = all(l.meaning.section == ('model',) for l in tgt_leaves)
  unused_pairs = []
  for s in sources:
    if s.path in used or s.path not in raw:
      continue
    m = raw[s.path].meaning
    unused_pairs.append((m.param, s))
    if not partial and not (model_only and m.section != ('model',)):
      problems.append(f'{s} is not used by any target')

  if problems:
    fixes = []
    suggestion = _suggest_renames(missing, unused_pairs, linen_to_nnx)
    if suggestion:
      fixes.append(f'rename modules with rules={suggestion!r}')
    if missing or unused_pairs:
      fixes.append('pass partial=True to restore only the leaves that match')
    head = (
        f'LinenCompatRestore cannot restore from {where} ({source_layout} layout)'
        f' into the given {target_layout} state: {len(problems)} problem(s);'
        ' nothing was read.'
    )
    tail = f"Fix: {'; or '.join(fixes)}." if fixes else ''
    raise PlanError('\n'.join([head] + [f'  {p}' for p in problems] + ([tail] if tail else [])))

  return RestorePlan(
      source_layout=source_layout,
      target_layout=target_layout,
      reads=tuple(reads),
      kept=tuple(kept),
      unused=tuple(s for _, s in unused_pairs),
      skipped=tuple(skipped),
  )

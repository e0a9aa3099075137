"""Layer stacks: pairing per-layer leaves with stacked ones, and finding the layer axis.

Four layouts hold the same blocks (see README):

    linen loop      layers_0/mlp/kernel (D, D) ... layers_{N-1}/...
    nnx unrolled    layers/0/mlp/kernel (D, D) ...
    linen nn.scan   layers/mlp/kernel (D, N, D)      layer axis 1 (MaxText)
    nnx vmap/scan   layers/mlp/kernel (N, D, D)      layer axis 0

Per-layer names are normalised (`layers_3` and `layers/3` both become
('layers', '3')), so the two per-layer layouts match directly. Between a
per-layer and a stacked layout a target is *stacked* from N sources or
*unstacked* (one index of a source); between two stacked layouts the layer axis
is *moved*. The layer axis of each stack is inferred from the shapes of all its
leaves at once (params and optimizer moments alike) and must come out unique;
otherwise the user states it with `stacks={'layers': {'linen': 1, 'nnx': 0}}`.
Pure: shapes in, plan entries (sources and ops) out; the planner only asks.
"""

from __future__ import annotations

import collections
from typing import Mapping, Sequence

from orbax_linen_nnx import layout
from orbax_linen_nnx import ops

Path = layout.Path
StackAxes = Mapping[str, Mapping[str, 'int | None']]

normalize = layout.normalize_layers


def insert_axis(shape: Sequence[int], axis: int, n: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + (n,) + tuple(shape[axis:])


def drop_axis(shape: Sequence[int], axis: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def move_axis(shape: Sequence[int], source: int, destination: int) -> tuple[int, ...]:
  return insert_axis(drop_axis(shape, source), destination, shape[source])


def stack_axes(per_layer: Sequence[int], stacked: Sequence[int], n: int) -> set[int]:
  """Axes at which inserting n layers into `per_layer` gives `stacked`."""
  return {a for a in range(len(stacked)) if insert_axis(per_layer, a, n) == tuple(stacked)}


def common_axes(shapes: Sequence[Sequence[int]]) -> list[int]:
  """Axes that have one size in every shape (a stack's layer axis is one of them)."""
  return [a for a in range(min(map(len, shapes))) if len({s[a] for s in shapes}) == 1]


def move_candidates(source: Sequence[int], target: Sequence[int]) -> set[tuple[int, int, int]]:
  """(source axis, target axis, layer count) that turn `source` into `target`."""
  if len(source) != len(target):
    return set()
  return {(a, b, source[a]) for a in range(len(source)) for b in range(len(target))
          if a != b and move_axis(source, a, b) == tuple(target)}


def root_of(name: str) -> Path:
  """A `stacks=` key ('decoder/layers') as the normalised model path of its stack root."""
  return normalize(tuple(p for p in str(name).split('/') if p))


def checked(stacks, problems: list[str]) -> StackAxes | None:
  """`stacks` if it is a dict of dicts; else None, with the problem noted."""
  if stacks is None or (isinstance(stacks, dict) and all(isinstance(v, dict) for v in stacks.values())):
    return stacks
  problems.append(f"stacks= must be a dict like {{'layers': {{'linen': 1, 'nnx': 0}}}}; got {stacks!r}")
  return None


def explicit_axis(stacks: StackAxes | None, root: Path, layout_name: str, role: str) -> int | None:
  """The layer axis the user stated for the stack at `root`, by layout or by role.

  `stacks={'layers': {'linen': 1, 'nnx': 0}}` serves both directions;
  `{'layers': {'source': 1, 'target': 0}}` also works between two stacked
  layouts of the same library. An axis of None says that side holds one array
  per layer (`layers_0`, ...): what `LinenCompatSave` writes for
  `{'layers': {'linen': None}}`.
  """
  for name, axes in (stacks or {}).items():
    if root_of(name) == root:
      for key in (role, layout_name):
        if axes.get(key) is not None:  # None: that side holds one array per layer
          return int(axes[key])
  return None


# nnx.vmap / nnx.scan put the layer axis first (in_axes=0, out_axes=0). When the
# shapes alone leave a choice, an NNX side with the layer axis at 0 is preferred.
NNX_LAYER_AXIS = 0


def hint(root: Path, source_layout: str, target_layout: str) -> str:
  if source_layout != target_layout:
    example = {source_layout: 1, target_layout: 0}
  else:
    example = {'source': 1, 'target': 0}
  return f'pass stacks={{{layout.render(root)!r}: {example!r}}} (the layer axis on each side)'


class LayerSources:
  """Finds, for a target no source matches directly, the layers to stack or the stack to cut.

  `sources` maps each source's layout-free `Meaning` (its per-layer names
  normalised) to the source.
  """

  def __init__(self, sources):
    self._sources = sources
    # Per-layer sources by (section, param without its layer index, index position).
    self._per_layer = collections.defaultdict(dict)
    for m, src in sources.items():
      for k, seg in enumerate(m.param):
        if k and seg.isdigit():
          self._per_layer[(m.section, m.param[:k] + m.param[k + 1:], k)][int(seg)] = src

  def to_stack(self, m):
    """(stack root, {layer index: source}) of the per-layer sources a stacked target `m` gathers."""
    for k in range(1, len(m.param)):
      if (m.section, m.param, k) in self._per_layer:
        return m.param[:k], self._per_layer[(m.section, m.param, k)]
    return None

  def to_unstack(self, m):
    """(stack root, stacked source, layer index) that a per-layer target `m` is one layer of."""
    for k in range(1, len(m.param)):
      if m.param[k].isdigit():
        stacked = self._sources.get(layout.Meaning(m.section, m.param[:k] + m.param[k + 1:]))
        if stacked is not None:
          return m.param[:k], stacked, int(m.param[k])
    return None


def plan(direct, to_stack, to_unstack, stacks, source_layout, target_layout, problems) -> dict:
  """{target path: (sources, layer ops)} for every stack, unstack and layer-axis move.

  `direct` holds (target, source, param) pairs matched by name (the layer axis
  may still move between them), `to_stack` (target, root, {index: source}),
  `to_unstack` (target, root, source, index). Problems are added to `problems`.
  """
  out = {}
  out.update(_stack(to_stack, stacks, source_layout, target_layout, problems))
  out.update(_unstack(to_unstack, stacks, source_layout, target_layout, problems))
  # Layer counts that per-layer leaves of a stack tell (a converter's per-layer
  # moments beside stacked params): a move of that stack's axis must keep them.
  depth = {}
  for _, root, layers in to_stack:
    depth[root] = max(depth.get(root, 0), max(layers) + 1)
  for _, root, _, index in to_unstack:
    depth[root] = max(depth.get(root, 0), index + 1)
  out.update(_move(direct, stacks, source_layout, target_layout, problems, depth))
  return out


def _choose(root: Path, entries, candidates: list[set], explicit, fix: str, problems: list[str],
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
                    f' every leaf (a dimension equals the layer count); {fix}')
  else:
    fits = '; '.join(f'{t} fits {sorted(c) or "none"}' for (t, *_), c in zip(entries, candidates))
    problems.append(f"no layer axis fits every leaf of stack '{name}' ({fits}); {fix}")
  return None


def _kind(t) -> str:
  """Which leaves of a stack share one layer axis.

  Params and the optimizer state that mirrors them share one; the other model
  state under the same root (batch stats, RNG streams, custom Variables) may
  have its own: MaxText's scanned NNX decoders stack params at
  `param_scan_axis` (1) and that state at 0.
  """
  vt = t.variable_type
  return 'params' if vt is None or vt == 'Param' or vt.startswith('Opt') else 'state'


def _stack(entries, stacks, source_layout, target_layout, problems) -> dict:
  """Per-layer sources -> one stacked target, grouped by stack root (and kind, see `_kind`)."""
  groups = collections.defaultdict(list)
  for t, root, layers in entries:
    groups[root, _kind(t)].append((t, layers))
  out = {}
  for (root, _), group in groups.items():
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
        wanted = [t.shape[a] for a in range(len(t.shape)) if insert_axis(srcs[0].shape, a, t.shape[a]) == tuple(t.shape)]
        if wanted and n not in wanted:
          problems.append(f"{t} holds {wanted[0]} layers of '{layout.render(root)}' but the"
                          f' checkpoint has layers 0..{n - 1} only; layer(s)'
                          f' {list(range(n, wanted[0]))} are missing')
        else:
          ok.append((t, srcs))
    if not ok:
      continue
    axis = _choose(root, ok, [stack_axes(srcs[0].shape, t.shape, n) for t, srcs in ok],
                   explicit_axis(stacks, root, target_layout, 'target'),
                   hint(root, source_layout, target_layout), problems,
                   lambda b: target_layout == layout.NNX and b == NNX_LAYER_AXIS)
    for t, srcs in ok if axis is not None else ():
      if insert_axis(srcs[0].shape, axis, n) != tuple(t.shape):
        problems.append(f'{t} cannot be stacked from {n} x {srcs[0]} at axis {axis}')
      else:
        out[t.path] = (tuple(srcs), (ops.Stack(axis),))
  return out


def _unstack(entries, stacks, source_layout, target_layout, problems) -> dict:
  """One stacked source -> per-layer targets, grouped by stack root (and kind, see `_kind`)."""
  groups = collections.defaultdict(list)
  for t, root, src, index in entries:
    groups[root, _kind(t)].append((t, src, index))
  out = {}
  for (root, _), group in groups.items():
    n = max(i for _, _, i in group) + 1
    cands = [{a for a in range(len(s.shape)) if drop_axis(s.shape, a) == tuple(t.shape)
              and s.shape[a] == n} for t, s, _ in group]
    axis = _choose(root, group, cands, explicit_axis(stacks, root, source_layout, 'source'),
                   hint(root, source_layout, target_layout), problems,
                   lambda a: source_layout == layout.NNX and a == NNX_LAYER_AXIS)
    for t, s, i in group if axis is not None else ():
      if drop_axis(s.shape, axis) != tuple(t.shape) or i >= s.shape[axis]:
        problems.append(f'{t} cannot be layer {i} of {s} along axis {axis}')
      else:
        out[t.path] = ((s,), (ops.Take(axis, i),))
  return out


def _move(direct, stacks, source_layout, target_layout, problems, depth=None) -> dict:
  """Stacked source -> stacked target with the layer axis elsewhere."""
  out = {}
  for t, s, param in direct:  # stacks the user declared: every leaf under them moves
    for name in stacks or {}:
      root = root_of(name)
      a = explicit_axis(stacks, root, source_layout, 'source')
      b = explicit_axis(stacks, root, target_layout, 'target')
      if param[: len(root)] == root and None not in (a, b) and a != b:
        if move_axis(s.shape, a, b) == tuple(t.shape):
          out[t.path] = ((s,), (ops.MoveAxis(a, b),))
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
    cands = [move_candidates(s.shape, t.shape) for t, s, _ in group]
    if not all(cands):
      continue  # some leaf is no stack at all: reported as a shape mismatch
    if all(len(s.shape) < 3 for _, s, _ in group):
      continue  # 2-D transposes alone are no evidence of a layer stack: a shape mismatch, with its fix
    known = [n for r, n in (depth or {}).items() if root[: len(r)] == r or r[: len(root)] == root]
    if len(set(known)) == 1:
      cands = [{c for c in cs if c[2] == known[0]} for cs in cands]
    nnx_axis = NNX_LAYER_AXIS
    choice = _choose(root, group, cands, None, hint(root, source_layout, target_layout), problems,
                     lambda c: (source_layout != layout.NNX or c[0] == nnx_axis)
                     and (target_layout != layout.NNX or c[1] == nnx_axis))
    if choice is None:
      continue
    a, b, n = choice
    for t, s, param in direct:  # same-shape leaves of the stack (square dims) move too
      if (t.path not in out and param[: len(root)] == root and len(s.shape) > a
          and s.shape[a] == n and move_axis(s.shape, a, b) == tuple(t.shape)):
        out[t.path] = ((s,), (ops.MoveAxis(a, b),))
  return out

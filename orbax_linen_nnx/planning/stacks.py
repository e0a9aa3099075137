"""Layer stacks: pairing per-layer leaves with stacked ones, and finding the layer axis.

Four layouts hold the same blocks (see docs/layer-stacks.md):

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
Every stack decision lives here: `stacks=` parsed once (`Stacks`), the one
inference of a layer axis from shapes (`layer_axes`: the planner's retry and
`inspect` both use it), the one layer of a stack that rules see
(`OneLayer`, `with_layers`), where a variable goes in a layout's stacks
(`placed`), and the stack, unstack and move ops of a plan. Pure: shapes in,
plan entries (sources and ops) out; the planner only asks.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops

Path = layout.Path
StackAxes = Mapping[str, Mapping[str, 'int | None']]  # stacks= as the user writes it

normalize = layout.normalize_layers


def insert_axis(shape: Sequence[int], axis: int, n: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + (n,) + tuple(shape[axis:])


def drop_axis(shape: Sequence[int], axis: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + tuple(shape[axis + 1 :])


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
  return {
    (a, b, source[a])
    for a in range(len(source))
    for b in range(len(target))
    if a != b and move_axis(source, a, b) == tuple(target)
  }


def root_of(name: str) -> Path:
  """A `stacks=` key ('decoder/layers') as the normalised model path of its stack root."""
  return normalize(tuple(p for p in str(name).split('/') if p))


class Stacks:
  """`stacks=` parsed once: per stack root (a normalised model path), its layer axis by layout or by role.

  `{'layers': {'linen': 1, 'nnx': 0}}` serves both directions;
  `{'layers': {'source': 1, 'target': 0}}` also works between two stacked
  layouts of the same library. An axis of None says that side holds one array
  per layer (`layers_0`, ...): what `LinenCompatSave` writes for
  `{'layers': {'linen': None}}`. Every stack decision asks this object.

  >>> Stacks.parse({'decoder/layers': {'linen': 1}}, []).axis(('decoder', 'layers'), 'linen', 'source')
  1
  """

  def __init__(self, entries: Sequence[tuple[str, dict]] = ()):
    self._entries = [(str(name), dict(axes)) for name, axes in entries]  # as written, in order

  @classmethod
  def parse(cls, stacks: 'StackAxes | Stacks | None', problems: list[str]) -> 'Stacks':
    """`stacks=` as the user gave it (a dict of dicts, or already parsed); a problem noted if it is neither."""
    if isinstance(stacks, Stacks):
      return stacks
    if stacks is None or (isinstance(stacks, dict) and all(isinstance(v, dict) for v in stacks.values())):
      return cls(list((stacks or {}).items()))
    problems.append(f"stacks= must be a dict like {{'layers': {{'linen': 1, 'nnx': 0}}}}; got {stacks!r}")
    return cls()

  def __bool__(self) -> bool:
    return bool(self._entries)

  def items(self) -> list[tuple[str, Path, dict]]:
    """(the key as written, its stack root, its axes) of every entry."""
    return [(name, root_of(name), axes) for name, axes in self._entries]

  def as_dict(self) -> dict[str, dict]:
    return {name: dict(axes) for name, axes in self._entries}

  def axis(self, root: Path, layout_name: str, role: str) -> int | None:
    """The layer axis stated for the stack at `root`, by `role` ('source'/'target') or by layout."""
    for _, r, axes in self.items():
      if r == root:
        for key in (role, layout_name):
          if axes.get(key) is not None:  # None: that side holds one array per layer
            return int(axes[key])
    return None

  def declared(self, param: Path, side: str) -> tuple[Path, dict] | None:
    """The stack root above model path `param` that states `side` (an axis or None), and its axes."""
    norm = normalize(param)
    for _, root, axes in self.items():
      if norm[: len(root)] == root and len(norm) > len(root) and side in axes:
        return root, axes
    return None

  def with_default(self, source: str, to: str) -> 'Stacks':
    """Where a stack names only the `to` side, the `source` layout's usual layer axis for the other."""
    return Stacks(
      [(name, ({source: DEFAULT_LAYER_AXIS[source], **axes} if to in axes else axes)) for name, axes in self._entries]
    )

  def with_source(self, guessed: Mapping[Path, int]) -> 'Stacks':
    """These stacks plus a source-side layer axis for each root in `guessed` (one inferred from shapes)."""
    entries = [(name, dict(axes)) for name, axes in self._entries]
    for root, axis in guessed.items():
      entry = next((axes for name, axes in entries if root_of(name) == root), None)
      if entry is None:
        entries.append(('/'.join(root), entry := {}))
      entry['source'] = axis
    return Stacks(entries)


def layer_axes(shapes: Sequence[Sequence[int]], outside: Sequence[Sequence[int]] = ()) -> list[int]:
  """The axes that can be the layer axis of a stack whose arrays have `shapes`: one size in all of them.

  Where several can and `outside` (the shapes of arrays outside the stack)
  is given, a feature size every block shares is left out: the layer count is
  the size no array outside the stack has (when that leaves any).
  """
  axes = common_axes(shapes)
  if len(axes) > 1 and outside:
    sizes = {n for s in outside for n in s}
    axes = [a for a in axes if shapes[0][a] not in sizes] or axes
  return axes


# nnx.vmap / nnx.scan put the layer axis first (in_axes=0, out_axes=0). When the
# shapes alone leave a choice, an NNX side with the layer axis at 0 is preferred.
NNX_LAYER_AXIS = 0
# Where each layout keeps a stack's layer axis when the user names only the other side's.
DEFAULT_LAYER_AXIS = {layout.NNX: NNX_LAYER_AXIS, layout.LINEN: 1}  # nnx.vmap; nn.scan (MaxText)


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
          self._per_layer[(m.section, m.param[:k] + m.param[k + 1 :], k)][int(seg)] = src

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
        stacked = self._sources.get(layout.Meaning(m.section, m.param[:k] + m.param[k + 1 :]))
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
  depth: dict[Path, int] = {}
  for _, root, layers in to_stack:
    depth[root] = max(depth.get(root, 0), max(layers) + 1)
  for _, root, _, index in to_unstack:
    depth[root] = max(depth.get(root, 0), index + 1)
  out.update(_move(direct, stacks, source_layout, target_layout, problems, depth))
  return out


def _choose(
  root: Path, entries, candidates: list[set], explicit, fix: str, problems: list[str], conventional=lambda choice: False
):
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
    problems.append(
      f"cannot tell the layer axis of stack '{name}': {sorted(common)} all fit"
      f' every leaf (a dimension equals the layer count); {fix}'
    )
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
        problems.append(
          f"{t} stacks layers 0..{n - 1} of '{layout.render(root)}' but layer(s)"
          f' {gaps} have no source (next to {srcs[0]})'
        )
      elif odd:
        problems.append(f'{t}: the layers to stack differ: {srcs[0]} but {odd[0]}')
      else:
        wanted = [
          t.shape[a] for a in range(len(t.shape)) if insert_axis(srcs[0].shape, a, t.shape[a]) == tuple(t.shape)
        ]
        if wanted and n not in wanted:
          problems.append(
            f"{t} holds {wanted[0]} layers of '{layout.render(root)}' but the"
            f' checkpoint has layers 0..{n - 1} only; layer(s)'
            f' {list(range(n, wanted[0]))} are missing'
          )
        else:
          ok.append((t, srcs))
    if not ok:
      continue
    axis = _choose(
      root,
      ok,
      [stack_axes(srcs[0].shape, t.shape, n) for t, srcs in ok],
      stacks.axis(root, target_layout, 'target'),
      hint(root, source_layout, target_layout),
      problems,
      lambda b: target_layout == layout.NNX and b == NNX_LAYER_AXIS,
    )
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
    cands = [
      {a for a in range(len(s.shape)) if drop_axis(s.shape, a) == tuple(t.shape) and s.shape[a] == n}
      for t, s, _ in group
    ]
    axis = _choose(
      root,
      group,
      cands,
      stacks.axis(root, source_layout, 'source'),
      hint(root, source_layout, target_layout),
      problems,
      lambda a: source_layout == layout.NNX and a == NNX_LAYER_AXIS,
    )
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
    for _, root, _ in stacks.items():
      a = stacks.axis(root, source_layout, 'source')
      b = stacks.axis(root, target_layout, 'target')
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
    choice = _choose(
      root,
      group,
      cands,
      None,
      hint(root, source_layout, target_layout),
      problems,
      lambda c: (source_layout != layout.NNX or c[0] == nnx_axis) and (target_layout != layout.NNX or c[1] == nnx_axis),
    )
    if choice is None:
      continue
    a, b, n = choice
    for t, s, param in direct:  # same-shape leaves of the stack (square dims) move too
      if (
        t.path not in out
        and param[: len(root)] == root
        and len(s.shape) > a
        and s.shape[a] == n
        and move_axis(s.shape, a, b) == tuple(t.shape)
      ):
        out[t.path] = ((s,), (ops.MoveAxis(a, b),))
  return out


# ---------------------------------------------------------------- what rules see of a stack


@dataclasses.dataclass(frozen=True)
class OneLayer:
  """A stacked source as the rules see it: one layer (the layer axis left out)."""

  stacked: Any
  axis: int

  path = property(lambda self: self.stacked.path)
  name = property(lambda self: self.stacked.name)
  dtype = property(lambda self: self.stacked.dtype)
  key_impl = property(lambda self: self.stacked.key_impl)
  shape = property(lambda self: drop_axis(self.stacked.shape, self.axis))


def one_layer(source: Any, param: Path, stacks: Stacks, source_layout: str) -> Any:
  """`source` as rules see it: one layer of it under a stack whose source-side axis `stacks` states."""
  norm = normalize(param)
  for _, root, _ in stacks.items():
    axis = stacks.axis(root, source_layout, 'source')
    if (
      axis is not None
      and norm[: len(root)] == root
      and len(norm) > len(root)
      and not norm[len(root)].isdigit()
      and 0 <= axis < len(source.shape)
    ):
      return OneLayer(source, axis)
  return source


def with_layers(expr):
  """A rule's expression over `OneLayer`s as the same ops over the whole stacks.

  The layer axis is moved first (a view), every op runs on one more leading
  axis, and the layer axis goes back where the source had it, so the planner's
  stack conversions see a stacked source as before.
  """

  def lift(e):
    if isinstance(e, OneLayer):
      return e.stacked if e.axis == 0 else ops.derive(ops.MoveAxis(e.axis, 0), [e.stacked], e.path)
    if not isinstance(e, ops.Derived):
      return e
    return ops.derive(e.op.lifted(n), [lift(a) for a in e.args], e.path)

  layers = [x for x in ops.stored_leaves(expr) if isinstance(x, OneLayer)]
  if not layers:
    return expr
  n = layers[0].stacked.shape[layers[0].axis]
  if not isinstance(expr, ops.Derived):  # renamed only: the stack itself
    return expr.stacked
  out = lift(expr)
  return out if layers[0].axis == 0 else ops.derive(ops.MoveAxis(0, layers[0].axis), [out], expr.path)


def target_shapes(targets, tgt_leaves, stacks: Stacks, target_layout: str) -> dict[Path, list[tuple[int, ...]]]:
  """{model path: shapes} of the targets, for rules that bind sizes from them (`rearrange`).

  A rule under a stack sees one layer: a per-layer target is also listed
  without its index, and one under a stack whose target-side layer axis
  `stacks=` states also with that axis left out.
  """
  shapes: dict[Path, list[tuple[int, ...]]] = collections.defaultdict(list)
  for t, leaf in zip(targets, tgt_leaves):
    norm = normalize(leaf.meaning.param)
    if not norm:
      continue
    shapes[norm].append(tuple(t.shape))
    for k, seg in enumerate(norm[:-1]):
      if seg.isdigit():
        shapes[norm[:k] + norm[k + 1 :]].append(tuple(t.shape))
      elif (axis := stacks.axis(norm[: k + 1], target_layout, 'target')) is not None and 0 <= axis < len(t.shape):
        shapes[norm].append(drop_axis(t.shape, axis))
  return {k: list(dict.fromkeys(v)) for k, v in shapes.items()}


def guess_source_axes(unfit, sources, source_layout: str, stacks: Stacks) -> dict[Path, int]:
  """{stack root: layer axis} for the sources rules could not fit, where shapes tell it.

  The root is the longest model path above an unfit leaf under which at least
  two arrays sit and exactly one axis has the same size in all of them.
  """
  params: dict[Path, dict[Path, tuple]] = {}  # per section: model path -> shape
  of_path: dict[Path, tuple[Path, Path]] = {}  # source path -> (section, model path)
  for s, leaf in zip(sources, layout.describe([s.path for s in sources], source_layout)):
    if leaf.meaning.param:
      norm = normalize(leaf.meaning.param)
      params.setdefault(leaf.meaning.section, {})[norm] = tuple(s.shape)
      of_path[s.path] = (leaf.meaning.section, norm)
  guessed: dict[Path, int] = {}
  for path in unfit:
    if path not in of_path:
      continue
    section, norm = of_path[path]
    for k in range(len(norm) - 1, 0, -1):
      root = norm[:k]
      if any(seg.isdigit() for seg in root) or stacks.axis(root, source_layout, 'source') is not None:
        break
      shapes = [shape for p, shape in params[section].items() if p[:k] == root and len(p) > k]
      if len(shapes) < 2:
        continue
      axes = layer_axes(shapes)
      if len(axes) == 1:
        guessed[root] = axes[0]
        break
  return guessed


def found_in(params: Mapping[Path, tuple[int, ...]], side: str = layout.LINEN) -> list[dict]:
  """The layer stacks a tree of model paths -> shapes holds: per-layer modules, and stacked ones.

  Per-layer modules are Linen's `layers_3` (a Linen tree on `side`) and NNX
  list entries `layers/3`; an NNX attribute named `block_0` is an attribute.
  A stacked one's layer axis is what the shapes tell (`layer_axes`, with the
  sizes of arrays outside the stack to tell a layer count from a feature size
  every block shares); candidates left are all listed. Every leaf of a stack
  has the layer axis and one more: a module of vectors (a norm's scale and
  bias, BatchNorm's statistics) or a square kernel beside its bias shares a
  size, not a layer axis.
  """
  params = {(normalize(p) if side == layout.LINEN else p): tuple(s) for p, s in params.items()}
  found, per_layer = [], collections.defaultdict(set)
  for p in params:
    for k, seg in enumerate(p[:-1]):
      if seg.isdigit() and not p[k - 1][:1].isupper():  # not Linen's automatic names (Dense_0, Dense_1)
        per_layer[p[:k]].add(int(seg))
        break
  for root, layers in sorted(per_layer.items()):
    found.append({'root': '/'.join(root), 'kind': 'per-layer', 'layers': len(layers), 'layer_axis': None})
  claimed: list[Path] = list(per_layer)
  for k in range(1, max((len(p) for p in params), default=0)):
    for root in sorted({p[:k] for p in params if len(p) > k}):
      if any(root[: len(c)] == c for c in claimed) or any(s.isdigit() for s in root):
        continue
      shapes = [s for p, s in params.items() if p[:k] == root and len(p) > k]
      if len(shapes) < 2 or any(len(s) < 2 for s in shapes):
        continue
      axes = layer_axes(shapes, outside=[s for p, s in params.items() if p[:k] != root])
      if axes:
        found.append(
          {'root': '/'.join(root), 'kind': 'stacked', 'layers': [shapes[0][a] for a in axes], 'layer_axis': axes}
        )
        claimed.append(root)
  return found


# ---------------------------------------------------------------- where a variable goes in a layout

_NAMES = {layout.LINEN: layout.linen_names, layout.NNX: layout.nnx_names}  # per-layer: layers_3, layers/3


def depths(params: Sequence[Path], stacks: Stacks, side: str) -> dict[Path, int]:
  """Layers per declared stack root that `params` hold one module per layer of (`layers/3/...`)."""
  depth: dict[Path, int] = {}
  for param in params:
    found = stacks.declared(param, side) if param else None
    if found:
      root, _ = found
      index = normalize(param)[len(root)]
      if index.isdigit():
        depth[root] = max(depth.get(root, 0), int(index) + 1)
  return depth


def placed(
  param: Path, shape: tuple[int, ...], stacks: Stacks, depth: Mapping[Path, int], to: str, problems: list[str]
) -> list[tuple[Path, tuple]]:
  """Where a model variable (or its mirror) goes in layout `to`: [(its names there, shape)].

  Names stay as given, joined per layer for Linen (`layers/3` -> `layers_3`). Under a
  stack the user declared a layer axis for on the `to` side, a stack has its
  layer axis moved there, or, with `None`, is cut into one array per layer;
  per-layer modules are stacked at that axis (the target is named once, by
  layer 0; the planner gathers every layer into it); a stack cut into layers
  is named per layer as `to` names them (`layers_3` in Linen, `layers/3` in NNX).
  """
  names = _NAMES[to]
  found = stacks.declared(param, to)
  if found is None:
    # Outside a declared stack a name stays as it is in NNX: `block_0` is an attribute there too (MaxText's
    # unscanned decoders, ports that setattr per layer), and a rule's `block_0/up` is what the rule wrote.
    return [(param if to == layout.NNX else names(param), shape)]
  root, axes = found
  frm = layout.NNX if to == layout.LINEN else layout.LINEN
  norm = normalize(param)
  if norm[len(root)].isdigit():  # one module per layer
    if axes[to] is None:
      return [(names(param), shape)]
    if norm[len(root)] != '0':
      return []
    return [(names(root) + names(norm[len(root) + 1 :]), insert_axis(shape, int(axes[to]), depth[root]))]
  source = axes.get(frm, DEFAULT_LAYER_AXIS[frm])
  if source is None or not 0 <= int(source) < len(shape):
    problems.append(
      f"'{layout.render(param)}' {shape} cannot be a layer stack at axis {source}"
      f" (stacks={{{str(root[0])!r}: {axes!r}}}); give the {frm} layer axis as {frm!r}: axis"
    )
    return [(names(param), shape)]
  rest = names(norm[len(root) :])
  if axes[to] is None:
    return [(names(root + (str(i),)) + rest, drop_axis(shape, source)) for i in range(shape[source])]
  return [(names(param), move_axis(shape, source, int(axes[to])))]

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
Pure: shapes in, decisions out.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from orbax_linen_nnx import layout

Path = layout.Path
StackAxes = Mapping[str, Mapping[str, int]]

_INDEXED = re.compile(r'(.+)_(\d+)')


def normalize(param: Path) -> Path:
  """('layers_3', 'mlp') and ('layers', '3', 'mlp') both -> ('layers', '3', 'mlp')."""
  out: list[str] = []
  for seg in param:
    m = _INDEXED.fullmatch(seg)
    out.extend(m.groups() if m else (seg,))
  return tuple(out)


def insert_axis(shape: Sequence[int], axis: int, n: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + (n,) + tuple(shape[axis:])


def drop_axis(shape: Sequence[int], axis: int) -> tuple[int, ...]:
  return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def move_axis(shape: Sequence[int], source: int, destination: int) -> tuple[int, ...]:
  return insert_axis(drop_axis(shape, source), destination, shape[source])


def stack_axes(per_layer: Sequence[int], stacked: Sequence[int], n: int) -> set[int]:
  """Axes at which inserting n layers into `per_layer` gives `stacked`."""
  return {a for a in range(len(stacked)) if insert_axis(per_layer, a, n) == tuple(stacked)}


def move_candidates(source: Sequence[int], target: Sequence[int]) -> set[tuple[int, int, int]]:
  """(source axis, target axis, layer count) that turn `source` into `target`."""
  if len(source) != len(target):
    return set()
  return {(a, b, source[a]) for a in range(len(source)) for b in range(len(target))
          if a != b and move_axis(source, a, b) == tuple(target)}


def explicit_axis(stacks: StackAxes | None, root: Path, layout_name: str, role: str) -> int | None:
  """The layer axis the user stated for the stack at `root`, by layout or by role.

  `stacks={'layers': {'linen': 1, 'nnx': 0}}` serves both directions;
  `{'layers': {'source': 1, 'target': 0}}` also works between two stacked
  layouts of the same library.
  """
  for name, axes in (stacks or {}).items():
    if normalize(tuple(p for p in name.split('/') if p)) == root:
      for key in (role, layout_name):
        if key in axes:
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

"""User rules that rename model variables between the two layouts.

Linen `@nn.compact` names submodules `Dense_0`, `Dense_1`; NNX code names them
by attribute (`fc1`, `fc2`). No rule can guess that pairing, so the user states it:

    rules={'Dense_0': 'fc1', 'Dense_1': 'fc2'}     # Linen name -> NNX name

A mapping is written Linen -> NNX once and serves both directions (it is
inverted when restoring a Linen target from an NNX checkpoint). Keys and values
are module paths inside the model, '/'-separated ('Encoder_0/Dense_1'); the
longest matching prefix wins. A callable `rules(path) -> path` receives the
source-side model path as a tuple of strings ('Dense_0', 'kernel') and returns
the target-side path; being one-way, it is used as given in either direction.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

from orbax_linen_nnx import layout

Path = layout.Path
Rules = Union[Mapping[str, str], Callable[[Path], Path], None]


def _split(name: str) -> Path:
  return tuple(p for p in name.split('/') if p)


class Renamer:
  """Applies `rules` to source model paths, in the direction of the restore.

  >>> Renamer({'Dense_0': 'fc1'}, linen_to_nnx=True)(('Dense_0', 'kernel'))
  ('fc1', 'kernel')
  """

  def __init__(self, rules: Rules, *, linen_to_nnx: bool):
    self._fn = None
    self._pairs: list[tuple[Path, Path]] = []
    self.used: set[str] = set()
    if rules is None:
      return
    if callable(rules):
      self._fn = rules
      return
    if not isinstance(rules, Mapping):
      raise TypeError(
          'rules must be a mapping {linen_name: nnx_name} or a callable'
          f' path -> path, got {type(rules).__name__}'
      )
    pairs = [(_split(k), _split(v)) for k, v in rules.items()]
    if not linen_to_nnx:
      targets = [v for _, v in pairs]
      dupes = {layout.render(v) for v in targets if targets.count(v) > 1}
      if dupes:
        raise ValueError(
            f'rules map several Linen names to {sorted(dupes)}, so they cannot be'
            ' inverted to restore a Linen target; give a callable instead.'
        )
      pairs = [(v, k) for k, v in pairs]
    self._pairs = sorted(pairs, key=lambda kv: -len(kv[0]))

  def __call__(self, path: Path) -> Path:
    if self._fn is not None:
      out = self._fn(tuple(path))
      if isinstance(out, str):
        out = _split(out)
      return tuple(str(p) for p in out)
    for src, dst in self._pairs:
      if path[: len(src)] == src:
        self.used.add(layout.render(src))
        return dst + path[len(src):]
    return path

  def unused(self) -> list[str]:
    """Source names of mapping rules that matched no leaf."""
    return sorted(layout.render(s) for s, _ in self._pairs if layout.render(s) not in self.used)

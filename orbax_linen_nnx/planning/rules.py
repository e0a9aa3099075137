"""Mapping rules: what model code changed between the Linen and the NNX version.

Rules are written once, from the Linen side to the NNX side, over paths inside
the model ('Dense_0/kernel'); they apply to the params and to every optimizer
subtree that mirrors them (Adam's mu and nu). Restoring NNX -> Linen applies
their inverses in reverse order. `{name}` in a path matches text within one
path segment, `{name...}` one or more whole segments; both carry over to the
other side:

    rules = [
        rename({'Dense_0': 'fc1', 'Dense_1': 'fc2'}),
        split('{blk}/gating_einsum', ['{blk}/gate_proj/kernel', '{blk}/up_proj/kernel'], axis=0),
        transpose('{blk}/gate_proj/kernel', (1, 0)),
        transpose('{blk}/up_proj/kernel', (1, 0)),
        reshape('{blk}/attn/q/kernel', (64, 8, 16), (64, 128)),
        cast('{path...}', 'float32'),
        drop('SigLiPFromPatches_0/{path...}'),      # a vision tower the text model has not
    ]

Each rule becomes ops on the stored arrays (see ops.py); no rule
ever reads more than the slices the target shards need.
"""

from __future__ import annotations

import abc
import collections
import difflib
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import ops

Path = layout.Path


class RuleError(ValueError):
  """A rule that cannot be used as written (e.g. one with no inverse, used backwards)."""


# ---------------------------------------------------------------- paths


_PLACEHOLDER = re.compile(r'\{(\w+)(\.\.\.)?([+-]\d+)?\}')


class _Pattern:
  """'{blk}/gating_einsum': placeholders match path text and format back out.

  `{name}` matches text within one path segment ('blocks_{i}' matches
  'blocks_3'); `{name...}` matches one or more whole segments, slashes
  included ('{path...}/kernel' matches 'blocks_3/mlp/kernel'). `{i+1}` (or
  `{i-2}`) is the number `{i}` bound plus 1: matching 'ln{j+1}' against 'ln2'
  binds j = 1, formatting it with j = 1 gives 'ln2', so such renames invert.
  Names in `numeric` match digits only.
  """

  def __init__(self, text: str, numeric: Iterable[str] = ()):
    self.text = text.strip('/')
    parts = _PLACEHOLDER.split(self.text)
    literals, names, many, offsets = parts[0::4], parts[1::4], parts[2::4], parts[3::4]
    self.names = names
    self.offsets = {n: int(o) for n, o in zip(names, offsets) if o}
    numeric = set(numeric) | set(self.offsets)
    rx = re.escape(literals[0])
    for name, dots, literal in zip(names, many, literals[1:]):
      rx += f'(?P<{name}>\\d+)' if name in numeric else f'(?P<{name}>.+?)' if dots else f'(?P<{name}>[^/]+?)'
      rx += re.escape(literal)
    self._rx = re.compile(rx)
    # How specific the pattern is: its literal text before the first
    # placeholder, then the fewer placeholders, then all its literal text.
    self.specificity = (len(literals[0]), -len(names), sum(map(len, literals)))

  def match(self, path: str) -> dict[str, str] | None:
    m = self._rx.fullmatch(path)
    if not m:
      return None
    bound = m.groupdict()
    for name, offset in self.offsets.items():
      value = int(bound[name]) - offset
      if value < 0:
        return None
      bound[name] = str(value)
    return bound

  def format(self, bindings: Mapping[str, str]) -> str:
    missing = set(self.names) - set(bindings)
    if missing:
      raise RuleError(f"'{self.text}' uses {sorted(missing)}, which the other side does not bind")
    return _PLACEHOLDER.sub(
      lambda m: str(int(bindings[m.group(1)]) + int(m.group(3))) if m.group(3) else bindings[m.group(1)], self.text
    )


def _split_path(text: str) -> Path:
  return tuple(p for p in text.split('/') if p)


class Tally:
  """What rules did while planning: matches per rule, which rules made each path, problems."""

  def __init__(self):
    self.matches: dict[str, int] = collections.Counter()
    self.problems: list[str] = []
    self.dropped: dict[Path, str] = {}  # stored source path -> the drop rule that left it out
    self.matched: dict[str, dict[str, None]] = collections.defaultdict(dict)  # rule -> paths it matched, in order
    self.targets: dict[Path, list[tuple[int, ...]]] = {}  # model path (layers normalised) -> its shapes
    self.unfit: dict[Path, None] = {}  # stored paths of the leaves a matching rule could not fit
    # Per model subtree the rules ran over: the leaves before each rule, and after the last.
    self.stages: list[list[dict[str, Any]]] = []

  def target_shapes(self, path: str) -> list[tuple[int, ...]]:
    """The shapes a target leaf at `path` has (one layer of it too, under a stack): [] when unknown."""
    return self.targets.get(layout.normalize_layers(_split_path(path)), [])

  def match(self, rule: str, path: str) -> None:
    self.matches[rule] += 1
    self.matched[rule][path] = None  # the params and each moment match alike: listed once


# ---------------------------------------------------------------- rules


class Rule(abc.ABC):
  """Base of all rules: `apply` rewrites {path: array} of one model subtree."""

  def names(self) -> list[str]:
    return [repr(self)]

  @abc.abstractmethod
  def apply(self, leaves: dict[str, Any], made_by: dict[str, tuple], tally: Tally) -> dict[str, Any]:
    """The subtree after this rule; `made_by` and `tally` record what it did."""

  def inverse(self) -> 'Rule':
    raise RuleError(
      f'{self!r} has no inverse, so it cannot restore the Linen side from the NNX side; pass inverse= to state it'
    )

  def only(self, name: str) -> 'Rule':
    """The rule restricted to the entry `name` (of `names()`): itself unless it has several."""
    return self

  def python(self) -> str | None:
    """The call that makes this rule (`split('a', ['b', 'c'], axis=1)`), or None where no text can
    (a function given to it)."""
    return repr(self)


def _put(out: dict, made_by: dict, path: str, expr, rule: str, tally: Tally):
  if path in out:
    earlier = made_by.get(path)
    tally.problems.append(
      f"{rule} makes '{path}', which {' then '.join(earlier)} already made: two rules claim one target"
      if earlier
      else f"{rule} makes '{path}', which the checkpoint already holds under that name"
    )
  out[path] = expr


class _Rename(Rule):
  def __init__(self, mapping: Mapping[str, str] | None, fn=None, regex=None, repl=None, inverse=None):
    self.mapping = {}
    for k, v in (mapping or {}).items():
      # A name used with arithmetic on either side is a number on both.
      numeric = set(_Pattern(k).offsets) | set(_Pattern(v).offsets)
      self.mapping[_Pattern(k, numeric)] = _Pattern(v, numeric)
    self.fn, self.regex, self.repl, self._inverse = fn, regex, repl, inverse

  def __repr__(self):
    if self.fn is not None:
      return f'rename({getattr(self.fn, "__name__", "fn")})'
    if self.regex is not None:
      return f'rename({self.regex.pattern!r}, {self.repl!r})'
    return 'rename({' + ', '.join(f'{k.text!r}: {v.text!r}' for k, v in self.mapping.items()) + '})'

  def python(self):
    return None if self.fn is not None or self._inverse is not None else repr(self)

  def names(self):
    if self.mapping:
      return [k.text for k in self.mapping]
    return [repr(self)]

  def only(self, name):
    if not self.mapping:
      return self
    one = _Rename(None)
    one.mapping = {k: v for k, v in self.mapping.items() if k.text == name}
    return one

  def _new(self, path: str) -> tuple[str | None, str]:
    segs = _split_path(path)
    if self.fn is not None:
      new = self.fn(path)
      return (None if new in (None, path) else new), repr(self)
    if self.regex is not None:
      for k in range(len(segs), 0, -1):  # longest prefix of whole segments wins
        head, rest = '/'.join(segs[:k]), segs[k:]
        m = self.regex.fullmatch(head)
        if m:
          new = self.repl(m) if callable(self.repl) else m.expand(self.repl)
          return '/'.join((new,) + rest), repr(self)
      return None, ''
    # The most specific entry that matches leading whole segments wins: the
    # longest literal text before its first placeholder, then the fewest
    # placeholders, then the most literal text; then the longest match.
    best = None
    for pat, to in self.mapping.items():
      for k in range(len(segs), 0, -1):
        b = pat.match('/'.join(segs[:k]))
        if b is not None:
          key = pat.specificity + (k,)
          if best is None or key > best[0]:
            best = (key, pat, to, b, segs[k:])
          break
    if best is None:
      return None, ''
    _, pat, to, b, rest = best
    return '/'.join((to.format(b),) + rest), pat.text

  def apply(self, leaves, made_by, tally):
    out: dict[str, Any] = {}
    moved = {}
    for path in leaves:
      new, name = self._new(path)
      if new is None:
        continue
      tally.match(name, path)
      moved[path] = (new.strip('/'), name)
    for path, expr in leaves.items():
      if path not in moved:
        out[path] = expr
    for path, (new, name) in moved.items():
      _put(out, made_by, new, leaves[path], f'rename {name!r}', tally)
      made_by[new] = made_by.pop(path, ()) + (f'rename {name}',)
    return out

  def inverse(self):
    if self._inverse is not None:
      return self._inverse
    if self.mapping:
      back = [v.text for v in self.mapping.values()]
      if len(set(back)) < len(back):
        raise RuleError(
          f'{self!r} maps several Linen names to one NNX name, so it cannot be'
          ' inverted to restore a Linen target; give inverse='
        )
      return _Rename({v.text: k.text for k, v in self.mapping.items()})
    return super().inverse()


def rename(old, new=None, *, inverse: Rule | None = None) -> Rule:
  """Renames module paths, Linen name -> NNX name, for params and optimizer moments.

  - `rename({'Dense_0': 'fc1', 'Dense_1': 'fc2'})` or `rename('Dense_0', 'fc1')`:
    whole leading path segments; `{name}` placeholders carry text across
    (`rename('blocks_{i}/attn', 'layers/{i}/attention')`), `{name+1}` a number
    shifted (`rename('LayerNorm_{j}', 'ln{j+1}')`). Inverted automatically.
  - `rename(re.compile(r'Dense_(\\d+)'), r'fc\\1')`: a regex over leading
    segments, with backreferences or a `fn(match) -> str` replacement
    (`lambda m: f'fc{int(m[1]) + 1}'`). One-way unless `inverse=` is given.
  - `rename(fn)`: `fn(path) -> new path or None` for anything else; one-way
    unless `inverse=` is given.

  >>> rename('Dense_0', 'fc1')
  rename({'Dense_0': 'fc1'})
  """
  if isinstance(old, Mapping):
    return _Rename(old, inverse=inverse)
  if isinstance(old, re.Pattern):
    return _Rename(None, regex=old, repl=new, inverse=inverse)
  if callable(old):
    return _Rename(None, fn=old, inverse=inverse)
  return _Rename({old: new}, inverse=inverse)


class _Drop(Rule):
  def __init__(self, source: str):
    self.source = _Pattern(source)

  def __repr__(self):
    return f'drop({self.source.text!r})'

  def apply(self, leaves, made_by, tally):
    out = {}
    for path, expr in leaves.items():
      segs = _split_path(path)
      if any(self.source.match('/'.join(segs[:k])) is not None for k in range(len(segs), 0, -1)):
        tally.match(repr(self), path)
        for x in ops.stored_leaves(expr):
          tally.dropped[x.path] = repr(self)
        made_by.pop(path, None)
      else:
        out[path] = expr
    return out

  def inverse(self):
    return _Nothing(repr(self))


class _Nothing(Rule):
  """The way back of `drop`: the other side has nothing to write there."""

  def __init__(self, of: str):
    self.of = of

  def __repr__(self):
    return f'(nothing: the way back of {self.of})'

  def python(self):
    return None

  def names(self):
    return []

  def apply(self, leaves, made_by, tally):
    return leaves

  def inverse(self):
    return self


def drop(pattern: str) -> Rule:
  """Sources the target model does not have: left out, and listed in the plan as dropped.

  Matches leading whole path segments like `rename`: `drop('SigLiPFromPatches_0')`
  leaves out a vision tower a text-only model has no place for (params and
  optimizer moments alike). Targets without a source stay errors. The other
  way (NNX -> Linen) there is nothing to write for it.

  >>> drop('SigLiPFromPatches_0')
  drop('SigLiPFromPatches_0')
  """
  return _Drop(pattern)


class _OneToMany(Rule):
  """Shared matching of rules that turn each matching leaf into derived leaves."""

  def __init__(self, source: str):
    self.source = _Pattern(source)

  @abc.abstractmethod
  def outputs(self, path: str, bindings: dict, expr, tally: Tally) -> list[tuple[str, Any]]:
    """The (new path, array) pairs a matching leaf becomes; [] when the rule cannot apply."""

  def apply(self, leaves, made_by, tally):
    out = {}
    for path, expr in leaves.items():
      b = self.source.match(path)
      made = self.outputs(path, b, expr, tally) if b is not None else None
      if made == []:  # the rule matched a leaf it cannot fit
        tally.unfit.update((x.path, None) for x in ops.stored_leaves(expr))
      if made is None:
        _put(out, made_by, path, expr, repr(self), tally)
        continue
      tally.match(repr(self), path)
      history = made_by.pop(path, ())
      for new, derived in made:
        _put(out, made_by, new, derived, repr(self), tally)
        made_by[new] = history + (repr(self),)
    return out


class _Split(_OneToMany):
  def __init__(self, source, targets, axis, sizes):
    super().__init__(source)
    self.targets = [_Pattern(t) for t in targets]
    self.axis, self.sizes = axis, sizes

  def __repr__(self):
    sizes = '' if self.sizes is None else f', sizes={self.sizes!r}'
    return f'split({self.source.text!r}, {[t.text for t in self.targets]!r}, axis={self.axis}{sizes})'

  def outputs(self, path, b, expr, tally):
    shape, n = tuple(expr.shape), len(self.targets)
    if not -len(shape) <= self.axis < len(shape):
      tally.problems.append(f"{self!r}: '{path}' {shape} has no axis {self.axis}")
      return []
    axis = self.axis % len(shape)
    sizes = self.sizes
    if sizes == 'equal':
      if shape[axis] % n:
        tally.problems.append(
          f"{self!r}: '{path}' {shape} axis {axis} ({shape[axis]}) does not split into {n} equal parts"
        )
        return []
      sizes = [shape[axis] // n] * n
    if sizes is None:
      if shape[axis] != n:
        tally.problems.append(
          f"{self!r}: '{path}' {shape} has {shape[axis]} entries on axis {axis}, not one per"
          f' target ({n}); give sizes= to split it into slices'
        )
        return []
      return [
        (t.format(b), ops.derive(ops.Take(axis, i), [expr], _split_path(t.format(b))))
        for i, t in enumerate(self.targets)
      ]
    if len(sizes) != n or sum(sizes) != shape[axis]:
      tally.problems.append(
        f"{self!r}: parts {list(sizes)} do not add up to '{path}' {shape} axis {axis} ({shape[axis]})"
      )
      return []
    made, start = [], 0
    for t, size in zip(self.targets, sizes):
      made.append((t.format(b), ops.derive(ops.Slice(axis, start, start + size), [expr], _split_path(t.format(b)))))
      start += size
    return made

  def inverse(self):
    return _Merge(
      [t.text for t in self.targets], self.source.text, self.axis, stack=self.sizes is None, sizes=self.sizes
    )


def split(source: str, targets: Sequence[str], axis: int, sizes: Sequence[int] | str | None = None) -> Rule:
  """One stored array -> several targets along `axis`.

  `sizes=None`: one target per entry of `axis`, which disappears (a fused
  (2, F, D) kernel -> two (F, D) kernels). `sizes=[a, b]` or `'equal'`: slices
  that keep the axis. Inverse: `merge`.

  >>> split('{b}/gating_einsum', ['{b}/gate', '{b}/up'], axis=0)
  split('{b}/gating_einsum', ['{b}/gate', '{b}/up'], axis=0)
  """
  return _Split(source, targets, axis, None if sizes is None else (sizes if sizes == 'equal' else list(sizes)))


class _Merge(Rule):
  def __init__(self, sources, target, axis, stack=False, sizes=None):
    self.sources = [_Pattern(s) for s in sources]
    self.target = _Pattern(target)
    self.axis, self.stack, self.sizes = axis, stack, sizes

  def __repr__(self):
    kind = ', stack=True' if self.stack else ''
    return f'merge({[s.text for s in self.sources]!r}, {self.target.text!r}, axis={self.axis}{kind})'

  def apply(self, leaves, made_by, tally):
    out = dict(leaves)
    for path in list(leaves):
      b = self.sources[0].match(path)
      if b is None or path not in out:
        continue
      names = [s.format(b) for s in self.sources]
      absent = [n for n in names if n not in leaves]
      if absent:
        tally.problems.append(f"{self!r}: '{path}' has no partner {absent}")
        continue
      parts = [leaves[n] for n in names]
      shapes = {tuple(p.shape) for p in parts}
      if self.stack and len(shapes) > 1:
        tally.problems.append(f'{self!r}: cannot stack {[str(p) for p in parts]}: shapes differ')
        continue
      op = ops.Stack(self.axis) if self.stack else ops.Concat(self.axis)
      new = self.target.format(b)
      history = ()
      for n in names:
        del out[n]
        history += made_by.pop(n, ())
      tally.match(repr(self), ', '.join(names))
      _put(out, made_by, new, ops.derive(op, parts, _split_path(new)), repr(self), tally)
      made_by[new] = history + (repr(self),)
    return out

  def inverse(self):
    sizes = None if self.stack else (self.sizes or 'equal')
    return _Split(self.target.text, [s.text for s in self.sources], self.axis, sizes)


def merge(
  sources: Sequence[str], target: str, axis: int, *, stack: bool = False, sizes: Sequence[int] | None = None
) -> Rule:
  """Several stored arrays -> one target, concatenated along `axis` (or stacked).

  `sizes` tells the inverse split where the parts end (default: equal parts).

  >>> merge(['{b}/q', '{b}/k', '{b}/v'], '{b}/qkv', axis=1)
  merge(['{b}/q', '{b}/k', '{b}/v'], '{b}/qkv', axis=1)
  """
  return _Merge(sources, target, axis, stack, None if sizes is None else list(sizes))


_SAME = object()  # op_for's answer when a leaf passes through unchanged


class _PerLeaf(_OneToMany):
  """A rule that replaces each matching leaf by one op over it, keeping its path."""

  @abc.abstractmethod
  def op_for(self, path, expr, tally):
    """The op that replaces a matching leaf, _SAME to keep it, or None if it cannot apply."""

  def outputs(self, path, b, expr, tally):
    op = self.op_for(path, expr, tally)
    if op is None:
      return []
    return [(path, ops.derive(op, [expr], _split_path(path)) if op is not _SAME else expr)]


class _Transpose(_PerLeaf):
  def __init__(self, path, perm):
    super().__init__(path)
    self.perm = tuple(perm)

  def __repr__(self):
    return f'transpose({self.source.text!r}, {self.perm})'

  def op_for(self, path, expr, tally):
    if sorted(self.perm) != list(range(len(expr.shape))):
      tally.problems.append(f"{self!r}: {self.perm} is no permutation of the axes of '{path}' {tuple(expr.shape)}")
      return None
    return ops.Transpose(self.perm)

  def inverse(self):
    return _Transpose(self.source.text, tuple(int(i) for i in np.argsort(self.perm)))


def transpose(path: str, perm: Sequence[int]) -> Rule:
  """Permute a leaf's axes like `numpy.transpose` (Linen (F, D) -> NNX (D, F))."""
  return _Transpose(path, perm)


class _Reshape(_PerLeaf):
  def __init__(self, path, from_shape, to_shape):
    super().__init__(path)
    self.from_shape, self.to_shape = tuple(from_shape), tuple(to_shape)

  def __repr__(self):
    return f'reshape({self.source.text!r}, {self.from_shape}, {self.to_shape})'

  def op_for(self, path, expr, tally):
    if int(np.prod(self.from_shape)) != int(np.prod(self.to_shape)):
      tally.problems.append(f'{self!r}: {self.from_shape} and {self.to_shape} hold different numbers of elements')
      return None
    if tuple(expr.shape) != self.from_shape:
      tally.problems.append(f"{self!r}: '{path}' is {tuple(expr.shape)}, not {self.from_shape}")
      return None
    return ops.Reshape(self.from_shape, self.to_shape)

  def inverse(self):
    return _Reshape(self.source.text, self.to_shape, self.from_shape)


def reshape(path: str, from_shape: Sequence[int], to_shape: Sequence[int]) -> Rule:
  """Merge or split axes: `reshape('{b}/q/kernel', (D, H, K), (D, H * K))`.

  Both shapes are stated so the rule inverts. Each target slice reads only the
  source rows that cover it, and is reshaped on the host.
  """
  return _Reshape(path, from_shape, to_shape)


def _bind(sizes: dict[str, int], groups: list[tuple[list[str], int]]) -> str | None:
  """Binds in `sizes` every axis a group of known size leaves alone open; what cannot fit, or None."""
  progress = True
  while progress:
    progress = False
    for group, n in groups:
      unknown = [a for a in group if a not in sizes]
      known = math.prod(sizes[a] for a in group if a in sizes)
      if (not unknown and known != n) or (unknown and n % known):
        return f"({' '.join(group)}) cannot be {n}"
      if len(unknown) == 1:
        sizes[unknown[0]] = n // known
        progress = True
  return None


def _axes(side: str) -> list[list[str]]:
  """'d (h k)' -> [['d'], ['h', 'k']]."""
  groups = []
  for grouped, name in re.findall(r'\(([^)]*)\)|(\w+)', side):
    groups.append(grouped.split() if grouped or not name else [name])
  return groups


class _Rearrange(_OneToMany):
  def __init__(self, source, pattern, sizes):
    super().__init__(source)
    self.pattern, self.sizes = pattern, dict(sizes)
    left, arrow, right = pattern.partition('->')
    self.left, self.right = _axes(left), _axes(right)
    names = [n for g in self.left for n in g]
    if not arrow or sorted(names) != sorted(n for g in self.right for n in g) or len(set(names)) != len(names):
      raise RuleError(
        f"rearrange pattern {pattern!r} must name each axis once on each side of '->' ('d (h k) -> d h k')"
      )

  def __repr__(self):
    sizes = ''.join(f', {k}={v}' for k, v in self.sizes.items())
    return f'rearrange({self.source.text!r}, {self.pattern!r}{sizes})'

  def _sizes(self, path, shape, tally) -> dict[str, int] | None:
    """Every axis size: from `sizes=`, the leaf's shape, then the target's shape at `path`."""
    if len(shape) != len(self.left):
      tally.problems.append(
        f"{self!r}: '{path}' {shape} has {len(shape)} axes, the pattern's left side {len(self.left)}"
      )
      return None
    sizes = dict(self.sizes)
    unfit = _bind(sizes, list(zip(self.left, shape)))
    if unfit:
      tally.problems.append(f"{self!r}: '{path}' {shape}: {unfit} with sizes {self.sizes}")
      return None
    names = [a for g in self.left for a in g]
    if all(a in sizes for a in names):
      return sizes
    # Sizes the leaf leaves open, the target leaf this rule makes may tell.
    for want in tally.target_shapes(path):
      if len(want) == len(self.right):
        bound = dict(sizes)
        unfit = _bind(bound, list(zip(self.right, want)) + list(zip(self.left, shape)))
        if unfit:
          tally.problems.append(f"{self!r}: '{path}' {shape} cannot become the target's {tuple(want)}: {unfit}")
          return None
        if all(a in bound for a in names):
          return bound
    for group, n in zip(self.left, shape):
      unknown = [a for a in group if a not in sizes]
      if unknown:
        tally.problems.append(
          f"{self!r}: '{path}' {shape} leaves {' and '.join(unknown)} in ({' '.join(group)}) = {n}"
          f" open; give all but one of them as sizes ({unknown[0]}=...)"
        )
        return None
    return None

  def outputs(self, path, b, expr, tally):
    shape = tuple(expr.shape)
    sizes = self._sizes(path, shape, tally)
    if sizes is None:
      return []
    order = [a for g in self.left for a in g]
    flat = tuple(sizes[a] for a in order)
    wanted = [a for g in self.right for a in g]
    steps = []
    if flat != shape:
      steps.append(ops.Reshape(shape, flat))
    perm = tuple(order.index(a) for a in wanted)
    if perm != tuple(range(len(perm))):
      steps.append(ops.Transpose(perm))
    out = tuple(math.prod(sizes[a] for a in g) for g in self.right)
    if tuple(sizes[a] for a in wanted) != out:
      steps.append(ops.Reshape(tuple(sizes[a] for a in wanted), out))
    for op in steps:
      expr = ops.derive(op, [expr], _split_path(path))
    return [(path, expr)]

  def inverse(self):
    left, _, right = self.pattern.partition('->')
    return _Rearrange(self.source.text, f'{right.strip()} -> {left.strip()}', self.sizes)


def rearrange(path: str, pattern: str, **sizes: int) -> Rule:
  """Reshape and transpose written as an axis pattern, einops-style: one rule for leaves of any size.

  `rearrange('{b}/q_einsum/kernel', 'd h k -> d (h k)', k=256)`: the names on
  the left bind to the leaf's axes (a parenthesised group is one axis, their
  product); the right side says the order and grouping wanted. Sizes come from
  the leaf; where a group leaves more than one open, or on the way back, give
  them (`k=256` serves heads of any count). Inverted by swapping the sides. A
  leaf the pattern cannot fit is reported with its shape.

  >>> rearrange('{b}/o/kernel', 'h k d -> (h k) d')
  rearrange('{b}/o/kernel', 'h k d -> (h k) d')
  """
  return _Rearrange(path, pattern, sizes)


class _Cast(_PerLeaf):
  def __init__(self, path, dtype):
    super().__init__(path)
    self.dtype = None if dtype is None else np.dtype(dtype)

  def __repr__(self):
    return f"cast({self.source.text!r}, {self.dtype.name if self.dtype is not None else None!r})"

  def op_for(self, path, expr, tally):
    if self.dtype is None or np.dtype(expr.dtype) == self.dtype:
      return _SAME
    return ops.Cast(np.dtype(expr.dtype), self.dtype)

  def inverse(self):
    # Restoring the other way, the target's own dtype decides (every read casts to it).
    return _Cast(self.source.text, None)


def cast(path: str, dtype) -> Rule:
  """Read a leaf as `dtype` (bfloat16 -> float32). Every target leaf is also cast
  to its abstract dtype anyway; this rule makes a conversion explicit in the plan."""
  return _Cast(path, dtype)


Rules = Union[Sequence[Rule], Mapping[str, str], Callable[[Path], Path], str, None]

# `rules='auto'`, or 'auto' in a list of rules: the renames the rules leave to do are inferred from the two
# trees (see pairing.py), only where the pairing is unique.
AUTO = 'auto'


def near_auto(text: Any) -> bool:
  """Whether a string reads like 'auto' ('Auto', 'AUTO', 'atuo') without being it."""
  return (
    isinstance(text, str)
    and text != AUTO
    and bool(difflib.get_close_matches(text.strip().lower(), [AUTO], n=1, cutoff=0.6))
  )


def _like_auto(value: Any) -> str | None:
  if near_auto(value):
    return f"rules={value!r} is no rule: did you mean 'auto' (lower case), which infers the renames?"
  return None


def split_auto(rules: Rules) -> tuple[Rules, bool]:
  """(the rules without 'auto', whether 'auto' was asked for)."""
  if isinstance(rules, str) and rules == AUTO:
    return None, True
  if isinstance(rules, (list, tuple)) and any(isinstance(r, str) and r == AUTO for r in rules):
    rest = [r for r in rules if not (isinstance(r, str) and r == AUTO)]
    return (rest or None), True
  return rules, False


def with_renames(rules: Rules, renames: Mapping[str, str], *, linen_to_nnx: bool) -> list:
  """`rules` and then `rename(renames)`, as applied in the restore's direction: the inferred renames pair
  what the caller's rules left (after them going Linen -> NNX, so before them in the list going back)."""
  if rules is None:
    given: list = []
  elif isinstance(rules, Mapping):
    given = [rename(dict(rules))]
  elif callable(rules) and not isinstance(rules, Rule):
    given = [_OneWay(rules)]
  elif isinstance(rules, Rule):
    given = [rules]
  else:
    given = list(rules)
  inferred = [rename(dict(renames))]
  return given + inferred if linen_to_nnx else inferred + given


def as_python(renames: Mapping[str, str], given: Rules = None) -> str:
  """A rules module the command line's `--rules FILE:RULES` loads: the given rules ('auto' left out), then
  the renames inferred. A plain table given is merged into one `rename`; a rule made from a function has no
  text, so RuleError says to keep it and add the renames after it."""
  given, _ = split_auto(given)
  doc = '"""Rules for orbax-linen-nnx, inferred from the two trees (rules=\'auto\'): check, then keep."""'
  if given is None or isinstance(given, Mapping):
    table = {**(dict(given) if given else {}), **renames}
    lines = [doc, '', 'from orbax_linen_nnx import rename', '', 'RULES = [rename({']
    lines += [f'    {k!r}: {v!r},' for k, v in table.items()]
    return '\n'.join(lines + ['})]', ''])
  shown = []
  for rule in as_rules(given, backward=False):
    text = rule.python()
    if text is None:
      raise RuleError(
        f'{rule!r} is made from a function, which has no Python text to print: keep your own'
        f' rules and add rename({dict(renames)!r}) after them (before any \'auto\')'
      )
    shown.append(text)
  calls = sorted({t.split('(')[0] for t in shown} | {'rename'})
  lines = [doc, '', f"from orbax_linen_nnx import {', '.join(calls)}", '', 'RULES = [']
  lines += [f'    {t},' for t in shown] + ['    rename({'] + [f'        {k!r}: {v!r},' for k, v in renames.items()]
  return '\n'.join(lines + ['    }),', ']', ''])


class _OneWay(Rule):
  """A bare callable `path tuple -> path tuple`, used as given in either direction."""

  def __init__(self, fn):
    self.fn = fn

  def __repr__(self):
    return f'rules={getattr(self.fn, "__name__", "fn")}'

  def python(self):
    return None

  def apply(self, leaves, made_by, tally):
    out = {}
    for path, expr in leaves.items():
      new = self.fn(_split_path(path))
      new = '/'.join(_split_path(new) if isinstance(new, str) else tuple(str(p) for p in new))
      if new != path:
        tally.match(repr(self), path)
        made_by[new] = made_by.pop(path, ()) + (repr(self),)
      _put(out, made_by, new, expr, repr(self), tally)
    return out

  def inverse(self):
    return self


def as_rules(rules: Rules, *, backward: bool) -> list[Rule]:
  """The rules to apply to source model paths, in the direction of the restore."""
  if rules is None:
    return []
  if isinstance(rules, Mapping):
    rules = [rename(dict(rules))]
  elif callable(rules) and not isinstance(rules, Rule):
    return [_OneWay(rules)]
  elif isinstance(rules, Rule):
    rules = [rules]
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
    raise RuleError(
      _like_auto(rules)
      or f'rules= must be a dict {{linen_name: nnx_name}}, a rule, a list of rules'
      f' (rename/split/merge/transpose/reshape/cast), a callable or \'auto\'; got {rules!r}'
    )
  rules = list(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise RuleError(
        _like_auto(r)
        or f'rules= must be rename/split/merge/transpose/reshape/cast rules, a dict'
        f' {{linen_name: nnx_name}}, a callable or \'auto\'; got {r!r} in the list'
      )
  if backward:
    return [r.inverse() for r in reversed(rules)]
  return rules


def apply_all(rules: Sequence[Rule], leaves: dict[str, Any], made_by: dict[str, tuple], tally: Tally) -> dict[str, Any]:
  """Runs every rule, in order, over one model subtree ({path: array})."""
  stages = [leaves]
  for r in rules:
    leaves = r.apply(leaves, made_by, tally)
    stages.append(leaves)
  tally.stages.append(stages)
  return leaves


def _matches(rule: Rule, name: str, leaves: dict[str, Any], tally: Tally) -> list[str]:
  """The paths of `leaves` that entry `name` of `rule` would match, tried on the side (nothing recorded)."""
  probe = Tally()
  probe.targets = tally.targets
  rule.only(name).apply(dict(leaves), {}, probe)
  return list(probe.matched.get(name, ())) if probe.matches.get(name) else []


def _why_unmatched(rules: Sequence[Rule], i: int, name: str, tally: Tally) -> str:
  """Why entry `name` of rule `i` matched nothing: an earlier rule moved what it matches, or the nearest paths."""
  for stages in tally.stages:
    for j in range(i - 1, -1, -1):
      for path in _matches(rules[i], name, stages[j], tally):
        expr = stages[j].get(path)  # (a merge matches several paths at once: they are not one key)
        k = next((k for k in range(j, i) if stages[k + 1].get(path) is not expr), None)
        if expr is None or k is None:
          continue
        moved = [p for p, e in stages[k + 1].items() if e is expr]
        where = f" to '{moved[0]}'" if moved else ''
        return (
          f": {rules[k]!r}, earlier in the list, moved '{path}' (which it matches){where}; write it for the"
          f' new name, or put it before {rules[k]!r}'
        )
  pattern = getattr(rules[i], 'source', None) or (getattr(rules[i], 'sources', None) or [None])[0]
  text = _PLACEHOLDER.sub('', name if pattern is None else pattern.text)
  seen = sorted({p for stages in tally.stages for p in stages[i]})
  close = difflib.get_close_matches(text, seen, n=3, cutoff=0.6)
  return f"; the closest paths when it ran: {', '.join(map(repr, close))}" if close else ''


def unmatched_problems(rules: Sequence[Rule], tally: Tally) -> list[str]:
  """One problem per rule (or rename entry) that matched no leaf, saying why where the rules tell."""
  return [
    f"rule '{n}' matched no source leaf" + _why_unmatched(rules, i, n, tally)
    for i, r in enumerate(rules)
    for n in r.names()
    if not tally.matches.get(n)
  ]

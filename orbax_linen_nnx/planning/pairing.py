"""Which Linen module is which NNX module: a one-to-one pairing from the two trees alone.

Linen names a module by its class and creation order (`Dense_0`, `Dense_1`,
`LayerNorm_0`; in `nn.Dense(8)(nn.Dense(32)(x))` the outer `Dense(8)` is
`Dense_0`); NNX by the attribute the code chose (`fc1`, `norm`). No name tells
the pairing, but a module is known by all of its leaves together (their names
and shapes) and by its submodules: `Dense_0` with kernel (16, 32) and bias
(32,) can only be the one NNX module holding exactly those. Where shapes leave
a choice, the module kinds (`Dense_` and `nnx.Linear`, `Conv_` and `nnx.Conv`)
narrow it, and then the order: Linen's creation index against the NNX
attribute order, known only where the target is an initialised `nnx.Module`
(an `nnx.State`, and `nnx.eval_shape`, sort attributes by name). A pairing settled by order alone is said to be
so; one nothing settles is reported, never guessed silently.

    >>> linen = tree({('Dense_0', 'kernel'): (16, 32), ('Dense_0', 'bias'): (32,),
    ...               ('Dense_1', 'kernel'): (32, 8), ('Dense_1', 'bias'): (8,)})
    >>> nnx_side = tree({('fc1', 'kernel'): (16, 32), ('fc1', 'bias'): (32,),
    ...                  ('fc2', 'kernel'): (32, 8), ('fc2', 'bias'): (8,)})
    >>> pair(linen, nnx_side).renames
    {'Dense_0': 'fc1', 'Dense_1': 'fc2'}

Pure: paths and shapes in, a pairing out.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Mapping, cast

from orbax_linen_nnx import layout

Path = layout.Path

# Linen module classes and the NNX classes that hold the same parameters.
KINDS = {
  'Dense': ('Linear',),
  'DenseGeneral': ('LinearGeneral', 'Linear'),
  'Conv': ('Conv',),
  'ConvTranspose': ('ConvTranspose',),
  'Embed': ('Embed',),
  'LayerNorm': ('LayerNorm',),
  'RMSNorm': ('RMSNorm',),
  'GroupNorm': ('GroupNorm',),
  'BatchNorm': ('BatchNorm',),
  'MultiHeadDotProductAttention': ('MultiHeadAttention',),
  'MultiHeadAttention': ('MultiHeadAttention',),
  'SelfAttention': ('MultiHeadAttention',),
  'Einsum': ('Einsum',),
  'LSTMCell': ('LSTMCell',),
  'GRUCell': ('GRUCell',),
}

_LINEN_NAME = re.compile(r'([A-Za-z]\w*?)_(\d+)')
_TIES_TRIED = 7  # groups of equal modules up to this size are paired by trying every assignment


@dataclasses.dataclass(eq=False)
class Module:
  """A module of one side's tree: its leaves (name -> shape) and submodules, its kind and order.

  `kind` is the module's class (from a Linen name such as `Dense_3`, or the
  NNX class where the target is a module); `order` its creation index (Linen)
  or attribute position (NNX), None where unknown.
  """

  path: Path
  given: str = ''  # the path as the tree names it, where that differs ('layers_3/Dense_0' for layers/3/Dense_0)
  leaves: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  children: dict[str, 'Module'] = dataclasses.field(default_factory=dict)
  kind: str | None = None
  order: int | None = None

  @functools.cached_property
  def signature(self) -> tuple:
    """What identifies the module whatever it and its submodules are named: its leaves' shapes, its submodules'."""
    return (tuple(sorted(self.leaves.items())), tuple(sorted(c.signature for c in self.children.values())))

  def describe(self) -> str:
    shown = ', '.join(f'{k} {v}' for k, v in sorted(self.leaves.items()))
    return shown or f'{len(self.children)} submodules'


def tree(leaves: Mapping[Path, tuple[int, ...]], info: Mapping[Path, tuple[int | None, str]] | None = None) -> Module:
  """The module tree of model paths -> shapes; `info` gives (order, class) of modules where known.

  Without `info`, Linen's automatic names give both: `Dense_3` is the fourth
  `Dense` made. Linen's per-layer names become list entries (`layers_3` ->
  `layers/3`, as NNX names them) so both trees have one shape; each module
  keeps the path its tree gives it, which is what renames are written in.
  """
  root = Module(())
  for path, shape in leaves.items():
    node, at = root, cast(tuple[str, ...], ())
    for seg in path[:-1]:
      parts = layout.nnx_names((seg,))
      given = '/'.join(filter(None, (node.given if node is not root else '', seg)))
      for k, part in enumerate(parts):
        at += (part,)
        if part not in node.children:
          node.children[part] = Module(at, given if k == len(parts) - 1 else '')
        node = node.children[part]
    node.leaves[path[-1]] = tuple(shape)
  for node in _walk(root):
    # `info` is keyed by the tree's own paths: an NNX attribute `block_0` is the node `block/0`.
    known = info and (info.get(tuple(node.given.split('/'))) if node.given else info.get(node.path))
    if known:
      node.order, node.kind = known
    elif node.path and (m := _LINEN_NAME.fullmatch(node.path[-1])) and node.path[-1][:1].isupper():
      node.kind, node.order = m[1], int(m[2])
  return root


def _walk(node: Module):
  yield node
  for c in node.children.values():
    yield from _walk(c)


@dataclasses.dataclass
class Pairing:
  """Source module path -> target module path, and what the shapes alone could not settle.

  `renames` holds only the entries a rename needs ('/'-joined paths; a
  submodule that keeps its name under a renamed parent needs none). `by_order`
  and `unsettled` describe groups of modules that look alike: paired by their
  order, or not told apart at all (paired in name order, to be checked).
  `unpaired` lists modules of either side left without a partner. `open`
  holds the pairs of the unsettled groups as name order made them (source ->
  target path, as renames name them): each is a rename the user can state,
  where it is right, to settle it.
  """

  renames: dict[str, str] = dataclasses.field(default_factory=dict)
  by_order: list[str] = dataclasses.field(default_factory=list)
  unsettled: list[str] = dataclasses.field(default_factory=list)
  open: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  unpaired: list[str] = dataclasses.field(default_factory=list)


_KNOWN = frozenset(KINDS) | {k for kinds in KINDS.values() for k in kinds}


def _compatible(a: Module, b: Module) -> bool | None:
  """Whether two modules' kinds can hold the same weights (None: a kind is unknown, or the user's own class,
  whose Linen and NNX names need not agree)."""
  if a.kind is None or b.kind is None:
    return None
  if a.kind == b.kind:
    return True
  if a.kind not in _KNOWN or b.kind not in _KNOWN:
    return None
  return b.kind in KINDS.get(a.kind, ()) or a.kind in KINDS.get(b.kind, ())


def kinds_agree(a: Module, b: Module) -> bool | None:
  """Whether two modules' kinds can hold the same weights (None: unknown); see `_compatible`."""
  return _compatible(a, b)


def leaf_modules(root: Module) -> list[Module]:
  """The modules of a tree that hold leaves of their own, each named as its tree names it (`shown`)."""
  return [m for m in _walk(root) if m.leaves]


def shown(m: Module) -> str:
  """A module as its own tree names it (`block2_0/bn1`, not the entry `block2/0/bn1` pairing reads it as)."""
  return _shown(m)


def _ordered(assignment, sources, targets) -> bool:
  """Whether an assignment keeps the order of modules of one kind on both sides."""
  pairs = [(s, targets[j]) for s, j in zip(sources, assignment)]
  for (s1, t1), (s2, t2) in itertools.combinations(pairs, 2):
    if s1.kind != s2.kind or None in (s1.order, s2.order, t1.order, t2.order):
      continue
    if (s1.order < s2.order) != (t1.order < t2.order):
      return False
  return all(None not in (s.order, t.order) for s, t in pairs)


def _name(path: Path) -> str:
  return '/'.join(path)


def _shown(m: Module) -> str:
  """A module as its own tree names it (`block2_0/bn1`, not the entry `block2/0/bn1` pairing reads it as)."""
  return m.given or _name(m.path)


def _settle(sources: list[Module], targets: list[Module], out: Pairing) -> list[tuple[Module, Module]]:
  """Pairs modules that look alike (one signature), by kind, then order; records what stays open."""
  if len(sources) == len(targets) == 1:
    return [(sources[0], targets[0])]
  n = min(len(sources), len(targets))
  if len(sources) != len(targets) or n > _TIES_TRIED:
    paired = list(zip(sorted(sources, key=lambda m: m.path), sorted(targets, key=lambda m: m.path)))
    left = [m for m in sources + targets if not any(m is a or m is b for a, b in paired)]
    out.unsettled.append(
      f"{', '.join(_shown(m) for m in sources)} and {', '.join(_shown(m) for m in targets)} all hold"
      f' {sources[0].describe()}: {len(sources)} against {len(targets)}, paired in name order'
    )
    out.unpaired += [_shown(m) for m in left]
    out.open += [(a.given, b.given) for a, b in paired]
    return paired
  fits = [
    p
    for p in itertools.permutations(range(n))
    if all(_compatible(s, targets[j]) is not False for s, j in zip(sources, p))
  ]
  ordered = [p for p in fits if _ordered(p, sources, targets)]
  names = f"{', '.join(_shown(m) for m in sources)} and {', '.join(_shown(m) for m in targets)}"
  numbered = _by_numbers(targets) if len(ordered) != 1 and any(t.order is None for t in targets) else None
  guessed = [p for p in fits if _ordered(p, sources, numbered)] if numbered else []
  if len(fits) == 1:
    chosen = fits[0]
  elif len(ordered) == 1:
    chosen = ordered[0]
    out.by_order.append(f'{names} all hold {sources[0].describe()}: paired in creation and attribute order')
  elif len(guessed) == 1:
    chosen = guessed[0]
    shown = ', '.join(f'{s.given} -> {targets[j].given}' for s, j in zip(sources, chosen))
    out.by_order.append(
      f'{names} all hold {sources[0].describe()}: paired as a guess, creation order against'
      f' the numbers in the NNX names ({shown}); if the numbers do not follow the order the'
      ' modules are made in, state the renames'
    )
  else:
    chosen = (ordered or fits or [tuple(range(n))])[0]
    why = (
      'no attribute order on the NNX side: an NNX checkpoint, an nnx.State and nnx.eval_shape sort attributes'
      ' by name; only the model itself (an initialised nnx.Module) as the target keeps the order its __init__'
      ' made them'
      if any(t.order is None for t in targets)
      else 'neither kinds nor order tell them apart'
    )
    out.unsettled.append(f'{names} all hold {sources[0].describe()} ({why}): paired in name order, check them')
    out.open += [(s.given, targets[j].given) for s, j in zip(sources, chosen)]
  return [(s, targets[j]) for s, j in zip(sources, chosen)]


_NUMBERED = re.compile(r'(.*?)(\d+)')


def _by_numbers(targets: list[Module]) -> list[Module] | None:
  """The targets ordered by the numbers that end their names, where they are one numbered family (`ln1`, `ln2`;
  `conv_0`, `conv_1`; list entries) whose order is not known otherwise; else None. Only a guess: `nnx.eval_shape`
  and `nnx.State` keep no attribute order, and names like these usually count in the order modules are made."""
  found = [_NUMBERED.fullmatch((t.given or '/'.join(t.path)).rsplit('/', 1)[-1]) for t in targets]
  matched = [m for m in found if m]
  if (
    len(matched) != len(found) or len({m[1] for m in matched}) != 1 or len({int(m[2]) for m in matched}) != len(matched)
  ):
    return None
  return [dataclasses.replace(t, order=int(m[2])) for t, m in zip(targets, matched)]


def _entries(children: list[Module]) -> list[Module]:
  """The children, each list of modules (only digit-named children, no leaves) replaced by its entries."""
  out = []
  for c in children:
    if (
      c.children and not c.leaves and all(k.isdigit() for k in c.children) and all(e.given for e in c.children.values())
    ):
      out += list(c.children.values())
    else:
      out.append(c)
  return out


def _pair_children(src: Module, tgt: Module, produced: Path, out: Pairing) -> None:
  """Pairs the submodules of two paired modules, then theirs; `produced` is where the rules put `src`."""
  pairs = [(src.children[k], tgt.children[k]) for k in src.children if k in tgt.children]
  # A list of modules one side names apart (NNX `blocks/0..2`, `nnx.List`) may be the other side's siblings
  # (Linen's `ResNetBlock_0..2`): its entries stand beside the other children.
  rest_s = _entries([c for k, c in src.children.items() if k not in tgt.children])
  rest_t = _entries([c for k, c in tgt.children.items() if k not in src.children])
  groups: dict[tuple, tuple[list, list]] = {}
  for c in rest_s:
    groups.setdefault(c.signature, ([], []))[0].append(c)
  for c in rest_t:
    groups.setdefault(c.signature, ([], []))[1].append(c)
  for sources, targets in groups.values():
    if sources and targets:
      pairs += _settle(sources, targets, out)
    else:
      out.unpaired += [_shown(m) for m in sources + targets]
  for a, b in pairs:
    if _pair_stack(a, b, out):
      continue
    at = produced + (a.path[-1],)
    if at != b.path and a.given and b.given:  # (a list entry of one side only is renamed with its entries)
      out.renames[a.given] = b.given
      at = b.path
    _pair_children(a, b, at, out)


def _unstacked(m: Module, layers: int, axis: int = 0) -> Module | None:
  """`m` as one layer of a stack of `layers` along `axis` of every leaf, or None."""
  leaves = {}
  for k, shape in m.leaves.items():
    if len(shape) <= axis or shape[axis] != layers:
      return None
    leaves[k] = shape[:axis] + shape[axis + 1 :]
  children = {}
  for k, c in m.children.items():
    one = _unstacked(c, layers, axis)
    if one is None:
      return None
    children[k] = one
  return Module(m.path, m.given, leaves, children, m.kind, m.order)


def _pair_stack(a: Module, b: Module, out: Pairing) -> bool:
  """Pairs Linen's per-layer blocks (`layers_0..N-1`, a list here) with an NNX stack of them (`nnx.vmap`:
  every leaf with the layer axis first), one layer for all: renames `layers_{i}/...` (the planner stacks
  the layers after the rules). False where `a` and `b` are not that."""
  entries = list(a.children.values())
  if a.children and b.children and not any(k.isdigit() for k in (*a.children, *b.children)):
    return _pair_stacks(a, b, out)
  if not (
    entries
    and not a.leaves
    and all(k.isdigit() for k in a.children)
    and b.children
    and not any(k.isdigit() for k in b.children)
  ):
    return False
  first = a.children[min(a.children, key=int)]
  one = _unstacked(b, len(entries))
  if one is None or any(e.signature != first.signature for e in entries) or not re.fullmatch(r'.*_0', first.given):
    return False
  layer = Pairing()
  _pair_children(first, one, first.path, layer)
  per_layer = first.given[:-1] + '{i}'
  for k, v in _pruned(layer.renames, first).items():
    out.renames[per_layer + k[len(first.given) :]] = per_layer + v[len(b.given) :]
  out.by_order += layer.by_order
  out.unsettled += layer.unsettled
  out.unpaired += layer.unpaired
  out.open += [(per_layer + k[len(first.given) :], per_layer + v[len(b.given) :]) for k, v in layer.open]
  return True


def _first_leaf(m: Module) -> tuple[int, ...] | None:
  for shape in m.leaves.values():
    return shape
  for c in m.children.values():
    found = _first_leaf(c)
    if found is not None:
      return found
  return None


def _pair_stacks(a: Module, b: Module, out: Pairing) -> bool:
  """Pairs two stacks whose submodules differ only by where the layer axis is (Linen `nn.scan` with
  MaxText's `param_scan_axis` 1 against `nnx.vmap`'s 0): one layer against one layer. False otherwise
  (the submodules are then paired as they are)."""
  if a.signature == b.signature or not b.path or b.path[-1] != a.path[-1]:
    return False
  first = _first_leaf(b)
  if not first:
    return False
  one_b = _unstacked(b, first[0], 0)
  for axis in (1, 0):
    one_a = _unstacked(a, first[0], axis)
    if (
      one_a is not None
      and one_b is not None
      and sorted(c.signature for c in one_a.children.values()) == sorted(c.signature for c in one_b.children.values())
      and one_a.signature != a.signature
    ):
      layer = Pairing()
      _pair_children(one_a, one_b, one_a.path, layer)
      out.renames.update(_pruned(layer.renames, one_a))
      out.by_order += layer.by_order
      out.unsettled += layer.unsettled
      out.unpaired += layer.unpaired
      out.open += layer.open
      return True
  return False


def pair(source: Module, target: Module) -> Pairing:
  """The one-to-one pairing of `source`'s modules with `target`'s (see the module docstring)."""
  out = Pairing()
  _pair_children(source, target, (), out)
  # A rename is kept where some leaf needs it: renames match the longest prefix, so a module whose every
  # submodule is renamed on its own (a block whose convs all change names) needs no entry of its own.
  out.renames = _pruned(out.renames, source)
  return out


def _pruned(renames: Mapping[str, str], source: Module) -> dict[str, str]:
  """The renames some leaf of `source` needs, in Linen's creation order."""
  by_given = {m.given: m for m in _walk(source) if m.given}
  return {
    k: v
    for k, v in sorted(renames.items(), key=lambda kv: _sort_key(kv[0]))
    if k not in by_given or _needs(by_given[k], renames, own=True)
  }


def _needs(m: Module, renames: Mapping[str, str], own: bool = False) -> bool:
  """Whether a leaf under `m` is renamed by the entry above it (`own`: by `m`'s own entry)."""
  if not own and m.given in renames:
    return False
  return bool(m.leaves) or any(_needs(c, renames) for c in m.children.values())


def _sort_key(path: str) -> tuple:
  """Linen names in creation order ('Dense_2' before 'Dense_10')."""
  return tuple((int(p) if p.isdigit() else p) for p in re.split(r'(\d+)', path))

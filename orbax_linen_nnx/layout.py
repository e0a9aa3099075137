"""What a training-state tree looks like, and what each of its leaves *means*.

Linen and NNX store the same training state under different paths (see docs/layouts.md):

    linen  params/params/Dense_0/kernel          nnx  model/Dense_0/kernel/value
    linen  opt_state/0/mu/params/Dense_0/kernel  nnx  optimizer/opt_state/0/mu/Dense_0/kernel/value
    linen  step                                  nnx  optimizer/step/value

This module turns a list of leaf paths into `Leaf` records that name the leaf in
a layout-free way (its `Meaning`), so that a Linen leaf and an NNX leaf that hold
the same thing compare equal. It is pure: paths in, records out, no IO.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable, Sequence

Path = tuple[str, ...]

LINEN = 'linen'
NNX = 'nnx'
LAYOUTS = (LINEN, NNX)
VALUE = 'value'  # an NNX Variable is stored as a {'value': ...} node

# Where NNX runs that write the Linen layout (MaxText's pure_nnx) keep the
# persistent NNX state Linen has no place for (RNG streams, batch stats, custom
# Variables): the pure dict of that state, `nnx_aux/model/bn/mean`, ...
NNX_AUX = 'nnx_aux'
# Or beside the Linen tree instead of in it: a PyTree of its own in the item's
# `nnx_aux/` directory, which Linen readers never see (LinenCompatSave's default).
SIDECAR = 'sidecar'
AUX_PLACES = (SIDECAR, NNX_AUX, None)

# Linen collections whose name may sit right under `params` when a TrainState was
# created with `params=variables` (the 'params' level seen twice on disk).
_KNOWN_COLLECTIONS = frozenset({'params', 'batch_stats', 'cache', 'intermediates', 'losses', 'spectral'})


@dataclasses.dataclass(frozen=True, order=True)
class Meaning:
  """Layout-free name of a leaf.

  `section` says which part of the training state the leaf belongs to:
  `('model',)` for model variables, `('opt_state', '0', 'count')` for an
  optimizer leaf, `('opt_state', '0', 'mu')` for an optimizer subtree that
  mirrors the model, `('step',)` for the step counter. `param` is the path of
  the model variable the leaf holds or mirrors (`('Dense_0', 'kernel')`), and
  is empty for leaves that mirror nothing.
  """

  section: Path
  param: Path = ()

  def __str__(self) -> str:
    return '/'.join(self.section + self.param)


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One leaf of a tree in some layout, with what it means.

  `collection` is the Linen collection the leaf came from ('params',
  'batch_stats', ...) when the layout says so, else None.
  """

  path: Path
  meaning: Meaning
  collection: str | None = None


def render(path: Sequence[str]) -> str:
  """'params/params/Dense_0/kernel' for ('params', 'params', 'Dense_0', 'kernel')."""
  return '/'.join(path) if path else '<root>'


def key_path(keys) -> Path:
  """A JAX key path (DictKey, SequenceKey, GetAttrKey, ...) as a tuple of strings."""
  out = []
  for key in keys:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        out.append(str(getattr(key, attr)))
        break
    else:
      out.append(str(key))
  return tuple(out)


def is_rng_path(path: Sequence[str]) -> bool:
  """Whether a path holds NNX RNG state (`rngs/...`, `to_nnx__rngs/...`)."""
  return any(p == 'rngs' or p.endswith('__rngs') for p in path)


def detect(paths: Iterable[Path]) -> str:
  """Guesses the layout ('linen' or 'nnx') of a tree from its leaf paths.

  NNX train states are {'model': ..., 'optimizer': ...}; NNX checkpoints wrap
  every variable in a {'value': ...} node. Anything else is read as Linen.

  >>> detect([('model', 'fc1', 'kernel', 'value')])
  'nnx'
  """
  paths = list(paths)
  if not paths:
    return LINEN
  top = {p[0] for p in paths if p}
  if 'model' in top and top <= {'model', 'optimizer'}:
    return NNX
  if all(p and p[-1] == VALUE for p in paths):
    return NNX
  return LINEN


def stored(path: Path, variable: bool = True) -> Path:
  """Where an NNX checkpoint stores the leaf at `path`: a Variable's value in its {'value': ...} node.

  >>> stored(('model', 'fc1', 'kernel'))
  ('model', 'fc1', 'kernel', 'value')
  """
  return path + (VALUE,) if variable else path


def _strip_value(path: Path) -> Path:
  return path[:-1] if path and path[-1] == VALUE else path


def _has_collection_level(rel_paths: Sequence[Path]) -> bool:
  """Whether the first level under a Linen model root is a collection name."""
  firsts = {p[0] for p in rel_paths if p}
  inner = all(len(p) >= 2 for p in rel_paths)
  return inner and 'params' in firsts and firsts <= _KNOWN_COLLECTIONS


_INDEXED = re.compile(r'(.+)_(\d+)')


def normalize_layers(param: Path) -> Path:
  """('layers_3', 'mlp') and ('layers', '3', 'mlp') both -> ('layers', '3', 'mlp')."""
  out: list[str] = []
  for seg in param:
    m = _INDEXED.fullmatch(seg)
    out.extend(m.groups() if m else (seg,))
  return tuple(out)


def linen_names(param: Path) -> Path:
  """A model path as Linen names it: per-layer indices joined to their name.

  >>> linen_names(('layers', '3', 'mlp', 'kernel'))
  ('layers_3', 'mlp', 'kernel')
  """
  out: list[str] = []
  for seg in param:
    if seg.isdigit() and out:
      out[-1] = f'{out[-1]}_{seg}'
    else:
      out.append(seg)
  return tuple(out)


def nnx_names(param: Path) -> Path:
  """A model path as NNX names it: a list of modules (`layers_3`) as `layers/3`.

  Linen's automatic names (`Dense_0`, class name and call index) stay: they
  name attributes, not list entries, and the pairing treats both alike.

  >>> nnx_names(('layers_3', 'Dense_0', 'kernel'))
  ('layers', '3', 'Dense_0', 'kernel')
  """
  out: list[str] = []
  for seg in param:
    m = _INDEXED.fullmatch(seg)
    out.extend(m.groups() if m and not seg[:1].isupper() else (seg,))
  return tuple(out)


def _mirrors_variable(rel: Path, model: set[Path]) -> bool:
  """Whether `rel` names a model variable, in any per-layer form, or one layer of a stacked one.

  Optimizer mirrors do not always spell layers as the params do (a converter
  may leave Adam's moments as `layers_3` under params `layers/3`, or per layer
  under a stacked params tree).
  """
  n = normalize_layers(rel)
  return n in model or any(n[:i] + n[i + 1 :] in model for i in range(1, len(n)) if n[i].isdigit())


def _mirror_roots(rel_paths: Sequence[Path], model: set[Path]) -> dict[Path, int]:
  """For each optimizer leaf, the length of its shortest prefix that mirrors the model.

  A prefix node mirrors the model when every leaf under it, relative to the
  node, is a path of a model variable (optax's mu/nu, trace, ...). Leaves under
  no such node (counts, hyperparameters) are absent from the result.
  """
  model = {normalize_layers(p) for p in model}
  under: dict[Path, list[Path]] = collections.defaultdict(list)
  for p in rel_paths:
    for k in range(1, len(p)):
      under[p[:k]].append(p[k:])
  mirrors = {node for node, rels in under.items() if all(_mirrors_variable(r, model) for r in rels)}
  result = {}
  for p in rel_paths:
    for k in range(1, len(p)):
      if p[:k] in mirrors:
        result[p] = k
        break
  return result


def base_of(
  section: Path,
  layout: str,
  *,
  train_state: bool = True,
  collection_level: bool = True,
  has_param: bool = True,
  batch_stat: bool = False,
  aside: bool = False,
) -> Path | None:
  """Where a training state saved in `layout` keeps the leaves of `section` (`Meaning.section`): the inverse
  of `describe`, whose meaning's `param` is then appended (NNX: `stored` around it). None: no such section.

  Linen (a `TrainState` saved whole): the model under `params/params` (`params` alone without the
  collection level, or for a model saved alone: `train_state=False`), batch statistics beside it in
  `batch_stats`, NNX-only state `aside` under `nnx_aux/model`, moments under their `opt_state` entry with a
  `params` level, the step at `step`. NNX: `model/...`, `optimizer/opt_state/...`, `optimizer/step`.

  >>> base_of(('model',), 'linen'), base_of(('opt_state', '0', 'mu'), 'linen'), base_of(('step',), 'nnx')
  (('params', 'params'), ('opt_state', '0', 'mu', 'params'), ('optimizer', 'step'))
  >>> [str(l.meaning) for l in describe([stored(base_of(('model',), 'nnx') + ('fc1', 'kernel'))], 'nnx')]
  ['model/fc1/kernel']
  """
  if section == ('step',):
    return ('step',) if layout == LINEN else ('optimizer', 'step')
  if layout == NNX:
    if section == ('model',):
      return ('model',) if train_state else ()
    return ('optimizer',) + section if section[:1] == ('opt_state',) else None
  if section == ('model',):
    if aside:
      return (NNX_AUX, 'model')
    if batch_stat:
      return ('batch_stats',)
    return ('params', 'params') if train_state and collection_level else ('params',)
  if section[:1] == ('opt_state',):
    return section + (('params',) if has_param and collection_level else ())
  return None


def describe(paths: Iterable[Path], layout: str) -> list[Leaf]:
  """Names every leaf of a tree given in `layout` by what it means.

  >>> [str(l.meaning) for l in describe([('params', 'params', 'Dense_0', 'kernel'),
  ...                                   ('step',)], 'linen')]
  ['model/Dense_0/kernel', 'step']
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  paths = list(paths)
  clean = {p: (_strip_value(p) if layout == NNX else p) for p in paths}
  top = {c[0] for c in clean.values() if c}

  # Where the model, the optimizer state and the step live in this layout.
  if layout == LINEN and 'params' in top and top & {'opt_state', 'step'}:
    model_root: Path = ('params',)
    opt_root: Path | None = ('opt_state',)
    step_path: Path | None = ('step',)
    extra_collections = top - {'params', 'opt_state', 'step'}
  elif layout == NNX and 'model' in top and top <= {'model', 'optimizer'}:
    model_root, opt_root = ('model',), ('optimizer', 'opt_state')
    step_path = ('optimizer', 'step')
    extra_collections = set()
  else:
    model_root, opt_root, step_path = (), None, None
    extra_collections = set()

  def rel(c: Path, root: Path) -> Path | None:
    return c[len(root) :] if c[: len(root)] == root and len(c) > len(root) else None

  model_rel = [r for c in clean.values() if (r := rel(c, model_root)) is not None]
  model_rel = [r for r in model_rel if not (model_root == () and (r[0] in extra_collections or r[0] == NNX_AUX))]
  collection_level = layout == LINEN and _has_collection_level(model_rel)
  opt_rel = [r for c in clean.values() if opt_root and (r := rel(c, opt_root)) is not None]
  mirror_len = _mirror_roots(opt_rel, set(model_rel))

  leaves = []
  for path, c in clean.items():
    collection = None
    if step_path is not None and c == step_path:
      meaning = Meaning(('step',))
    elif layout == LINEN and len(c) > 2 and c[:2] == (NNX_AUX, 'model'):
      # NNX state of the model that the Linen layout cannot hold, as NNX names it.
      meaning, collection = Meaning(('model',), c[2:]), NNX_AUX
    elif c and c[0] in extra_collections:
      # A Linen TrainState field beside `params` (e.g. batch_stats) is a collection.
      meaning, collection = Meaning(('model',), c[1:]), c[0]
    elif opt_root and (r := rel(c, opt_root)) is not None:
      k = mirror_len.get(r)
      if k is None:
        meaning = Meaning(('opt_state',) + r)
      else:
        param = r[k:]
        if collection_level:
          collection, param = param[0], param[1:]
        meaning = Meaning(('opt_state',) + r[:k], param)
    elif (r := rel(c, model_root)) is not None:
      if collection_level:
        collection, r = r[0], r[1:]
      elif layout == LINEN:
        collection = 'params'
      meaning = Meaning(('model',), r)
    else:
      meaning = Meaning(('unrecognised',) + c)
    leaves.append(Leaf(path, meaning, collection))
  return leaves

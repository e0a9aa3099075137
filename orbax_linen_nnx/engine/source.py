"""The checkpoint being read: its arrays, each opened once, from metadata alone.

The tree comes from the item's `_METADATA` (read by Orbax's own
`InternalTreeMetadata`); each stored array is then opened once through Orbax's
read spec, in one shared TensorStore context. The open stores give every
array's shape, dtype and chunk grid to the planner, and serve the reads.
Opening is issued for all arrays at once and awaited together, so a
checkpoint of thousands of arrays opens in a fraction of a millisecond each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from orbax_linen_nnx.engine import _internals

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning.plans import SourceArray


# Where LinenCompatSave writes the NNX-only state a Linen tree has no place for
# (RNG streams, custom Variables): a PyTree of its own inside the item
# directory, beside the Linen tree, which Linen readers never open. Its arrays
# are read as the `nnx_aux/...` subtree MaxText keeps in its tree.
SIDECAR_DIR = layout.NNX_AUX


class CheckpointNotFoundError(FileNotFoundError):
  """The directory holds no Orbax PyTree checkpoint item."""


class DamagedCheckpointError(ValueError):
  """The checkpoint is unfinished (a save still running or interrupted) or its files are damaged."""


class UntrustedCheckpointError(DamagedCheckpointError):
  """A checkpoint that would make a read leave its own directory: a symlink out, an array name that climbs out."""


class UnsupportedStorageError(ValueError):
  """The path is on a storage Orbax cannot open checkpoints on (this package reads and writes through Orbax)."""


def check_storage(path: epath.PathLike, *, saving: bool = False) -> None:
  """Refuses, before any request, a URL whose storage the installed Orbax cannot open checkpoints on.

  Asked of Orbax itself: the TensorStore spec it builds for an array there.
  Orbax 0.12 builds specs for local paths and gs:// only; for s3:// (az://,
  ...) it raises for an OCDBT checkpoint, and for any other it names a local
  file `s3:/bucket/...` (relative, under the working directory). A later Orbax
  that opens such URLs passes this check unchanged. `saving`: the path is
  being saved to (perhaps under Orbax's temporary name), and the fix says how
  to save instead.
  """
  path = epath.Path(path)
  text = os.fspath(path)
  if '://' not in text:
    return
  context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
  try:
    specs = [_spec_template(path, use_ocdbt, False, context) for use_ocdbt in (True, False)]
    problem = None if not any(_drivers(s) & {'file'} for s in specs) else 'it would open it as a local file'
  except ValueError as e:
    problem = f'it raises "{e}"'
  if problem is None:
    return
  scheme = text.split('://', 1)[0]
  named = re.sub(re.escape(ocp.path.step.TMP_DIR_SUFFIX) + r'[^/]*', '', text)  # as the save will name it
  fix = (
    (
      f'save to the mounted bucket\'s local path, or save to local disk and copy the checkpoint up (e.g.'
      f' `aws s3 cp --recursive /local/dir {named}`)'
    )
    if saving
    else (
      f'pass the mounted local path, or copy the checkpoint to local disk (e.g. `aws s3 cp --recursive'
      f' {named} /local/dir`) and pass that'
    )
  )
  raise UnsupportedStorageError(
    f'{named}: Orbax {ocp.__version__} cannot open checkpoints on {scheme}:// (asked for the TensorStore spec of'
    f' an array there, {problem}); this package reads and writes through Orbax, so it cannot either. Mount the'
    f' bucket (e.g. mountpoint-s3 or s3fs-fuse) and {fix}. gs:// is supported as it is'
  )


def _drivers(spec) -> set[str]:
  """Every TensorStore driver named in a spec (nested kvstores included)."""
  if isinstance(spec, dict):
    return ({spec['driver']} if isinstance(spec.get('driver'), str) else set()).union(
      *(_drivers(v) for v in spec.values())
    )
  if isinstance(spec, list):
    return set().union(*(_drivers(v) for v in spec))
  return set()


_PICK_ANOTHER = 'restore another step (CheckpointManager.all_steps() lists the finished ones)'


def _check_temporary(path: epath.Path) -> None:
  """Refuses a path under Orbax's temporary name (local disk: a save writes there, then renames)."""
  for d in (path, path.parent):
    if ocp.path.step.TMP_DIR_SUFFIX in d.name:
      raise DamagedCheckpointError(
        f'{d} is a checkpoint Orbax has not finished writing (its temporary name ends in'
        f' {ocp.path.step.TMP_DIR_SUFFIX}...): the save is still running or was interrupted; {_PICK_ANOTHER}'
      )


def _unfinished(d: epath.Path) -> DamagedCheckpointError:
  return DamagedCheckpointError(
    f'{d} has no commit marker ({COMMIT_MARKER}): its save did not finish (on this storage Orbax writes in'
    f' place and commits last, so an interrupted save leaves what it wrote); {_PICK_ANOTHER}'
  )


# The file Orbax writes last into each directory it saves on object stores
# (gs://, s3://), where nothing can be renamed atomically.
COMMIT_MARKER = 'commit_success.txt'


def is_finished(d: epath.Path) -> bool:
  """Orbax's own test that a save of `d` finished, for the storage `d` is on.

  Local disk: `d` is not under a temporary name (a save renames it last).
  Object stores: `d` holds the commit marker. The same holds for a manager's
  step directory and for each item in it, and for a bare save's directory.
  """
  return ocp.path.step.is_path_finalized(d)


def _check_finished(item: epath.Path) -> None:
  """Refuses an item whose save did not finish, or that is part of a manager step that did not.

  The item's own mark (a bare save, `StandardCheckpointer().save(path)`, has
  only that one, whatever its parent is called); a step a CheckpointManager
  wrote (it holds `_CHECKPOINT_METADATA`) must be finished too.
  """
  _check_temporary(item)
  if not is_finished(item):
    raise _unfinished(item)
  step = item.parent
  if step.name.isdigit() and (step / STEP_METADATA_FILE).exists() and not is_finished(step):
    raise _unfinished(step)


# What a CheckpointManager writes into each step directory (beside its items).
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'


# Orbax value types stored as TensorStore arrays (jax.Array, np.ndarray, Python
# scalars); strings and empty nodes carry no model state.
_STORED_TYPES = frozenset({'jax.Array', 'np.ndarray', 'scalar'})


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """An Orbax PyTree checkpoint item directory, its arrays and their open stores.

  The arrays of `LinenCompatSave`'s sidecar (`<item>/nnx_aux/`) are listed
  too, under `nnx_aux/...`, as MaxText keeps that state in its tree.
  """

  directory: epath.Path
  arrays: tuple[SourceArray, ...]
  use_ocdbt: bool
  use_zarr3: bool
  stores: dict[str, ts.TensorStore] = dataclasses.field(repr=False, compare=False)
  sidecar: bool = False  # arrays under nnx_aux/ came from the item's nnx_aux/ PyTree (LinenCompatSave's)

  @property
  def layout(self) -> str:
    return layout.detect(a.path for a in self.arrays)


def _not_found(path: epath.Path) -> CheckpointNotFoundError:
  """`path` does not exist: say so, and what the nearest directory above it that does exist holds."""
  above = path.parent
  while not above.exists() and above != above.parent:
    above = above.parent
  steps = ocp.utils.checkpoint_steps(above) if above.is_dir() else []
  where = f'; {above} holds the finished steps {sorted(steps)}' if steps else ''
  return CheckpointNotFoundError(f'checkpoint directory {path} does not exist{where}')


def _step_directory(run: epath.Path, step: int) -> epath.Path:
  """The directory of `step` in a run directory; a step that is not there names the steps that are."""
  if not run.exists():
    raise _not_found(run)
  try:
    return ocp.path.step.find_step_path(run, ocp.path.step.standard_name_format(), step=step)
  except ValueError:
    steps = sorted(ocp.utils.checkpoint_steps(run))
    raise CheckpointNotFoundError(
      f'{run} holds no finished step {step}; its finished steps are {steps or "none"}'
    ) from None


def _items(directory: epath.Path) -> list[str]:
  """The children of `directory` that hold a PyTree `_METADATA`, from one listing (one request on an object
  store, where asking each child costs two)."""
  return sorted(p.parent.name for p in directory.glob(f'*/{ocp.path.format_utils.PYTREE_METADATA_FILE}'))


def _latest_step(run: epath.Path) -> epath.Path | None:
  """A run directory's latest finished step, or None when `run` is no run directory (it holds items)."""
  if any(not name.isdigit() for name in _items(run)):
    return None
  steps = ocp.utils.checkpoint_steps(run)
  return _step_directory(run, max(steps)) if steps else None


def locate(path: epath.PathLike, *, step: int | None = None, item: str | None = None) -> epath.Path:
  """The PyTree item directory a path names, whichever level it is given at.

  `path` is an item directory (`<run>/<step>/default`, a published bare
  checkpoint), a step directory (its one PyTree item, or `default`), or a run
  directory (the finished `step`, default its latest). `item` names the item
  of a step that holds several. A path that does not exist, or a step the run
  does not hold, raises `CheckpointNotFoundError` saying what is there.
  """
  check_storage(path)
  path = epath.Path(path)
  if not path.exists():
    raise _not_found(path)
  _check_temporary(path)  # a step or item Orbax is still writing has no _METADATA yet
  if step is not None:
    path = _step_directory(path, step)
  elif path.is_dir() and not (path / ocp.path.format_utils.PYTREE_METADATA_FILE).exists():
    path = _latest_step(path) or path
  return path / item if item is not None else item_directory(path)


def item_directory(directory: epath.Path) -> epath.Path:
  """The PyTree item to read: `directory` itself, or the one item (or 'default') of a step directory."""
  if not directory.exists():
    raise _not_found(directory)
  if (directory / ocp.path.format_utils.PYTREE_METADATA_FILE).exists():
    return directory
  items = _items(directory) if directory.is_dir() else []
  if 'default' in items or len(items) == 1:
    return directory / ('default' if 'default' in items else items[0])
  if items:
    raise ValueError(f'{directory} holds the PyTree items {items}: pass item= to choose one')
  if directory.is_dir() and any(True for _ in directory.iterdir()) and not is_finished(directory):
    raise _unfinished(directory)  # an object store: the save was interrupted before its _METADATA
  raise CheckpointNotFoundError(
    f'{directory} is not an Orbax PyTree checkpoint item: it has no'
    f' {ocp.path.format_utils.PYTREE_METADATA_FILE} file. Pass the item directory'
    ' (e.g. <run>/<step>/default) of a checkpoint saved with'
    ' ocp.args.StandardSave or PyTreeSave.'
  )


_NAME = '@orbax_linen_nnx_array@'  # stands for the array name in the spec template

# Decoded chunks TensorStore keeps after use (least recently used first out), on
# top of Orbax's context: slices that share a chunk are read together, and a
# request for a chunk decoded a moment ago (a small one can finish before the
# next request for it is issued) is served from memory instead of decoded again.
# Larger chunks take long enough to decode that the requests join in flight;
# a bigger cache only holds stale chunks (32 MiB cost as much in peak RSS).
CHUNK_CACHE_BYTES = 4 * 2**20


def _spec_template(directory: epath.Path, use_ocdbt: bool, use_zarr3: bool, context: ts.Context) -> dict[str, Any]:
  info = ocp.type_handlers.ParamInfo(
    name=_NAME, parent_dir=directory, is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3, ts_context=context
  )
  return _internals.build_array_read_spec(info, use_ocdbt=use_ocdbt).json


def _name_sites(spec, at=()) -> list[tuple]:
  """Where in the spec template the array name goes: key paths to the strings holding it."""
  if isinstance(spec, dict):
    return [site for k, v in spec.items() for site in _name_sites(v, at + (k,))]
  return [at] if isinstance(spec, str) and _NAME in spec else []


def _fill(template, sites: list[tuple], name: str):
  """Orbax's read spec for `name`: the template, copied only along the paths that hold the name."""
  spec = dict(template)
  for site in sites:
    node = spec
    for k in site[:-1]:
      node[k] = node = dict(node[k])
    node[site[-1]] = node[site[-1]].replace(_NAME, name)
  return spec


def _key_impls(directory: epath.Path) -> dict[str, str]:
  """{array name: PRNG key implementation} of the typed keys Orbax stored as key data.

  Orbax records a key's implementation in the array's own metadata (the
  `array_metadatas/` files of the item); `_METADATA` calls it a plain array.
  """
  if not (directory / 'array_metadatas').exists():
    return {}
  store = _internals.ArrayMetadataStore()
  try:
    found = _internals.run_sync(store.read(directory, process_index=0))  # every process lists every array
    if found is None:
      found = [m for ms in (_internals.run_sync(store.read(directory)) or {}).values() for m in ms]
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpointError(
      f"{directory / 'array_metadatas'} is damaged ({type(e).__name__}: {e}); {_PICK_ANOTHER}"
    ) from e
  impls = {}
  for m in found:
    impl = (m.ext_metadata or {}).get(_internals.RANDOM_KEY_IMPL)
    if impl:
      impls[m.param_name] = str(impl)
  return impls


def _check_confined(directory: epath.Path) -> None:
  """Refuses a local checkpoint holding a symlink that leads out of it, before any of its files is read.

  Orbax and TensorStore follow links, so a checkpoint from elsewhere could make a restore (or inspect) read
  any file the process can. Links inside that stay inside are fine. Object stores have no links.
  """
  if '://' in os.fspath(directory):
    return
  root = os.path.realpath(directory)
  for base, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(base, name)
      if os.path.islink(path) and os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise UntrustedCheckpointError(
          f'{path} is a symlink to {os.path.realpath(path)}, outside the checkpoint {directory}; refused before'
          ' any read (a checkpoint reads only its own files). Copy what it links to into the checkpoint'
          ' (cp -rL), or open the checkpoint the file belongs to'
        )


def _check_names(directory: epath.Path, names: Sequence[str], use_ocdbt: bool) -> None:
  """Refuses array names that would open a directory outside the checkpoint (without OCDBT, each array is the
  directory `<item>/<name>`; OCDBT keys stay inside its database)."""
  if use_ocdbt:
    return
  root = os.path.normpath(os.fspath(directory))
  out = [
    n for n in names if os.path.isabs(n) or os.path.commonpath([root, os.path.normpath(os.path.join(root, n))]) != root
  ]
  if out:
    raise UntrustedCheckpointError(
      f'{directory / ocp.path.format_utils.PYTREE_METADATA_FILE} names arrays outside the checkpoint'
      f' ({", ".join(map(repr, out[:5]))}); refused before any read: the metadata was not written by Orbax for'
      ' this directory'
    )


def _open_tree(directory: epath.Path, under: layout.Path = ()) -> tuple[bool, bool, tuple, dict]:
  """(use_ocdbt, use_zarr3, arrays, open stores) of one PyTree directory; its paths and names under `under`."""
  metadata_file = directory / ocp.path.format_utils.PYTREE_METADATA_FILE
  try:
    tree = _internals.InternalTreeMetadata.from_json(json.loads(metadata_file.read_text()))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpointError(
      f'{metadata_file} is damaged ({type(e).__name__}: {e}): it is not the tree metadata Orbax writes,'
      f' so the save that wrote it did not finish or the file was changed since; {_PICK_ANOTHER}'
    ) from e
  use_ocdbt = tree.use_ocdbt if tree.use_ocdbt is not None else ocp.path.format_utils.is_ocdbt_checkpoint(directory)
  use_zarr3 = bool(tree.use_zarr3)

  paths = []
  for entry in tree.tree_metadata_entries:
    value = entry.value_metadata
    if value.value_type in _STORED_TYPES and not value.skip_deserialize:
      paths.append(tuple(k.nested_key_name for k in entry.key_metadata.nested_key_metadata_entries))
  context = ts.Context(
    ts.Context.Spec({'cache_pool': {'total_bytes_limit': CHUNK_CACHE_BYTES}}),
    parent=ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt),
  )
  template = _spec_template(directory, use_ocdbt, use_zarr3, context)
  names = ['.'.join(p) for p in paths]  # Orbax names each stored array by its joined key path
  _check_names(directory, names, use_ocdbt)
  sites = _name_sites(template)
  opening = [ts.open(_fill(template, sites, n), context=context, open=True, read=True) for n in names]
  stores, broken = {}, []
  for p, n, f in zip(paths, names, opening):
    try:
      stores[n] = f.result()
    except ValueError as e:  # TensorStore: a missing or unreadable array
      broken.append(f"'{'/'.join(p)}' ({str(e).splitlines()[0]})")
  if broken:
    raise DamagedCheckpointError(
      f'{directory}: {len(broken)} stored array(s) listed in {ocp.path.format_utils.PYTREE_METADATA_FILE} cannot be'
      f' opened: {"; ".join(broken[:10])}{" ..." if len(broken) > 10 else ""}. The array data is missing or'
      f' damaged; {_PICK_ANOTHER}'
    )
  impls = _key_impls(directory)
  prefix = '/'.join(under) + '/' if under else ''  # keeps the names of two trees apart
  arrays = tuple(
    SourceArray(
      path=under + p,
      name=prefix + n,
      shape=tuple(stores[n].shape),
      dtype=np.dtype(stores[n].dtype.numpy_dtype),
      key_impl=impls.get(n),
    )
    for p, n in zip(paths, names)
  )
  return use_ocdbt, use_zarr3, arrays, {prefix + n: st for n, st in stores.items()}


def with_chunk_cache(ckpt: Checkpoint, names, nbytes: int) -> Checkpoint:
  """`ckpt` with the stores of `names` opened again over a chunk cache of `nbytes` (decoded chunks kept).

  For readers that come back to a chunk (convert's blocks of one large
  chunk): the chunk stays decoded in the cache between them instead of being
  decoded again. The other stores keep their small cache.
  """
  context = ts.Context(
    ts.Context.Spec({'cache_pool': {'total_bytes_limit': int(nbytes)}}),
    parent=ocp.type_handlers.get_ts_context(use_ocdbt=ckpt.use_ocdbt),
  )
  opening = {n: ts.open(ckpt.stores[n].spec(), context=context, open=True, read=True) for n in names}
  return dataclasses.replace(ckpt, stores={**ckpt.stores, **{n: f.result() for n, f in opening.items()}})


def open_checkpoint(path: epath.PathLike, *, step: int | None = None, item: str | None = None) -> Checkpoint:
  """Lists the arrays of a checkpoint item (e.g. `run/100/default`) and opens each once.

  `path` may also be a step or run directory (see `locate`). Reads metadata
  only: no array data.
  """
  directory = locate(path, step=step, item=item)
  _check_confined(directory)
  _check_finished(directory)
  use_ocdbt, use_zarr3, arrays, stores = _open_tree(directory)
  sidecar = (directory / SIDECAR_DIR / ocp.path.format_utils.PYTREE_METADATA_FILE).exists()
  if sidecar:
    _, _, more, more_stores = _open_tree(directory / SIDECAR_DIR, under=(layout.NNX_AUX,))
    arrays, stores = arrays + more, {**stores, **more_stores}
  return Checkpoint(
    directory=directory, arrays=arrays, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3, stores=stores, sidecar=sidecar
  )

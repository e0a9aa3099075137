"""The checkpoint being read: its arrays as listed by Orbax metadata (no array data)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import format_utils

from orbax_linen_nnx import layout
from orbax_linen_nnx.planner import SourceArray


class CheckpointNotFoundError(FileNotFoundError):
  """The directory holds no Orbax PyTree checkpoint item."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """An Orbax PyTree checkpoint item directory and the arrays it holds."""

  directory: epath.Path
  arrays: tuple[SourceArray, ...]
  use_ocdbt: bool
  use_zarr3: bool

  @property
  def layout(self) -> str:
    return layout.detect(a.path for a in self.arrays)



def open_checkpoint(directory: epath.PathLike) -> Checkpoint:
  """Lists the arrays of a checkpoint item (e.g. `run/100/default`) from metadata.

  A step directory holding a single item 'default' is accepted too.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    raise CheckpointNotFoundError(f'checkpoint directory {directory} does not exist')
  if not (directory / format_utils.PYTREE_METADATA_FILE).exists():
    if (directory / 'default' / format_utils.PYTREE_METADATA_FILE).exists():
      directory = directory / 'default'
    else:
      raise CheckpointNotFoundError(
          f'{directory} is not an Orbax PyTree checkpoint item: it has no'
          f' {format_utils.PYTREE_METADATA_FILE} file. Pass the item directory'
          ' (e.g. <run>/<step>/default) of a checkpoint saved with'
          ' ocp.args.StandardSave or PyTreeSave.'
      )
  meta = ocp.PyTreeCheckpointHandler().metadata(directory)
  flat, _ = jax.tree_util.tree_flatten_with_path(
      meta.tree, is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata)
  )
  arrays = []
  for keys, m in flat:
    if not isinstance(m, ocp.metadata.ArrayMetadata):
      continue  # strings and other non-array values carry no model state
    arrays.append(
        SourceArray(
            path=layout.key_path(keys),
            name=m.name,
            shape=tuple(m.shape),
            dtype=np.dtype(m.dtype),
        )
    )
  return Checkpoint(
      directory=directory,
      arrays=tuple(arrays),
      use_ocdbt=format_utils.is_ocdbt_checkpoint(directory),
      use_zarr3=bool(getattr(meta, 'use_zarr3', False)),
  )

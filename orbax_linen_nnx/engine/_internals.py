"""Every private name of Orbax and JAX this package uses, and nothing else: the one place to re-check.

No version cap protects these (by design: MaxText's floors and the newest
releases are both tested, see .ci/run). Each name below says what it is for
and the public alternative where one exists; `tests/test_internals.py` imports
every one of them, so CI's runs at the newest releases and at the floors say
at once which one moved. Public names (`ocp.path.step.is_path_finalized`,
`ocp.type_handlers.get_ts_context`, ...) are used from their public homes
elsewhere, not through here.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = [
  'InternalTreeMetadata',
  'build_array_read_spec',
  'build_array_write_spec',
  'RANDOM_KEY_IMPL',
  'ArrayMetadataStore',
  'run_sync',
  'get_process_index_for_subdir',
  'serialize_shardings',
  'array_metadata_store',
  'share_array_metadata_store',
  'distributed_client',
  'key_impl_name',
  'refuse_as_jax_value',
]

# -- Orbax: reading a checkpoint's tree and arrays exactly as Orbax wrote them.

# The parsed `_METADATA` of a PyTree item: its tree, value types, OCDBT and
# zarr3 flags. Public alternative: `PyTreeCheckpointHandler().metadata(dir)`,
# which gives shapes but neither the stored names nor the flags.
from orbax.checkpoint._src.metadata.tree import InternalTreeMetadata

# Orbax's TensorStore specs for one stored array (kvstore, driver, OCDBT and
# zarr3 settings, as Orbax itself reads and writes them). No public alternative.
from orbax.checkpoint._src.serialization.tensorstore_utils import build_array_read_spec, build_array_write_spec

# Per-array metadata files (`array_metadatas/`): where Orbax records a typed
# PRNG key's implementation (`_METADATA` calls the key a plain array). No
# public alternative.
from orbax.checkpoint._src.metadata.array_metadata import RANDOM_KEY_IMPL
from orbax.checkpoint._src.metadata.array_metadata_store import Store as ArrayMetadataStore

# Runs a coroutine to completion whether or not an event loop is running (as
# Orbax does for its metadata stores). Public alternative: `asyncio.run`, which
# fails inside a running loop (Orbax v1 and async saves call us inside one).
from orbax.checkpoint._src.asyncio_utils import run_sync

# -- Orbax: writing an array a block at a time as Orbax's ArrayHandler would.

# The OCDBT subdirectory (`ocdbt.process_<i>`) this process writes into.
from orbax.checkpoint._src.serialization.ocdbt_utils import get_process_index_for_subdir

# Writes the `_sharding` record of arrays, as ArrayHandler.serialize does.
from orbax.checkpoint._src.serialization.jax_array_handlers import _async_serialize_shardings as serialize_shardings


def array_metadata_store(handler: Any) -> Any:
  """The array-metadata store of Orbax's own `ArrayHandler` (None when it keeps none)."""
  return getattr(handler, '_array_metadata_store', None)


def share_array_metadata_store(handler: Any, array_handler: Any) -> None:
  """Gives `handler` (one that takes jax.Arrays) the metadata store of Orbax's `array_handler`.

  A PyTree handler looks for this attribute on whatever handles jax.Array:
  without it, it skips checking the records every process wrote and logs that
  subchunking is disabled. No public alternative.
  """
  handler._array_metadata_store = array_metadata_store(array_handler)


# -- JAX.


def distributed_client() -> Any:
  """JAX's distributed key-value store client, as Orbax's multihost module uses it.

  Public alternative: none (`jax.distributed` exposes no client).
  """
  from jax._src import distributed

  return distributed.global_state.client


def key_impl_name(dtype: Any) -> str:
  """The name of a typed PRNG key dtype's implementation, as Orbax records it (`threefry2x32`).

  Public alternative: `str(jax.random.key_impl(keys))`, which needs an array
  of keys; an abstract state holds only the dtype.
  """
  return dtype._impl.name


def refuse_as_jax_value(cls: type, fail: Callable[[Any], Any]) -> bool:
  """Makes JAX call `fail(x)` wherever it would turn an `x` of `cls` into a JAX value.

  `cls` subclasses `jax.ShapeDtypeStruct` (a leaf that still describes its
  array), so JAX would otherwise take it as an abstract value in `jit` or
  `eval_shape`, and `device_put` and `jnp` functions would raise JAX's own
  "is not a valid JAX type", which names neither the leaf nor the fix. JAX
  offers no public registry of value types (`__jax_array__` is no longer
  honoured during abstractification), so the two private ones are used:
  `core.pytype_aval_mappings` (abstractification: `jit`, `vmap`, `grad`, `jnp`
  functions, `eval_shape`) and the value canonicalisation handlers (argument
  transfer: `jit` dispatch, `device_put`). Returns whether both were found;
  where they are gone, JAX's own TypeError is raised instead.
  """
  found = 0
  try:
    from jax._src import core

    core.pytype_aval_mappings[cls] = fail
    found += 1
  except (ImportError, AttributeError):
    pass
  try:
    from jax._src import dtypes

    if hasattr(dtypes, 'register_canonicalize_value_handler'):  # as jax 0.10.2 has it
      dtypes.register_canonicalize_value_handler(cls, fail)
    else:  # jax 0.10.0: the registry itself
      dtypes.canonicalize_value_handlers[cls] = fail
    found += 1
  except (ImportError, AttributeError):
    pass
  return found == 2

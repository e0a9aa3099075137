"""Orbax v1: `LinenCompatRestore` and `LinenCompatSave` as checkpointables of `ocp.v1`.

    from orbax.checkpoint import v1 as ocp_v1
    import orbax_linen_nnx  # registers the handler with v1 too

    state = ocp_v1.load(step_dir, orbax_linen_nnx.LinenCompatRestore(abstract_nnx_state))
    ocp_v1.save_checkpointables(path, {'state': orbax_linen_nnx.LinenCompatSave(nnx_state)})

The v1 handler is a face of the v0 one (`LinenCompatHandler`): the same plan,
read engine and conversion; a save writes through v1's own PyTree handler.
"""

from __future__ import annotations

from typing import Any, Awaitable

from orbax.checkpoint import v1 as ocp_v1

from orbax_linen_nnx.faces import args as args_lib
from orbax_linen_nnx.faces import handler as handler_lib
from orbax_linen_nnx.engine import source as source_lib


class LinenCompatCheckpointableHandler:
  """Loads a `LinenCompatRestore` and saves a `LinenCompatSave` for Orbax v1.

  Registered globally when `orbax_linen_nnx` is imported: v1 picks it for any
  checkpointable that is one of these args (`is_handleable` /
  `is_abstract_handleable`), whatever handler saved the checkpoint.
  """

  def __init__(self):
    self._v0 = handler_lib.LinenCompatHandler()
    self._pytree = ocp_v1.handlers.PyTreeHandler()
    self._sidecar = ocp_v1.handlers.PyTreeHandler()  # NNX-only state, in the checkpointable's nnx_aux/

  async def save(self, directory, checkpointable: args_lib.LinenCompatSave) -> Awaitable[None]:
    try:
      source_lib.check_storage(directory.path, saving=True)  # a path awaiting creation
    except source_lib.UnsupportedStorageError as e:
      error = e  # raised from the background part, as Orbax's own are (see LinenCompatHandler.async_save)

      async def refused():
        raise error

      return refused()
    main, sidecar = self._v0.standard_args(checkpointable)
    tree = await self._pytree.save(directory, main.item)
    if sidecar is None:
      return tree
    beside = await self._sidecar.save(directory / source_lib.SIDECAR_DIR, sidecar.item)

    async def both():
      await tree
      await beside

    return both()

  async def load(self, directory, abstract_checkpointable: args_lib.LinenCompatRestore | None = None) -> Awaitable[Any]:
    if abstract_checkpointable is None:
      return await self._pytree.load(directory, None)
    restored = self._v0.restore(directory, args=abstract_checkpointable)

    async def done():
      return restored

    return done()

  async def metadata(self, directory) -> Any:
    return await self._pytree.metadata(directory)

  def is_handleable(self, checkpointable: Any) -> bool:
    return isinstance(checkpointable, args_lib.LinenCompatSave)

  def is_abstract_handleable(self, abstract_checkpointable: Any) -> bool | None:
    return isinstance(abstract_checkpointable, args_lib.LinenCompatRestore)


ocp_v1.handlers.register_handler(LinenCompatCheckpointableHandler)

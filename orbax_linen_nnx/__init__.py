"""Restore Flax Linen checkpoints into Flax NNX states (and back) with Orbax.

import orbax.checkpoint as ocp
from orbax_linen_nnx import LinenCompatRestore   # importing registers the handler

restored = mngr.restore(step, args=LinenCompatRestore(abstract_nnx_state))
mngr.save(step, args=LinenCompatSave(nnx_train_state))        # Linen's layout, from NNX
"""

from orbax_linen_nnx.faces.args import LinenCompatRestore, LinenCompatSave
from orbax_linen_nnx.planning.options import RestoreOptions, SaveOptions
from orbax_linen_nnx.faces.handler import LinenCompatHandler, plan, restore
from orbax_linen_nnx.planning.rules import (
  Rule,
  RuleError,
  cast,
  drop,
  merge,
  rearrange,
  rename,
  reshape,
  split,
  transpose,
)
from orbax_linen_nnx.engine.outcome import RestoreFailedElsewhere
from orbax_linen_nnx.planning.grid import DEFAULT_READ_BUDGET_BYTES
from orbax_linen_nnx.planning.plans import LeafRead, LinenCompatWarning, PlanError, RestorePlan, SourceArray, Target
from orbax_linen_nnx.engine.source import (
  CheckpointNotFoundError,
  DamagedCheckpointError,
  UnsupportedStorageError,
  UntrustedCheckpointError,
)
from orbax_linen_nnx.engine.target import NotRestored, NotRestoredError, default_sharding, not_restored
from orbax_linen_nnx.planning.ops import Cast, MoveAxis, Stack, Take
from orbax_linen_nnx.faces.save import to_linen
from orbax_linen_nnx.faces.v1 import LinenCompatCheckpointableHandler  # registers it with Orbax v1

# The package's modules by their names before they moved into layers, so that code importing them
# (`from orbax_linen_nnx import planner`, `from orbax_linen_nnx.rules import rename`) keeps working; the
# layers are their homes.
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402
import sys as _sys  # noqa: E402

for _layer in ('planning', 'engine', 'faces'):  # every module each layer's folder holds
  for _found in _pkgutil.iter_modules(_importlib.import_module(f'{__name__}.{_layer}').__path__):
    _module = _importlib.import_module(f'{__name__}.{_layer}.{_found.name}')
    globals()[_found.name] = _module
    _sys.modules.setdefault(f'{__name__}.{_found.name}', _module)
del _layer, _found, _module

__all__ = [
  'RestoreOptions',
  'SaveOptions',
  'Rule',
  'RuleError',
  'cast',
  'drop',
  'merge',
  'rearrange',
  'rename',
  'reshape',
  'split',
  'transpose',
  'Cast',
  'CheckpointNotFoundError',
  'DEFAULT_READ_BUDGET_BYTES',
  'DamagedCheckpointError',
  'UntrustedCheckpointError',
  'LeafRead',
  'LinenCompatCheckpointableHandler',
  'LinenCompatHandler',
  'LinenCompatRestore',
  'LinenCompatWarning',
  'LinenCompatSave',
  'MoveAxis',
  'PlanError',
  'RestoreFailedElsewhere',
  'RestorePlan',
  'SourceArray',
  'Stack',
  'Take',
  'Target',
  'UnsupportedStorageError',
  'NotRestored',
  'NotRestoredError',
  'default_sharding',
  'not_restored',
  'plan',
  'restore',
  'to_linen',
]
__version__ = '0.1.0'

"""Restore Flax Linen checkpoints into Flax NNX states (and back) with Orbax.

import orbax.checkpoint as ocp
from orbax_linen_nnx import LinenCompatRestore   # importing registers the handler

restored = mngr.restore(step, args=LinenCompatRestore(abstract_nnx_state))
mngr.save(step, args=LinenCompatSave(nnx_train_state))        # Linen's layout, from NNX
"""

from orbax_linen_nnx.args import LinenCompatRestore, LinenCompatSave
from orbax_linen_nnx.options import RestoreOptions, SaveOptions
from orbax_linen_nnx.handler import LinenCompatHandler, plan, restore
from orbax_linen_nnx.rules import Rule, RuleError, cast, drop, merge, rearrange, rename, reshape, split, transpose
from orbax_linen_nnx.outcome import RestoreFailedElsewhere
from orbax_linen_nnx.grid import DEFAULT_READ_BUDGET_BYTES
from orbax_linen_nnx.plans import LeafRead, LinenCompatWarning, PlanError, RestorePlan, SourceArray, Target
from orbax_linen_nnx.source import (
  CheckpointNotFoundError,
  DamagedCheckpointError,
  UnsupportedStorageError,
  UntrustedCheckpointError,
)
from orbax_linen_nnx.target import NotRestored, NotRestoredError, default_sharding, not_restored
from orbax_linen_nnx.ops import Cast, MoveAxis, Stack, Take
from orbax_linen_nnx.save import to_linen
from orbax_linen_nnx.v1 import LinenCompatCheckpointableHandler  # registers it with Orbax v1

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

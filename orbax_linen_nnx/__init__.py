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

# The package's modules by their names before they moved into layers (`orbax_linen_nnx.planner`, ...), so that
# code importing them (`from orbax_linen_nnx import planner`) keeps working; the layers are the homes.
from orbax_linen_nnx.engine import _internals, outcome, prepare, read, source, target, write  # noqa: E402, F401
from orbax_linen_nnx.faces import args, cli, compare, convert, handler, inspection, save, v1  # noqa: E402, F401
from orbax_linen_nnx.planning import (  # noqa: E402, F401
  cost,
  diagnose,
  grid,
  ops,
  options,
  pairing,
  planner,
  plans,
  rules,
  stacks,
  trees,
)

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

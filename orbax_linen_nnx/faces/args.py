"""`LinenCompatRestore` and `LinenCompatSave`: the Orbax arguments this package adds.

`handler.py` registers them with `LinenCompatHandler` (importing the package
does), so a `CheckpointManager` finds the handler from the args alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import options as options_lib
from orbax_linen_nnx.planning import plans as plan_lib
from orbax_linen_nnx.faces import save as save_lib
from orbax_linen_nnx.planning import rules as rules_lib
from orbax_linen_nnx.planning import stacks as stacks_lib


@dataclasses.dataclass
class LinenCompatRestore(ocp.args.CheckpointArgs):
  """Restore a Linen checkpoint into an NNX state (or an NNX one into Linen).

  Every array is read straight into the sharding its abstract leaf asks for;
  the layout is converted while the read is planned.

      state = mngr.restore(step, args=LinenCompatRestore(abstract_nnx_state))

  Attributes:
    abstract_state: what to restore into: an `nnx.State` (Variables holding
      `jax.ShapeDtypeStruct`s with shardings), an abstract `nnx.Module`
      (`nnx.eval_shape`), or a pytree (dict, Linen `TrainState`) of
      `jax.ShapeDtypeStruct`/`jax.Array`. The result has the same type and
      structure, every array exactly the sharding and dtype its leaf asks for
      (cast on read where the checkpoint's dtype differs). A leaf with no
      sharding is replicated on the mesh the other leaves use, so the result
      computes in one `jit` (several meshes: pass `mesh`; none anywhere: all
      devices, `orbax_linen_nnx.default_sharding()`); one above 16 MiB on
      several devices is noted in the plan and warned of. Shardings over an
      `AbstractMesh` and bare `PartitionSpec`s take the mesh in context, or
      `mesh`. Every sharding is checked while planning (a dimension a mesh
      axis does not divide, an axis the mesh lacks or used twice, devices
      outside `jax.devices()`), with the plan's other problems. None: the
      checkpoint's own tree, as `StandardRestore()` gives it.
    dry_run: return the `RestorePlan` instead of reading anything.

  Every other field is the `RestoreOptions` field of that name (documented
  there, the one place every face takes them from); `options` gathers them.
  """

  abstract_state: Any = None
  rules: rules_lib.Rules = None
  partial: bool = False
  dry_run: bool = False
  source_layout: str | None = None
  target_layout: str | None = None
  fill_nnx_only: Callable[[str, jax.ShapeDtypeStruct], Any] | None = None
  stacks: stacks_lib.StackAxes | None = None
  replica_axis: str | None = None
  timeout_s: float = 300.0
  read_budget_bytes: int | None = None
  mesh: jax.sharding.Mesh | None = None
  max_over_read: float | None = 4.0
  host_memory_limit_bytes: int | None = None
  strict_cost: bool = False

  @property
  def options(self) -> options_lib.RestoreOptions:
    """This restore's options, as every face passes them on to the planner."""
    return options_lib.RestoreOptions(**{name: getattr(self, name) for name in options_lib.FIELDS})


@dataclasses.dataclass
class LinenCompatSave(ocp.args.CheckpointArgs):
  """Save an NNX state as the checkpoint a Linen run of the same model writes.

  The arrays are converted where their shards live (a layer of a stack, a
  moved layer axis, a transposed weight, the int32 step) and written by
  Orbax's own PyTree serialisation: async save and atomic commit as with
  `StandardSave`, each process writing only its own shards. Linen code
  restores the result with plain `ocp.args.StandardRestore(linen_state)`;
  `LinenCompatRestore` with the same `rules` and `stacks` restores the NNX
  state, RNG streams included.

      mngr.save(step, args=LinenCompatSave(nnx.state(train_state)))

  Attributes:
    state: the NNX train state: an `nnx.State`, or (better) the module or the
      dict `{'model': model, 'optimizer': nnx.Optimizer(...)}` itself, which
      also tells which optax states are empty: Linen saves them as None entries
      (adam's `opt_state/1`), an `nnx.State` no longer holds them.
    plan: the plan of the save, made (and checked) when the args are made:
      `print(LinenCompatSave(state).plan)` shows what goes where; a problem
      raises `PlanError` here, before anything is written.

  Every other field is the `SaveOptions` field of that name (documented
  there, the one place `LinenCompatSave`, `to_linen` and `convert --to linen`
  take them from); `options` gathers them.
  """

  state: Any
  rules: rules_lib.Rules = None
  stacks: stacks_lib.StackAxes | None = None
  aux: str | None = layout.SIDECAR
  target: Any = None
  save_args: ocp.SaveArgs | None = None
  custom_metadata: dict[str, Any] | None = None
  plan: plan_lib.RestorePlan = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    # Planned here, from shapes alone, so that every problem is raised before
    # the manager creates the step's directory.
    self.plan = save_lib.plan_save(self.state, self.options)

  @property
  def options(self) -> options_lib.SaveOptions:
    """This save's options, as every face passes them on to the planner."""
    return options_lib.SaveOptions(**{name: getattr(self, name) for name in options_lib.SAVE_FIELDS})

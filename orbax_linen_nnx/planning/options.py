"""`RestoreOptions` and `SaveOptions`: every option of a restore and of a save, in one place, for every face.

`LinenCompatRestore`, `orbax_linen_nnx.plan()` and `restore()`, Orbax v1 and
the command line each build one; `prepare.prepare(source, target, options)`
plans with it. Each field says how the command line spells it (its `flag`),
or why it has no flag; `tests/test_options.py` holds the faces to that.
`LinenCompatSave`, `to_linen` and `convert --to linen` build a `SaveOptions`
alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from orbax_linen_nnx import layout
from orbax_linen_nnx.planning import rules as rules_lib
from orbax_linen_nnx.planning import stacks as stacks_lib


def _option(default: Any, flag: str | None, why: str = '') -> Any:
  """A field with its command-line flag, or (flag None) the reason it has none."""
  assert flag or why, 'an option without a flag says why'
  return dataclasses.field(default=default, metadata={'flag': flag, 'why': why})


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
  """How a restore pairs, reads and checks; the same for every face.

  Attributes:
    rules: renames between the layouts: `{'Dense_0': 'fc1'}` (Linen name ->
      NNX name, used in both directions), a list of rules (see Rules),
      a callable on source model paths, or `'auto'` (alone, or last in a
      list) to infer the renames left.
    partial: restore what has a source; leave other targets as given and ignore
      unused sources (all reported in the plan) instead of raising. A kept
      leaf the abstract state gave only as a `jax.ShapeDtypeStruct` holds no
      value: an `nnx.State` result leaves it out (`nnx.update(model,
      restored)` then keeps the model's own value), any other tree holds an
      `orbax_linen_nnx.NotRestored` placeholder, which raises
      `NotRestoredError` naming the leaf where it is used as an array
      (`orbax_linen_nnx.not_restored(tree)` lists them). A
      `LinenCompatWarning` names them all (RNG streams left to an
      `nnx.State`'s model excepted: the plan lists those).
    source_layout: 'linen' or 'nnx' to override the layout detected from the
      checkpoint's metadata.
    target_layout: 'linen' or 'nnx' to override the layout detected from the
      abstract state (an `nnx.State` or `nnx.Module` is 'nnx').
    fill_nnx_only: `fn(path, jax.ShapeDtypeStruct) -> jax.Array` giving values
      for NNX-only leaves (RNG keys and counts) that no Linen checkpoint holds;
      without it they are kept as given in the abstract state.
    stacks: the layer axis of layer stacks, per layout, where it cannot be
      inferred from shapes: `{'layers': {'linen': 1, 'nnx': 0}}` (stack root as
      a model path; Linen `nn.scan` axis 1, NNX `nnx.vmap` axis 0).
    replica_axis: a mesh axis along which targets are replicated (data
      parallelism): only the devices at index 0 of it read those targets from
      storage, and one collective copies them to the other replicas. Saves
      storage reads (each byte is read once, not once per replica) at the cost
      of a broadcast. None (default): every process reads what it holds.
    timeout_s: on many processes, how long each waits for the others to report
      that their reads succeeded; a failure anywhere then raises on every
      process instead of leaving it at a barrier. A process that dies is named
      within seconds whatever this is; one that hangs alive, after it.
    read_budget_bytes: at most this many decoded bytes are held on the host
      between their read from storage and their copy into device shards (one
      larger stored chunk goes alone). More overlaps more reads; it never
      changes what is read: each stored chunk is decoded once per process
      whatever the budget. None: `orbax_linen_nnx.DEFAULT_READ_BUDGET_BYTES`
      (64 MiB), or twice the largest stored chunk read where that is more.
    mesh: the concrete `jax.sharding.Mesh` for targets sharded over an
      `AbstractMesh` (`nnx.eval_shape` under `jax.set_mesh`) or by bare
      `PartitionSpec`s; None: the mesh in context (`with jax.set_mesh(mesh):`).
    max_over_read: warn when a process would decode more than this many times
      the stored bytes its devices need, for the process as a whole or for a
      leaf that wastes 8 MiB or more (chunks far larger than, or cutting
      across, the target's shards); None: never. Default 4.
    host_memory_limit_bytes: warn when a process's read may hold more than
      this on the host (the read budget plus its largest stored chunk); the
      warning names the `read_budget_bytes` that fits.
    strict_cost: raise `PlanError`, before any read, where these (or a large
      leaf replicated on every device for want of a sharding) would warn.
  """

  rules: rules_lib.Rules = _option(None, '--rules')
  partial: bool = _option(False, '--partial')
  source_layout: str | None = _option(None, None, 'the command line reads the layout a checkpoint records')
  target_layout: str | None = _option(
    None,
    None,
    "a target's layout is its own there (plan --to and convert --to name the layout of a conversion with no target)",
  )
  fill_nnx_only: Callable[[str, jax.ShapeDtypeStruct], Any] | None = _option(
    None, None, 'a Python callable (convert --fill-nnx-only from-target writes a built target model\'s own values)'
  )
  stacks: stacks_lib.StackAxes | None = _option(None, '--stacks')
  replica_axis: str | None = _option(None, None, "a restore onto a device mesh's replicas: no command reads onto one")
  timeout_s: float = _option(
    300.0, None, 'a restore across processes: convert --distributed writes, it restores nothing to wait for'
  )
  read_budget_bytes: int | None = _option(None, '--budget')
  mesh: jax.sharding.Mesh | None = _option(None, None, 'a Python object: the command line reads onto one device')
  max_over_read: float | None = _option(4.0, '--max-over-read')
  host_memory_limit_bytes: int | None = _option(None, '--host-memory-limit')
  strict_cost: bool = _option(False, '--strict-cost')

  def problems(self, state: Any) -> list[str]:
    """The options that name what the flattened target (`target.AbstractState`) lacks, or that make no sense."""
    found = []
    if self.replica_axis is not None:
      axes = sorted(
        {
          a
          for t in state.targets
          if isinstance(t.sharding, jax.sharding.NamedSharding)
          for a in t.sharding.mesh.axis_names
        }
      )
      if self.replica_axis not in axes:
        found.append(
          f'replica_axis={self.replica_axis!r} is no axis of the target meshes'
          f' (axes: {", ".join(map(repr, axes)) or "none: no target has a NamedSharding"})'
        )
    if self.read_budget_bytes is not None and self.read_budget_bytes <= 0:
      found.append(f'read_budget_bytes={self.read_budget_bytes!r} must be a positive number of bytes')
    if self.max_over_read is not None and not self.max_over_read >= 1:
      found.append(f'max_over_read={self.max_over_read!r} must be a factor of at least 1 (or None)')
    if self.host_memory_limit_bytes is not None and self.host_memory_limit_bytes <= 0:
      found.append(f'host_memory_limit_bytes={self.host_memory_limit_bytes!r} must be a positive number of bytes')
    return found


@dataclasses.dataclass(frozen=True)
class SaveOptions:
  """How an NNX state is written as the checkpoint a Linen run writes; the same for every face.

  Attributes:
    rules: the rules `LinenCompatRestore` restores this checkpoint with
      (written Linen -> NNX); the save runs them backward.
    stacks: per NNX layer stack, the Linen side's layer axis:
      `{'layers': {'nnx': 0, 'linen': 1}}` writes Linen `nn.scan`'s stack,
      `{'layers': {'linen': None}}` one array per layer (`layers_0`, ...);
      stacks not named are written as they are.
    aux: where persistent NNX state that Linen has no place for goes (RNG
      streams, custom Variables): 'sidecar' (the default of
      `LinenCompatSave`) beside the Linen tree, as a PyTree of its own in the
      item's `nnx_aux/` directory, which Linen readers never see and
      `LinenCompatRestore` reads back; 'nnx_aux' in the tree as MaxText
      writes it (`nnx_aux/model/...`, batch statistics too), for MaxText's
      readers (the default of `to_linen`, which returns one tree); or None to
      leave it out (listed in the plan as skipped). Batch statistics otherwise
      go where Linen code keeps them: a `batch_stats` field beside `params`
      (a model alone: the `batch_stats` collection of its variables). Caches
      and intermediates are never saved.
    target: a Linen abstract state (`jax.eval_shape(lambda: linen_state)`, a
      variables dict of `jax.ShapeDtypeStruct`) to write exactly: its tree,
      its type, its None entries; None (default) writes what a Linen run of
      the same model saves.
    save_args: an `ocp.SaveArgs` applied to every array (`chunk_byte_size`,
      `dtype`), or None.
    custom_metadata: JSON-serialisable metadata stored with the item.
  """

  rules: rules_lib.Rules = _option(None, '--rules')
  stacks: stacks_lib.StackAxes | None = _option(None, '--stacks')
  aux: str | None = _option(
    layout.SIDECAR,
    None,
    'convert writes one tree: NNX-only state goes under nnx_aux in it (as to_linen), or where --target puts it',
  )
  target: Any = _option(None, '--target')
  save_args: Any = _option(
    None, None, 'a Python ocp.SaveArgs: convert stores every array in chunks of the blocks it writes'
  )
  custom_metadata: dict[str, Any] | None = _option(
    None, None, "a Python dict: convert writes an item's arrays, not the metadata of a run"
  )


DEFAULTS = RestoreOptions()
FIELDS = tuple(f.name for f in dataclasses.fields(RestoreOptions))
SAVE_DEFAULTS = SaveOptions()
SAVE_FIELDS = tuple(f.name for f in dataclasses.fields(SaveOptions))


def flag_of(name: str, options: type = RestoreOptions) -> str | None:
  """The command line's flag for option `name` of `options` (None: it has none; see the field's `why`)."""
  return next(f.metadata['flag'] for f in dataclasses.fields(options) if f.name == name)

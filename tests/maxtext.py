"""A MaxText pure_nnx run in miniature: its model state, its manager, its on-disk layout.

Written from ../shared/LAYOUTS.md ("MaxText"): an NNX train state is saved in
the Linen layout (`params/params/...` for nnx.Param, `opt_state` as a chain
list with None for empty states and mu/nu under a `params` level, an int32
`step`) plus `nnx_aux`, the pure dict of every other persistent Variable (RNG
streams, batch stats, custom Variables). Caches and intermediates are not
saved. The manager names its one PyTree item `items`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

D_IN, D_HID, D_OUT, BATCH = 16, 32, 8, 32
# Float32 terms summed in one step (see models.assert_reductions_close).
STEP_TERMS = D_IN + D_HID + BATCH * D_OUT + BATCH + 2 * BATCH


class Routing(nnx.Variable):
  """A custom persistent Variable (a frozen routing table, say): saved under nnx_aux."""


class Net(nnx.Module):
  """Dense -> BatchNorm -> dropout (its own RNG stream) -> Dense, and a custom Variable."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
    self.bn = nnx.BatchNorm(D_HID, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(D_HID, D_OUT, rngs=rngs)
    self.routing = Routing(jax.random.permutation(rngs.params(), D_HID))

  def __call__(self, x):
    h = nnx.relu(self.bn(self.fc1(x)))[:, self.routing.get_value()]
    return self.fc2(self.drop(h))


def schedule():
  return optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=20)


def train_state(seed: int = 0, tx=None):
  model = Net(nnx.Rngs(seed, dropout=seed + 100))
  return {'model': model, 'optimizer': nnx.Optimizer(model, tx or optax.adamw(schedule()), wrt=nnx.Param)}


def batch(step: int):
  kx, ky = jax.random.split(jax.random.key(1000 + step))
  return jax.random.normal(kx, (BATCH, D_IN)), jax.random.normal(ky, (BATCH, D_OUT))


@nnx.jit
def train_step(state, x, y):
  """One step: dropout draws from the model's stream, BatchNorm updates its stats."""
  model, optimizer = state['model'], state['optimizer']

  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _linen_opt_state(opt_state):
  """NNX's opt_state pure dict in the Linen layout: a chain list (None where empty) or a flat dict."""
  wrap = lambda entry: (
    {k: ({'params': v} if k in ('mu', 'nu') and isinstance(v, dict) else v) for k, v in entry.items()}
    if isinstance(entry, dict)
    else entry
  )
  keys = list(opt_state)
  if keys and all(isinstance(k, int) or str(k).isdigit() for k in keys):
    chain = [None] * (max(int(k) for k in keys) + 1)
    for k in keys:
      chain[int(k)] = wrap(opt_state[k])
    return chain
  return wrap(opt_state)


def to_items(state) -> dict:
  """The `items` tree a pure_nnx MaxText run saves (works on abstract states too)."""
  state = nnx.state(state) if not isinstance(state, nnx.State) else state
  in_optimizer = lambda path, _: path[0] == 'optimizer'
  params, rngs, stats, _caches, _intermediates, optimizer, custom = nnx.split_state(
    state, nnx.Param, nnx.RngState, nnx.BatchStat, nnx.Cache, nnx.Intermediate, in_optimizer, ...
  )
  linen = nnx.merge_state(params, optimizer).to_pure_dict()
  step = linen['optimizer']['step']
  step = (
    jax.ShapeDtypeStruct(step.shape, jnp.int32, sharding=getattr(step, 'sharding', None))
    if isinstance(step, jax.ShapeDtypeStruct)
    else jnp.asarray(step, jnp.int32)
  )
  items = {
    'params': {'params': linen['model']},
    'opt_state': _linen_opt_state(linen['optimizer']['opt_state']),
    'step': step,
  }
  aux = nnx.merge_state(rngs, stats, custom).to_pure_dict()
  if aux:
    items['nnx_aux'] = aux
  return items


def manager(directory, *, registry: bool = False) -> ocp.CheckpointManager:
  """MaxText's manager: one PyTree item `items` (OCDBT + zarr3), by `item_handlers` or by a handler registry."""
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
  if not registry:
    return ocp.CheckpointManager(directory, item_names=('items',), item_handlers={'items': handler})
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  reg.add('items', ocp.args.PyTreeSave, handler)
  reg.add('items', ocp.args.PyTreeRestore, handler)
  return ocp.CheckpointManager(directory, handler_registry=reg)


def save(mngr: ocp.CheckpointManager, step: int, state) -> dict:
  """Saves as MaxText does (chunk and file-size options included); returns the saved `items` tree."""
  items = to_items(state)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=2**30), items)
  mngr.save(
    step,
    args=ocp.args.Composite(items=ocp.args.PyTreeSave(items, save_args=save_args, ocdbt_target_data_file_size=2**30)),
    custom_metadata={'scan_layers': False},
  )
  mngr.wait_until_finished()
  return items

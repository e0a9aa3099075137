"""The optimizers people train with: Linen -> NNX -> Linen bit for bit, and each resumed run steps on alike."""

import jax
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import models
from helpers import save
from models import MLP_RULES
from orbax_linen_nnx import LinenCompatRestore

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=20)
kernels_only = lambda params: jax.tree.map(lambda a: a.ndim == 2, params)

# Each a real optax optimizer whose state nests its mirrors of the params at
# another depth, or in another shape, or not at all.
OPTIMIZERS = {
  # MaxText's adam_pax keeps one flat {count, mu, nu} state, no chain list.
  'flat_adam': lambda: optax.scale_by_adam(),
  'adamw_schedule': lambda: optax.adamw(SCHEDULE, weight_decay=0.1),
  'inject_hyperparams_adamw': lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=SCHEDULE),
  'multi_steps': lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
  'masked_weight_decay': lambda: optax.adamw(1e-2, weight_decay=0.1, mask=kernels_only),
  'masked': lambda: optax.chain(optax.masked(optax.scale_by_adam(), kernels_only), optax.scale(-1e-2)),
  'adafactor': lambda: optax.adafactor(1e-2, min_dim_size_to_factor=8),
  'lion': lambda: optax.lion(1e-3),
  'sgd_momentum': lambda: optax.sgd(1e-2, momentum=0.9),
  'schedule_free': lambda: optax.contrib.schedule_free_adamw(1e-2, warmup_steps=2),
}


@pytest.mark.parametrize('opt', sorted(OPTIMIZERS))
def test_linen_to_nnx_and_back(tmp_path, mesh, opt):
  make_tx = OPTIMIZERS[opt]
  linen = models.linen_mlp_state(make_tx())
  save(tmp_path / 'linen', linen, step=2)

  abstract = models.shard_abstract(
    nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, make_tx()))), mesh, 'two_axes'
  )
  restored = ocp.CheckpointManager(tmp_path / 'linen').restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  models.assert_sharded_as(restored, abstract)

  # Back to Linen from what NNX holds: every leaf of the Linen run, bit for bit.
  save(tmp_path / 'nnx', restored, step=2)
  linen_abstract = models.shard_abstract(
    jax.eval_shape(lambda: models.linen_mlp_state(make_tx(), steps=0)), mesh, 'one_axis'
  )
  back = ocp.CheckpointManager(tmp_path / 'nnx').restore(2, args=LinenCompatRestore(linen_abstract, rules=MLP_RULES))
  models.assert_all_equal(back, linen)
  models.assert_sharded_as(back, linen_abstract)

  # The run resumed in NNX takes the step the Linen run takes.
  ts = models.nnx_train_state(models.NnxMLP, make_tx())
  nnx.update(ts, restored)
  nnx_loss = nnx.jit(models.nnx_step)(ts['model'], ts['optimizer'])
  linen_next, linen_loss = models.linen_mlp_step(linen, True)
  # Linen ran unsharded, NNX sharded: float32 sums in another order (2 + 1 steps).
  models.assert_reductions_close(nnx_loss, linen_loss, terms=3 * models.MLP_STEP_TERMS)
  models.assert_reductions_close(
    ts['model'].fc1.kernel.get_value(),
    linen_next.params['params']['Dense_0']['kernel'],
    terms=3 * models.MLP_STEP_TERMS,
  )

"""Demo: resume a Flax Linen training run in Flax NNX, from an Orbax checkpoint.

    python -m orbax_linen_nnx.demo [--dir DIR]

1. Train a Linen MLP for 3 steps on 8 (simulated CPU) devices, sharded on a
   (4, 2) ('data', 'model') mesh, and save the TrainState with Orbax.
2. Train Linen 3 more steps: these losses are the reference.
3. Restore the step-3 checkpoint straight into a sharded NNX model + optimizer
   with `LinenCompatRestore`, and train NNX 3 steps.
4. The NNX losses match the Linen ones (to float32 summation order; the
   restored parameters, Adam moments and step counter are bit-exact).
"""

import jax

# Must run before anything initialises the JAX backend.
jax.config.update('jax_num_cpu_devices', 8)

import argparse
import shutil
import sys
import tempfile

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from orbax_linen_nnx import LinenCompatRestore  # importing registers the handler

MESH = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
TX = optax.adam(1e-2)


def sharding_for(shape):
  """Kernels (and their Adam moments) split over both axes; the rest replicated."""
  spec = P('data', 'model') if len(shape) == 2 else P()
  return NamedSharding(MESH, spec)


class LinenMLP(nn.Module):
  @nn.compact  # submodules are auto-named Dense_0, Dense_1 in construction order
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(8)(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):  # rngs only for init: the model keeps no RNG state
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def mse(pred, y):
  return jnp.mean((pred - y) ** 2)


@jax.jit
def linen_step(state, x, y):
  loss, grads = jax.value_and_grad(lambda p: mse(state.apply_fn({'params': p}, x), y))(state.params)
  return state.apply_gradients(grads=grads), loss


@nnx.jit
def nnx_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
  optimizer.update(model, grads)
  return loss


def make_nnx():
  model = NnxMLP(nnx.Rngs(0))
  return {'model': model, 'optimizer': nnx.Optimizer(model, TX, wrt=nnx.Param)}


def run(ckpt_dir: str) -> bool:
  """Runs the demo with checkpoints in `ckpt_dir`; whether the losses match."""
  # A fixed synthetic regression batch, split over 'data'.
  kx, ky = jax.random.split(jax.random.key(0))
  batch = NamedSharding(MESH, P('data'))
  x = jax.device_put(jax.random.normal(kx, (32, 16)), batch)
  y = jax.device_put(jax.random.normal(ky, (32, 8)), batch)

  # --- Linen: train 3 steps, save, train 3 more (the reference losses). ---
  model = LinenMLP()
  state = train_state.TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(1), x)['params'], tx=TX)
  state = jax.device_put(state, jax.tree.map(lambda a: sharding_for(np.shape(a)), state))
  for _ in range(3):
    state, _ = linen_step(state, x, y)
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    mngr.save(3, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
  linen_losses = []
  for _ in range(3):
    state, loss = linen_step(state, x, y)
    linen_losses.append(float(loss))

  # --- NNX: an abstract state (no arrays allocated) with the shardings we want. ---
  abstract = nnx.state(nnx.eval_shape(make_nnx))
  abstract = jax.tree.map(
    lambda v: v.copy(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_for(v.shape))),
    abstract,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
  # @nn.compact names cannot be guessed from NNX attribute names: state the pairing.
  rules = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}

  # A fresh manager, as in a new process resuming the run.
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    print('Restore plan (dry run, nothing read):')
    print(mngr.restore(3, args=LinenCompatRestore(abstract, rules=rules, dry_run=True)))
    restored = mngr.restore(3, args=LinenCompatRestore(abstract, rules=rules))

  print('\nRestored shardings (each array read shard by shard, straight into place):')
  for path in [('model', 'fc1', 'kernel'), ('optimizer', 'opt_state', 0, 'mu', 'fc2', 'kernel'), ('optimizer', 'step')]:
    leaf = restored
    for key in path:
      leaf = leaf[key]
    array = leaf.get_value()
    print(f"  {'/'.join(map(str, path)):36s} {str(array.shape):9s} {array.sharding.spec}")

  train = make_nnx()  # concrete model + optimizer, then overwritten by the checkpoint
  nnx.update(train, restored)
  print(f"  NNX optimizer step after restore: {int(train['optimizer'].step.get_value())}")
  nnx_losses = [float(nnx_step(train['model'], train['optimizer'], x, y)) for _ in range(3)]

  print('\nstep   Linen loss     NNX loss')
  for i, (a, b) in enumerate(zip(linen_losses, nnx_losses)):
    print(f'{i + 4:4d}   {a:.8f}   {b:.8f}')
  # Restored values are bit-exact; the losses are float32 sums that XLA may order
  # differently on another CPU, so they match to the bound for summing n terms
  # twice in different orders (2 n eps): per step 16 + 32 terms of the two
  # layers, 32 x 8 of the loss mean, 32 of the gradient sums; 6 steps.
  terms = 6 * (16 + 32 + 32 * 8 + 32)
  tol = 2 * terms * float(np.finfo(np.float32).eps)
  match = bool(np.allclose(nnx_losses, linen_losses, rtol=tol, atol=0))
  print(f'NNX losses match Linen losses: {match}')
  return match


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', help='checkpoint directory to use and keep (default: a temporary one)')
  args = parser.parse_args(argv)
  ckpt_dir = args.dir or tempfile.mkdtemp(prefix='linen_nnx_demo_')
  try:
    return 0 if run(ckpt_dir) else 1
  finally:
    if args.dir is None:
      shutil.rmtree(ckpt_dir, ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())

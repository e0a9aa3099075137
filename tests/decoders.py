"""Decoders whose transformer-style blocks are laid out four ways, with the same math.

Linen: a Python loop (`layers_0` ... `layers_{N-1}`) and `nn.scan` (one `layers`
subtree, layer axis 1 as in MaxText). NNX: unrolled blocks in an `nnx.List`
(`layers/0` ...) and `nnx.vmap`-created blocks run with `nnx.scan` (layer axis 0).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

N, D, IN, OUT = 4, 8, 6, 2
BATCH = 16
# Float32 terms summed in one training step (see models.assert_reductions_close):
# embed, 2 contractions per layer, head, the loss mean, the gradient sums over the batch.
STEP_TERMS = IN + 2 * N * D + D + BATCH * OUT + BATCH
LINEN_SCAN_AXIS = 1


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    h = nn.Dense(D, name='mlp')(x)
    x = x + jnp.tanh(nn.Dense(D, name='out')(h))
    return x, None


class LinenLoopDecoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name='embed')(x)
    for i in range(N):
      x, _ = LinenBlock(name=f'layers_{i}')(x)
    return nn.Dense(OUT, name='head')(x)


class LinenScanDecoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name='embed')(x)
    stack = nn.scan(LinenBlock, variable_axes={'params': LINEN_SCAN_AXIS}, split_rngs={'params': True}, length=N)
    x, _ = stack(name='layers')(x, None)
    return nn.Dense(OUT, name='head')(x)


class NnxBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.mlp = nnx.Linear(D, D, rngs=rngs)
    self.out = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.out(self.mlp(x)))


class NnxUnrolledDecoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(IN, D, rngs=rngs)
    self.layers = nnx.List([NnxBlock(rngs) for _ in range(N)])
    self.head = nnx.Linear(D, OUT, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for block in self.layers:
      x = block(x)
    return self.head(x)


class NnxStackedDecoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(IN, D, rngs=rngs)

    @nnx.split_rngs(splits=N)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return NnxBlock(rngs)

    self.layers = make_blocks(rngs)
    self.head = nnx.Linear(D, OUT, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block, x):
      return block(x)

    return self.head(run(self.layers, x))


def batch():
  kx, ky = jax.random.split(jax.random.key(5))
  return jax.random.normal(kx, (BATCH, IN)), jax.random.normal(ky, (BATCH, OUT))


def loss_of(pred, y):
  return jnp.mean((pred - y) ** 2)


TX = lambda: optax.adam(1e-2)


def linen_state(module_cls, steps=2):
  model = module_cls()
  variables = model.init(jax.random.key(1), jnp.ones((1, IN)))
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=TX())
  for _ in range(steps):
    state, _ = linen_step(state)
  return state


@jax.jit
def linen_step(state):
  x, y = batch()
  loss, grads = jax.value_and_grad(lambda p: loss_of(state.apply_fn(p, x), y))(state.params)
  return state.apply_gradients(grads=grads), loss


def nnx_state(module_cls):
  model = module_cls(nnx.Rngs(0))
  return {'model': model, 'optimizer': nnx.Optimizer(model, TX(), wrt=nnx.Param)}


@nnx.jit
def nnx_step(model, optimizer):
  x, y = batch()
  loss, grads = nnx.value_and_grad(lambda m: loss_of(m(x), y))(model)
  optimizer.update(model, grads)
  return loss

"""A Gemma-style block in Linen (fused gating einsum, (D, H, K) query, bfloat16) and its NNX port, and the rules between them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import models
from orbax_linen_nnx import cast, rename, reshape, split, transpose

D, H, K, F = 8, 2, 4, 16


class LinenGemmaBlock(nn.Module):
  """Upstream Gemma style: a (D, H, K) query kernel and a fused (2, F, D) gating einsum."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((H, K), use_bias=False, name='q_einsum', param_dtype=jnp.bfloat16)(x)
    x = x + nn.Dense(D, use_bias=False, name='o', param_dtype=jnp.bfloat16)(q.reshape(q.shape[:-2] + (H * K,)))
    w = self.param('gating_einsum', nn.initializers.normal(0.5), (2, F, D), jnp.bfloat16)
    h = nn.gelu(jnp.einsum('bd,fd->bf', x, w[0])) * jnp.einsum('bd,fd->bf', x, w[1])
    return x + h @ self.param('linear', nn.initializers.normal(0.5), (F, D), jnp.bfloat16)


class NnxGemmaBlock(nnx.Module):
  """The NNX port: float32, split projections, a flat (D, H*K) query kernel."""

  def __init__(self, rngs):
    self.q = nnx.Linear(D, H * K, use_bias=False, rngs=rngs)
    self.o = nnx.Linear(H * K, D, use_bias=False, rngs=rngs)
    self.gate_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = x + self.o(self.q(x))
    return x + self.down_proj(nnx.gelu(self.gate_proj(x)) * self.up_proj(x))


GEMMA_RULES = [
  rename({'q_einsum': 'q', 'linear': 'down_proj/kernel'}),
  split('gating_einsum', ['gate_proj/kernel', 'up_proj/kernel'], axis=0),
  transpose('gate_proj/kernel', (1, 0)),  # not down_proj: Linen's `linear` is already (F, D)
  transpose('up_proj/kernel', (1, 0)),
  reshape('q/kernel', (D, H, K), (D, H * K)),
  cast('{any...}', 'float32'),
]


def linen_gemma_state():
  model = LinenGemmaBlock()
  variables = model.init(jax.random.key(0), jnp.ones((1, D)))
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=optax.adam(1e-2))
  x = jax.random.normal(jax.random.key(1), (4, D))
  grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(state.params)
  return state.apply_gradients(grads=grads), x


def expected_nnx(linen_params):
  """The NNX values, computed independently with numpy from the Linen tree."""
  p = {k: np.asarray(v, np.float32) for k, v in models.flat(linen_params).items()}
  pre = 'params/' if any(k.startswith('params/') for k in p) else ''
  return {
    'q/kernel': p[f'{pre}q_einsum/kernel'].reshape(D, H * K),
    'o/kernel': p[f'{pre}o/kernel'],
    'gate_proj/kernel': p[f'{pre}gating_einsum'][0].T,
    'up_proj/kernel': p[f'{pre}gating_einsum'][1].T,
    'down_proj/kernel': p[f'{pre}linear'],
  }

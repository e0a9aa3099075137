"""NNX ports written the way users write them, for the tests of what such code meets.

A Linen network whose residual blocks come from a loop (`LBlock_0..2`, each a Dense, a LayerNorm, a Dense)
and its NNX port that sets one attribute per block (`setattr(self, f'block_{i}', ...)`, as ports of Linen
loops often do); a residual block with two same-shaped Dense + LayerNorm pairs, its port naming them
`fc1/ln1/fc2/ln2` (a numbered family) and one naming them `a/b` (names that say nothing); and a port's own
train state, a `flax.struct.dataclass` with `params: nnx.State`, `opt_state` and `step`. This module is also
the `--target` of command-line tests (`ports.py:abstract_net`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from flax.training import train_state

D_IN, D, D_OUT, BLOCKS = 4, 8, 2, 3
# The hand-written table for the setattr port: what 'auto' must infer.
NET_RULES = {'Dense_0': 'inp', 'Dense_1': 'head'}
for _i in range(BLOCKS):
  NET_RULES.update(
    {
      f'LBlock_{_i}/Dense_0': f'block_{_i}/up',
      f'LBlock_{_i}/LayerNorm_0': f'block_{_i}/norm',
      f'LBlock_{_i}/Dense_1': f'block_{_i}/down',
    }
  )
RES_RULES = {'Dense_0': 'fc1', 'LayerNorm_0': 'ln1', 'Dense_1': 'fc2', 'LayerNorm_1': 'ln2'}


class LBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(nn.Dense(2 * D)(x))
    return x + nn.Dense(D)(nn.relu(h))


class LNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D)(x)
    for _ in range(BLOCKS):
      x = LBlock()(x)
    return nn.Dense(D_OUT)(x)


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(D, 2 * D, rngs=rngs)
    self.norm = nnx.LayerNorm(2 * D, rngs=rngs)
    self.down = nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.norm(self.up(x))))


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(D_IN, D, rngs=rngs)
    for i in range(BLOCKS):
      setattr(self, f'block_{i}', Block(rngs))
    self.head = nnx.Linear(D, D_OUT, rngs=rngs)

  def __call__(self, x):
    x = self.inp(x)
    for i in range(BLOCKS):
      x = getattr(self, f'block_{i}')(x)
    return self.head(x)


def abstract_net():
  """The port's abstract state as users build it (for `--target ports.py:abstract_net`)."""
  return nnx.state(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))


class LRes(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.LayerNorm()(nn.Dense(D)(x)))
    return x + nn.LayerNorm()(nn.Dense(D)(h))


class NRes(nnx.Module):
  """Numbered names: fc1/ln1 are made first, as their numbers say."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(D, D, rngs=rngs)
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.fc2 = nnx.Linear(D, D, rngs=rngs)
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, x):
    return x + self.ln2(self.fc2(nnx.relu(self.ln1(self.fc1(x)))))


class NResAB(nnx.Module):
  """Names that say nothing of order: only the model itself (or a rename) tells `a` from `b`."""

  def __init__(self, rngs: nnx.Rngs):
    self.b = nnx.Linear(D, D, rngs=rngs)
    self.ln_b = nnx.LayerNorm(D, rngs=rngs)
    self.a = nnx.Linear(D, D, rngs=rngs)
    self.ln_a = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, x):
    return x + self.ln_a(self.a(nnx.relu(self.ln_b(self.b(x)))))


@struct.dataclass
class PortState:
  """A port's own train state, shaped like Linen's TrainState but holding NNX state."""

  step: Any
  params: Any
  opt_state: Any


def tx():
  return optax.adam(1e-2)


def port_state(module_cls, seed: int = 0, kind=PortState):
  """The train state of `module_cls`'s params: a PortState, or Flax's own `train_state.TrainState`."""
  params = nnx.state(module_cls(nnx.Rngs(seed)), nnx.Param)
  if kind is PortState:
    return PortState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx().init(params))
  return kind.create(apply_fn=None, params=params, tx=tx())


def batch(n: int = 16, d_in: int = D_IN, d_out: int = D_OUT, seed: int = 0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, d_in)), jax.random.normal(ky, (n, d_out))


def linen_variables(module, d_in: int = D_IN, seed: int = 0):
  return module.init(jax.random.key(seed), np.ones((1, d_in), np.float32))


# Float32 terms summed in one forward pass and one SGD step of these small models (batch 16): each
# Dense contraction's inner size, the norms' means over their features, the loss mean, the gradients'
# sums over the batch (see models.assert_reductions_close).
STEP_TERMS = 16 * D_OUT + 16 + 4 * (D + 2 * D) + 8 * D


# ---------------------------------------------------------------- a port of flaxmodels' ResNet18

# flaxmodels' ResNet (Linen, `pip install flaxmodels`) names its modules by class and call order
# (`BasicBlock_3/BatchNorm_1`); a port names them as the pretrained weights' own dictionary does
# (`block2_1/bn2`, `downsample_conv`), one attribute per block set in a loop.
RESNET_STAGES = ((64, False), (128, True), (256, True), (512, True))  # (features, first block downsamples)


class ResNetBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, downsample: bool, rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(
      i, o, (k, k), strides=(s, s), padding=((k // 2, k // 2),) * 2, use_bias=False, rngs=rngs
    )
    bn = lambda n: nnx.BatchNorm(n, momentum=0.1, epsilon=1e-5, rngs=rngs)  # flaxmodels' running averages
    self.conv1 = conv(cin, cout, 3, 2 if downsample else 1)
    self.bn1 = bn(cout)
    self.conv2 = conv(cout, cout, 3, 1)
    self.bn2 = bn(cout)
    if downsample:
      self.downsample_conv = conv(cin, cout, 1, 2)
      self.downsample_bn = bn(cout)

  def __call__(self, x):
    h = nnx.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    if hasattr(self, 'downsample_conv'):
      x = self.downsample_bn(self.downsample_conv(x))
    return nnx.relu(h + x)


class ResNet18(nnx.Module):
  def __init__(self, num_classes: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(64, momentum=0.1, epsilon=1e-5, rngs=rngs)
    cin = 64
    for stage, (features, down) in enumerate(RESNET_STAGES, 1):
      for i in range(2):
        setattr(self, f'block{stage}_{i}', ResNetBlock(cin, features, down and i == 0, rngs))
        cin = features
    self.fc = nnx.Linear(512, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in range(1, 5):
      for i in range(2):
        x = getattr(self, f'block{stage}_{i}')(x)
    return self.fc(jnp.mean(x, axis=(1, 2)))


def resnet_rules() -> dict[str, str]:
  """The table a user writes from flaxmodels' Linen names to the port's."""
  table = {'Conv_0': 'conv1', 'BatchNorm_0': 'bn1', 'Dense_0': 'fc'}
  inner = {
    'Conv_0': 'conv1',
    'BatchNorm_0': 'bn1',
    'Conv_1': 'conv2',
    'BatchNorm_1': 'bn2',
    'Conv_2': 'downsample_conv',
    'BatchNorm_2': 'downsample_bn',
  }
  for k in range(8):
    stage, i = k // 2 + 1, k % 2
    for linen, port in inner.items():
      if linen[-1] != '2' or (i == 0 and stage > 1):
        table[f'BasicBlock_{k}/{linen}'] = f'block{stage}_{i}/{port}'
  return table


# ---------------------------------------------------------------- a small CNN, as a newcomer brings one


class LCNN(nn.Module):
  """A Linen CNN with BatchNorm and Dropout: six modules named by class and order (Conv_0, BatchNorm_0, ...)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
    x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(32)(x.mean((1, 2))))
    return nn.Dense(10)(x)


class CNN(nnx.Module):
  """Its NNX port, named as the port's author chose: conv1/bn1/conv2/bn2/fc1/fc2 (`width` is conv1's features)."""

  def __init__(self, rngs: nnx.Rngs, width: int = 8):
    self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = nnx.Conv(width, 16, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.fc2(self.drop(self.fc1(x.mean((1, 2)))))


CNN_RULES = {
  'Conv_0': 'conv1',
  'BatchNorm_0': 'bn1',
  'Conv_1': 'conv2',
  'BatchNorm_1': 'bn2',
  'Dense_0': 'fc1',
  'Dense_1': 'fc2',
}


class CNNTrainState(train_state.TrainState):
  batch_stats: Any


def cnn_images(seed: int = 0, n: int = 8):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, 8, 8, 3)), jax.random.randint(ky, (n,), 0, 10)


def linen_cnn_state(seed: int = 0) -> CNNTrainState:
  """The Linen run's TrainState after one training step (batch statistics and Adam moments not at their init)."""
  x, y = cnn_images(seed)
  v = LCNN().init(jax.random.key(seed), x)
  state = CNNTrainState.create(apply_fn=LCNN().apply, params=v['params'], batch_stats=v['batch_stats'], tx=tx())

  def loss(params):
    logits, upd = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      x,
      train=True,
      rngs={'dropout': jax.random.key(1)},
      mutable=['batch_stats'],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

  grads, upd = jax.grad(loss, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads).replace(batch_stats=upd['batch_stats'])


def cnn_train_state(rngs_seed: int = 0, width: int = 8):
  """The port's model and optimizer, as NNX code builds them."""
  model = CNN(nnx.Rngs(rngs_seed), width)
  return model, nnx.Optimizer(model, tx(), wrt=nnx.Param)


def abstract_cnn(width: int = 8):
  """The abstract {'model', 'optimizer'} state (for `--target ports.py:abstract_cnn`)."""
  return nnx.eval_shape(
    lambda: (lambda m, o: {'model': nnx.state(m), 'optimizer': nnx.state(o)})(*cnn_train_state(0, width))
  )

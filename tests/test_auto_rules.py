"""`rules='auto'`: the rename table inferred from the two trees, on real model code.

Each case saves a Linen model's variables with a CheckpointManager, restores them into NNX code that names
its modules otherwise, once with `rules='auto'` and once with the table written by hand: the two restores are
equal bit for bit, and the NNX model then computes what the Linen model computes (a wrong pairing of
modules that look alike would not). Two cases are truly ambiguous (one in every layer of a stack) and must
raise, and the one line each message asks for, stated right, then restores.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import models
import orbax_linen_nnx
from helpers import save
from orbax_linen_nnx import LinenCompatRestore, PlanError, cli, rename


def _ported(tmp_path, linen_module, variables, model, table, x):
  """Saves the Linen `variables` and restores them into `model` with rules='auto' and with the hand-written
  `table`: the inferred table is `table`, each rename is noted in the plan, the two restores are equal bit for
  bit, and the restored model computes and trains as the Linen model does. Returns (restored model, plan)."""
  save(tmp_path / 'run', what=ocp.args.StandardSave(variables))
  with ocp.CheckpointManager(tmp_path / 'run') as mngr:
    plan = mngr.restore(1, args=LinenCompatRestore(model, rules='auto', dry_run=True))
    auto = mngr.restore(1, args=LinenCompatRestore(model, rules='auto'))
  with ocp.CheckpointManager(tmp_path / 'run') as mngr:
    by_hand = mngr.restore(1, args=LinenCompatRestore(nnx.state(model), rules=[rename(table)]))
  models.assert_all_equal(nnx.state(auto), by_hand)
  assert plan.inferred_renames == table, plan.inferred_renames
  for k, v in table.items():
    assert f"rules='auto' paired {k} -> {v}" in plan.notes, plan.notes
  auto.eval()
  _same_output(auto(x), linen_module.apply(variables, x))
  _step_matches(auto, linen_module, variables, x)
  return auto, plan


def _same_output(nnx_out, linen_out):
  # The same weights through the same XLA ops (dot_general, conv_general_dilated, the same normalisation
  # formulas) in two frameworks: equal up to float32 rounding, which differs only where the frameworks order
  # an operation's terms differently; 1e-5 relative covers that for these sizes, and a swapped pair of
  # modules misses by far more.
  np.testing.assert_allclose(np.asarray(nnx_out), np.asarray(linen_out), rtol=1e-5, atol=1e-6)


def _step_matches(model, linen_module, variables, x):
  """One SGD step on the loss mean(y**2) from the restored weights, in both frameworks: the loss after it
  agrees (normalisation layers in inference mode on both sides, so only the params move)."""

  def linen_loss(params):
    return jnp.mean(linen_module.apply({**variables, 'params': params}, x) ** 2)

  params = variables['params']
  params = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(linen_loss)(params))
  graphdef, nnx_params, rest = nnx.split(model, nnx.Param, ...)

  def nnx_loss(p):
    return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)

  nnx_params = jax.tree.map(lambda p, g: p - 0.1 * g, nnx_params, jax.grad(nnx_loss)(nnx_params))
  # As in _same_output: float32 rounding where the frameworks order terms differently, through one step.
  np.testing.assert_allclose(float(nnx_loss(nnx_params)), float(linen_loss(params)), rtol=1e-4)


# -- 1. The MLP every NNX migration guide starts with.


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(64)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(10)(nn.relu(x))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(16, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.linear_out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.linear_out(nnx.relu(self.dropout(self.bn(self.linear(x)))))


def test_the_porting_guide_mlp(tmp_path):
  x = jax.random.normal(jax.random.key(1), (4, 16))
  variables = LinenMLP().init(jax.random.key(0), x)
  variables = {'params': variables['params'], 'batch_stats': jax.tree.map(lambda v: v + 0.5, variables['batch_stats'])}
  model = NnxMLP(nnx.Rngs(0))
  table = {'BatchNorm_0': 'bn', 'Dense_0': 'linear', 'Dense_1': 'linear_out'}
  auto, _ = _ported(tmp_path, LinenMLP(), variables, model, table, x)
  # Into an nnx.State too (no attribute order: the shapes tell these modules apart).
  models.assert_all_equal(orbax_linen_nnx.restore(tmp_path / 'run', nnx.state(model), rules='auto'), nnx.state(auto))


# -- 2. A CNN as in the Flax MNIST example, with BatchNorm, ported with other names.


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    for features in (8, 16):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))  # Dense_1 (the inner one, made second) then Dense_0


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.norm1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
    self.norm2 = nnx.BatchNorm(16, rngs=rngs)
    self.hidden = nnx.Linear(7 * 7 * 16, 32, rngs=rngs)
    self.logits = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    for conv, norm in ((self.conv1, self.norm1), (self.conv2, self.norm2)):
      x = nnx.avg_pool(nnx.relu(norm(conv(x))), (2, 2), strides=(2, 2))
    return self.logits(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))


def test_a_cnn_with_batchnorm(tmp_path):
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  variables = LinenCNN().init(jax.random.key(0), x)
  variables = {
    'params': variables['params'],
    'batch_stats': jax.tree.map(lambda v: v * 0.5 + 0.25, variables['batch_stats']),
  }
  model = NnxCNN(nnx.Rngs(0))
  # nn.Dense(10)(nn.relu(nn.Dense(32)(x))): the outer Dense(10) is made first, so it is Dense_0.
  table = {
    'BatchNorm_0': 'norm1',
    'BatchNorm_1': 'norm2',
    'Conv_0': 'conv1',
    'Conv_1': 'conv2',
    'Dense_0': 'logits',
    'Dense_1': 'hidden',
  }
  _ported(tmp_path, LinenCNN(), variables, model, table, x)


# -- 3. A ResNet-style model: repeated blocks that look alike, paired by order.


class LinenResNetBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = x
    for _ in range(3):  # Conv_0..2 and BatchNorm_0..2, all alike: only their order tells them apart
      y = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(y)))
    return x + y


class LinenResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    for _ in range(3):
      x = LinenResNetBlock()(x)
    return nn.Dense(4)(x.mean(axis=(1, 2)))


class NnxResNetBlock(nnx.Module):
  def __init__(self, rngs):
    self.conv1, self.bn1 = nnx.Conv(8, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.conv2, self.bn2 = nnx.Conv(8, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.conv3, self.bn3 = nnx.Conv(8, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)

  def __call__(self, x):
    y = x
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
      y = nnx.relu(bn(conv(y)))
    return x + y


class NnxResNet(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.blocks = nnx.List([NnxResNetBlock(rngs) for _ in range(3)])
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def _randomized(variables):
  """Every weight different, so that any swap of modules that look alike changes the output."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(
    treedef, [v + jax.random.uniform(k, v.shape, v.dtype, -0.1, 0.1) for k, v in zip(keys, leaves)]
  )


def test_a_resnet_with_repeated_blocks(tmp_path):
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = _randomized(LinenResNet().init(jax.random.key(0), x))
  model = NnxResNet(nnx.Rngs(0))
  hand = {'Conv_0': 'stem', 'Dense_0': 'head'}
  for i in range(3):
    for j in range(3):  # every leaf of a block is under one of its convs or norms: no entry for the block
      hand[f'LinenResNetBlock_{i}/Conv_{j}'] = f'blocks/{i}/conv{j + 1}'
      hand[f'LinenResNetBlock_{i}/BatchNorm_{j}'] = f'blocks/{i}/bn{j + 1}'
  _, plan = _ported(tmp_path, LinenResNet(), variables, model, hand, x)
  # Blocks and the convs inside them look alike: paired by creation and attribute order, and said so.
  assert any('paired in creation and attribute order' in n for n in plan.notes), plan.notes


# -- 4. A transformer block stack: a Linen loop of layers_N, into NNX with attn / mlp names.


class LinenMlpBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16)(nn.gelu(nn.Dense(64)(x)))


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.SelfAttention(num_heads=2, qkv_features=16, deterministic=True)(nn.LayerNorm()(x))
    return x + LinenMlpBlock()(nn.LayerNorm()(x))


class LinenTransformer(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = LinenBlock(name=f'layers_{i}')(x)
    return x


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(16, 64, rngs=rngs)
    self.down = nnx.Linear(64, 16, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn_norm = nnx.LayerNorm(16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(16, rngs=rngs)
    self.mlp = NnxMlp(rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x), deterministic=True)
    return x + self.mlp(self.mlp_norm(x))


class NnxTransformer(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([NnxBlock(rngs) for _ in range(3)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def test_a_transformer_block_stack(tmp_path):
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  variables = _randomized(LinenTransformer().init(jax.random.key(0), x))
  model = NnxTransformer(nnx.Rngs(0))
  table = {}
  for i in range(3):
    table.update(
      {
        f'layers_{i}/LayerNorm_0': f'layers/{i}/attn_norm',
        f'layers_{i}/LayerNorm_1': f'layers/{i}/mlp_norm',
        f'layers_{i}/SelfAttention_0': f'layers/{i}/attn',  # the MLP block: by its two Dense
        f'layers_{i}/LinenMlpBlock_0/Dense_0': f'layers/{i}/mlp/down',  # the outer Dense is made first
        f'layers_{i}/LinenMlpBlock_0/Dense_1': f'layers/{i}/mlp/up',
      }
    )
  _ported(tmp_path, LinenTransformer(), variables, model, table, x)


def _vmapped(block, rngs, layers=3):
  """`layers` of `block(rngs)` made by nnx.vmap: one stack, every leaf with the layer axis first."""

  @nnx.split_rngs(splits=layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return block(rngs)

  return make(rngs)


def _scanned(layers, x, each=lambda y: y):
  """`x` through every layer of a stack in turn (nnx.scan), `each` applied after each layer."""

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def step(x, layer):
    return each(layer(x))

  return step(x, layers)


class NnxStackedTransformer(nnx.Module):
  def __init__(self, rngs):
    self.layers = _vmapped(NnxBlock, rngs)  # one stack of 3 blocks

  def __call__(self, x):
    return _scanned(self.layers, x)


def test_a_linen_loop_into_an_nnx_stack(tmp_path):
  """The same Linen loop into NNX blocks made by nnx.vmap: one layer's pairing serves every layer
  (renames of layers_{i}/..., the planner stacks the layers after them)."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  variables = _randomized(LinenTransformer().init(jax.random.key(0), x))
  model = NnxStackedTransformer(nnx.Rngs(0))
  table = {
    'layers_{i}/LayerNorm_0': 'layers_{i}/attn_norm',
    'layers_{i}/LayerNorm_1': 'layers_{i}/mlp_norm',
    'layers_{i}/SelfAttention_0': 'layers_{i}/attn',
    'layers_{i}/LinenMlpBlock_0/Dense_0': 'layers_{i}/mlp/down',
    'layers_{i}/LinenMlpBlock_0/Dense_1': 'layers_{i}/mlp/up',
  }
  auto, _ = _ported(tmp_path, LinenTransformer(), variables, model, table, x)
  np.testing.assert_array_equal(
    np.asarray(auto.layers.mlp.up.kernel.get_value()[2]),
    np.asarray(variables['params']['layers_2']['LinenMlpBlock_0']['Dense_1']['kernel']),
  )


class LinenScanBlock(LinenBlock):
  """The block as nn.scan runs it: (carry, input) -> (carry, output)."""

  @nn.compact
  def __call__(self, x, _):
    return LinenBlock.__call__(self, x), None


class LinenScanned(nn.Module):
  """MaxText's layout: the blocks as one nn.scan stack, params with the layer axis at 1."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      LinenScanBlock, variable_axes={'params': 1}, split_rngs={'params': True}, length=3, in_axes=(nn.broadcast,)
    )
    return scan(name='layers')(x, None)[0]


def test_a_linen_scan_into_an_nnx_stack(tmp_path):
  """A Linen nn.scan stack (layer axis 1) into the nnx.vmap stack (layer axis 0): one layer against one layer,
  the renames on the stacked paths, the axis moved by the planner."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  variables = _randomized(LinenScanned().init(jax.random.key(0), x))
  model = NnxStackedTransformer(nnx.Rngs(0))
  table = {
    'layers/LayerNorm_0': 'layers/attn_norm',
    'layers/LayerNorm_1': 'layers/mlp_norm',
    'layers/LinenMlpBlock_0/Dense_0': 'layers/mlp/down',
    'layers/LinenMlpBlock_0/Dense_1': 'layers/mlp/up',
    'layers/SelfAttention_0': 'layers/attn',
  }
  _ported(tmp_path, LinenScanned(), variables, model, table, x)


# -- 5. Truly ambiguous: two Dense layers of one shape, and no attribute order to tell them apart.


class LinenTwins(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.Dense(8)(nn.relu(nn.Dense(8)(x))))


class NnxTwins(nnx.Module):
  def __init__(self, rngs):
    self.inner = nnx.Linear(8, 8, rngs=rngs)
    self.outer = nnx.Linear(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(self.outer(nnx.relu(self.inner(x))))


def test_an_ambiguous_pairing_raises_and_the_line_it_asks_for_restores(tmp_path):
  x = jax.random.normal(jax.random.key(1), (3, 8))
  variables = _randomized(LinenTwins().init(jax.random.key(0), x))
  save(tmp_path / 'run', what=ocp.args.StandardSave(variables))
  state = nnx.state(NnxTwins(nnx.Rngs(0)))  # an nnx.State: attributes sorted by name, no order
  with pytest.raises(PlanError) as e:
    orbax_linen_nnx.plan(tmp_path / 'run', state, rules='auto')
  message = str(e.value)
  assert 'Dense_1, Dense_2 and inner, outer all hold' in message and 'no attribute order' in message, message
  # What it did settle (the one (8, 4) Dense) is stated apart from the pair name order only guessed.
  assert "It settled rename({'Dense_0': 'head'})." in message, message
  # The fix is written on these modules' own names; which is right only the model code tells.
  assert "rules=[rename({'Dense_1': 'inner'}), 'auto'] if Dense_1 is what inner holds (else give its partner" in (
    message
  ), message
  # The one line: Linen names modules as they are made, the callee before its argument, so in
  # nn.Dense(4)(nn.Dense(8)(nn.relu(nn.Dense(8)(x)))) the head is Dense_0 and the outer Dense(8) Dense_1.
  restored = orbax_linen_nnx.restore(tmp_path / 'run', state, rules=[rename({'Dense_1': 'outer'}), 'auto'])
  model = NnxTwins(nnx.Rngs(0))
  nnx.update(model, restored)
  _same_output(model(x), LinenTwins().apply(variables, x))
  _step_matches(model, LinenTwins(), variables, x)
  # A rename the caller gives wins over inference, whatever the shapes say.
  plan = orbax_linen_nnx.plan(tmp_path / 'run', state, rules=[rename({'Dense_1': 'outer'}), 'auto'])
  assert plan.inferred_renames == {'Dense_0': 'head', 'Dense_2': 'inner'}, plan.inferred_renames


def test_an_ambiguous_pairing_the_other_way_asks_for_the_same_line(tmp_path):
  """An NNX checkpoint of the twins into a Linen target: the line asked for is the same Linen -> NNX rename
  (rules are written that way both ways), with no advice to pass a model, and stated right it restores."""
  x = jax.random.normal(jax.random.key(1), (3, 8))
  saved = nnx.state(NnxTwins(nnx.Rngs(3)))
  save(tmp_path / 'run', what=ocp.args.StandardSave(saved))
  abstract = jax.eval_shape(lambda: LinenTwins().init(jax.random.key(0), x))
  with pytest.raises(PlanError) as e:
    orbax_linen_nnx.plan(tmp_path / 'run', abstract, rules='auto')
  message = str(e.value)
  assert "It settled rename({'Dense_0': 'head'})." in message, message
  assert "rules=[rename({'Dense_1': 'inner'}), 'auto'] if Dense_1 is what inner holds" in message, message
  fix = message.split('Fix:')[1].split('\n')[0]
  assert 'an NNX checkpoint keeps no attribute order' in fix and 'initialised nnx.Module' not in fix, message
  restored = orbax_linen_nnx.restore(tmp_path / 'run', abstract, rules=[rename({'Dense_1': 'outer'}), 'auto'])
  for linen_name, nnx_name in (('Dense_0', 'head'), ('Dense_1', 'outer'), ('Dense_2', 'inner')):
    for leaf in ('kernel', 'bias'):
      np.testing.assert_array_equal(restored['params'][linen_name][leaf], saved[nnx_name][leaf][...])
  model = NnxTwins(nnx.Rngs(3))
  _same_output(LinenTwins().apply(restored, x), model(x))
  _step_matches(model, LinenTwins(), restored, x)  # NNX holds what was saved, Linen what it restored


class LinenTwinsLoop(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = LinenTwins(name=f'layers_{i}')(x)[..., :1] * jnp.ones(8)
    return x


class NnxTwinsStack(nnx.Module):
  def __init__(self, rngs):
    self.layers = _vmapped(NnxTwins, rngs)

  def __call__(self, x):
    return _scanned(self.layers, x, lambda y: y[..., :1] * jnp.ones(8))


def test_an_ambiguous_pairing_inside_a_stack_asks_for_one_line_per_layer(tmp_path):
  """The same twins in every layer of a Linen loop, into an nnx.vmap stack: the line asked for is written
  for all layers at once (`layers_{i}/...`), and stated right it restores every layer."""
  x = jax.random.normal(jax.random.key(1), (3, 8))
  variables = _randomized(LinenTwinsLoop().init(jax.random.key(0), x))
  save(tmp_path / 'run', what=ocp.args.StandardSave(variables))
  state = nnx.state(NnxTwinsStack(nnx.Rngs(0)))
  with pytest.raises(PlanError) as e:
    orbax_linen_nnx.plan(tmp_path / 'run', state, rules='auto')
  message = str(e.value)
  assert "It settled rename({'layers_{i}/Dense_0': 'layers_{i}/head'})." in message, message
  assert "rules=[rename({'layers_{i}/Dense_1': 'layers_{i}/inner'}), 'auto'] if layers_{i}/Dense_1 is" in (message), (
    message
  )
  restored = orbax_linen_nnx.restore(
    tmp_path / 'run', state, rules=[rename({'layers_{i}/Dense_1': 'layers_{i}/outer'}), 'auto']
  )
  model = NnxTwinsStack(nnx.Rngs(0))
  nnx.update(model, restored)
  for i in range(3):  # every layer's slice is that layer's Linen weights, bit for bit
    for linen_name, nnx_name in (('Dense_0', 'head'), ('Dense_1', 'outer'), ('Dense_2', 'inner')):
      np.testing.assert_array_equal(
        restored['layers'][nnx_name]['kernel'][...][i], variables['params'][f'layers_{i}'][linen_name]['kernel']
      )
  _same_output(model(x), LinenTwinsLoop().apply(variables, x))
  _step_matches(model, LinenTwinsLoop(), variables, x)


def test_the_command_line_suggests_the_rules_and_converts_with_them(tmp_path, capsys):
  """`plan --suggest-rules` prints a rules module that `--rules FILE:RULES` loads; `convert --rules auto`
  writes what that table writes. (In this process: test_cli.py runs the command line in fresh ones.)"""
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  variables = LinenCNN().init(jax.random.key(0), x)
  save(tmp_path / 'linen', what=ocp.args.StandardSave(variables))
  target = tmp_path / 'target.py'
  target.write_text(
    'from flax import nnx\nfrom test_auto_rules import NnxCNN\n\n'
    'def abstract():\n  return nnx.state(NnxCNN(nnx.Rngs(0)))\n'
  )
  capsys.readouterr()
  assert cli.main(['plan', str(tmp_path / 'linen' / '1'), '--target', f'{target}:abstract', '--suggest-rules']) == 0
  suggested = capsys.readouterr().out
  (tmp_path / 'suggested.py').write_text(suggested)
  assert "'Conv_0': 'conv1'," in suggested and 'RULES = [rename({' in suggested, suggested
  for rules, dst in ((f'{tmp_path / "suggested.py"}:RULES', 'by_table'), ('auto', 'by_auto')):
    assert (
      cli.main(
        [
          'convert',
          str(tmp_path / 'linen' / '1'),
          str(tmp_path / dst / '1'),
          '--target',
          f'{target}:abstract',
          '--rules',
          rules,
          '--quiet',
        ]
      )
      == 0
    ), capsys.readouterr().err
  capsys.readouterr()
  assert cli.main(['compare', str(tmp_path / 'by_table' / '1'), str(tmp_path / 'by_auto' / '1')]) == 0, (
    capsys.readouterr().out
  )


def test_the_command_line_takes_the_line_an_ambiguity_asks_for(tmp_path, capsys):
  """The twins through the command line: `plan --suggest-rules` fails saying what to write and where; the
  line, stated right in a rules file, goes to `--suggest-rules --rules FILE:RULES`, whose printed module
  converts to what that pairing restores, bit for bit."""
  x = jax.random.normal(jax.random.key(1), (3, 8))
  variables = _randomized(LinenTwins().init(jax.random.key(0), x))
  save(tmp_path / 'linen', what=ocp.args.StandardSave(variables))
  target = tmp_path / 'target.py'
  target.write_text(
    'from flax import nnx\nfrom test_auto_rules import NnxTwins\n\n'
    'def abstract():\n  return nnx.state(NnxTwins(nnx.Rngs(0)))\n'
  )
  src, tgt = str(tmp_path / 'linen' / '1'), f'{target}:abstract'
  capsys.readouterr()
  assert cli.main(['plan', src, '--target', tgt, '--suggest-rules']) == cli.EXIT_PLAN
  err = capsys.readouterr().err
  assert "RULES = [rename({'Dense_1': 'inner'}), 'auto'] if Dense_1 is what inner holds" in err, err
  assert 'pass --rules rules.py:RULES (to plan --suggest-rules too)' in err and 'rules=' not in err, err
  (tmp_path / 'rules.py').write_text(
    "from orbax_linen_nnx import rename\n\nRULES = [rename({'Dense_1': 'outer'}), 'auto']\n"
  )
  assert cli.main(['plan', src, '--target', tgt, '--suggest-rules', '--rules', f'{tmp_path / "rules.py"}:RULES']) == 0
  suggested = capsys.readouterr().out
  given_then_inferred = (
    "    rename({'Dense_1': 'outer'}),\n    rename({\n        'Dense_0': 'head',\n        'Dense_2': 'inner',\n"
  )
  assert given_then_inferred in suggested, suggested
  (tmp_path / 'suggested.py').write_text(suggested)
  assert (
    cli.main(
      [
        'convert',
        src,
        str(tmp_path / 'nnx' / '1'),
        '--target',
        tgt,
        '--rules',
        f'{tmp_path / "suggested.py"}:RULES',
        '--quiet',
      ]
    )
    == 0
  ), capsys.readouterr().err
  with ocp.CheckpointManager(tmp_path / 'nnx') as mngr:
    written = mngr.restore(1)
  for linen_name, nnx_name in (('Dense_0', 'head'), ('Dense_1', 'outer'), ('Dense_2', 'inner')):
    for leaf in ('kernel', 'bias'):
      np.testing.assert_array_equal(written[nnx_name][leaf]['value'], variables['params'][linen_name][leaf])


def test_the_printed_module_keeps_the_given_rules_or_says_why_it_cannot():
  """`as_python` writes the given rules as the calls that make them, then the inferred renames; executed,
  the module gives those same rules. A rule made from a function has no text: the error says what to add."""
  from orbax_linen_nnx import rules as rules_lib

  given = [
    rules_lib.split('attn/qkv/kernel', ['q/kernel', 'k/kernel', 'v/kernel'], axis=1),
    rules_lib.transpose('out/kernel', (1, 0)),
    rules_lib.rename({'Embed_0': 'embed'}),
    'auto',
  ]
  text = rules_lib.as_python({'Dense_0': 'fc1'}, given)
  namespace: dict = {}
  exec(compile(text, 'suggested.py', 'exec'), namespace)  # what --rules FILE:RULES would load
  assert [repr(r) for r in namespace['RULES']] == [
    repr(given[0]),
    repr(given[1]),
    "rename({'Embed_0': 'embed'})",
    "rename({'Dense_0': 'fc1'})",
  ], text
  with pytest.raises(rules_lib.RuleError, match=r"add rename\(\{'Dense_0': 'fc1'\}\) after them"):
    rules_lib.as_python({'Dense_0': 'fc1'}, [rules_lib.rename(lambda path: path), 'auto'])

"""Real Linen and NNX models used across the tests, and the helpers that train them."""

from __future__ import annotations

import functools
import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

D_IN, D_HID, D_OUT = 16, 32, 8
MLP_RULES = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}
BN_RULES = {'Dense_0': 'fc1', 'BatchNorm_0': 'bn', 'Dense_1': 'fc2'}


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(D_HID)(x))  # built first, so named Dense_0
    return nn.Dense(D_OUT)(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
    self.fc2 = nnx.Linear(D_HID, D_OUT, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


class LinenBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(D_HID)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(D_OUT)(nn.relu(x))


class NnxBN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
    self.bn = nnx.BatchNorm(D_HID, momentum=0.9, rngs=rngs)
    self.fc2 = nnx.Linear(D_HID, D_OUT, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.bn(self.fc1(x))))


class NnxMLPWithDropout(NnxMLP):
  """NNX-only RNG state (Dropout's rngs) that no Linen checkpoint holds."""

  def __init__(self, rngs: nnx.Rngs):
    super().__init__(rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)


class BNTrainState(train_state.TrainState):
  batch_stats: dict


# The most common model shape of all: Dense -> BatchNorm -> Dropout -> Dense, in both frameworks.
# `dropout=False` runs either deterministically, so that the two can be compared step for step
# (their dropout streams differ by design: Linen draws from the key passed to apply, NNX from the
# stream the module holds).
DROP_RULES = BN_RULES  # Dropout holds no parameters: the same renames


class LinenBNDrop(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True, dropout: bool = True):
    x = nn.Dense(D_HID)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.1, deterministic=not dropout)(nn.relu(x))
    return nn.Dense(D_OUT)(x)


class NnxBNDrop(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
    self.bn = nnx.BatchNorm(D_HID, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.fc2 = nnx.Linear(D_HID, D_OUT, rngs=rngs)

  def __call__(self, x, dropout: bool = True):
    return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x))), deterministic=not dropout))


def linen_bn_drop_state(tx, steps: int = 2):
  """A Linen BNTrainState of LinenBNDrop trained `steps` steps, dropout on (Flax's BatchNorm guide)."""
  variables = LinenBNDrop().init(jax.random.key(2), jnp.ones((4, D_IN)), dropout=False)
  state = BNTrainState.create(
    apply_fn=LinenBNDrop().apply, params=variables['params'], tx=tx, batch_stats=variables['batch_stats']
  )
  for i in range(steps):
    state, _ = linen_bn_drop_step(state, jax.random.key(100 + i), True)
  return state


@functools.partial(jax.jit, static_argnums=2)
def linen_bn_drop_step(state, dropout_key, dropout: bool):
  x, y = batch()

  def loss_fn(params):
    pred, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      x,
      dropout=dropout,
      rngs={'dropout': dropout_key},
      mutable=['batch_stats'],
    )
    return mse(pred, y), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads).replace(batch_stats=updates['batch_stats']), loss


@nnx.jit(static_argnums=2)
def nnx_bn_drop_step(model, optimizer, dropout: bool):
  x, y = batch()

  def loss_fn(m):
    return mse(m(x, dropout=dropout), y)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def batch(seed: int = 0, n: int = 32):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, D_IN)), jax.random.normal(ky, (n, D_OUT))


def mse(pred, y):
  return jnp.mean((pred - y) ** 2)


def linen_mlp_state(tx, steps: int = 2, *, variables_as_params: bool = True):
  """A Linen TrainState trained `steps` steps (the usual Linen training loop)."""
  model = LinenMLP()
  variables = model.init(jax.random.key(1), jnp.ones((1, D_IN)))
  params = variables if variables_as_params else variables['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  for _ in range(steps):
    state, _ = linen_mlp_step(state, variables_as_params)
  return state


def linen_mlp_step(state, variables_as_params: bool = True):
  x, y = batch()

  def loss_fn(params):
    v = params if variables_as_params else {'params': params}
    return mse(state.apply_fn(v, x), y)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


linen_mlp_step = jax.jit(linen_mlp_step, static_argnums=1)


def linen_bn_state(tx, steps: int = 2):
  model = LinenBN()
  variables = model.init(jax.random.key(2), jnp.ones((4, D_IN)))
  state = BNTrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=tx,
    batch_stats=variables['batch_stats'],
  )
  for _ in range(steps):
    state, _ = linen_bn_step(state)
  return state


@jax.jit
def linen_bn_step(state):
  x, y = batch()

  def loss_fn(params):
    pred, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x, mutable=['batch_stats'])
    return mse(pred, y), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads).replace(batch_stats=updates['batch_stats'])
  return state, loss


def nnx_train_state(module_cls, tx):
  model = module_cls(nnx.Rngs(0))
  return {'model': model, 'optimizer': nnx.Optimizer(model, tx, wrt=nnx.Param)}


def nnx_step(model, optimizer):
  x, y = batch()

  def loss_fn(m):
    return mse(m(x), y)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


# Sharding policies over the (4, 2) ('data', 'model') mesh.
def _spec(shape, policy: str) -> P:
  if policy == 'replicated' or len(shape) == 0:
    return P()
  if policy == 'one_axis':
    return P('data') if shape[0] % 4 == 0 else P()
  if policy == 'two_axes':
    if len(shape) >= 2 and shape[0] % 4 == 0 and shape[1] % 2 == 0:
      return P('data', 'model')
    return P('model') if shape[0] % 2 == 0 else P()
  raise ValueError(policy)


def sharding_for(shape, mesh, policy: str) -> NamedSharding:
  return NamedSharding(mesh, _spec(shape, policy))


def shard_abstract(tree, mesh, policy: str):
  """Gives every abstract leaf (Variable or ShapeDtypeStruct) a NamedSharding."""

  def put(leaf):
    if isinstance(leaf, nnx.Variable):
      v = leaf.get_raw_value()
      if not jax.tree.leaves(v):
        return leaf  # no array (optax.MaskedNode)
      return leaf.copy(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_for(v.shape, mesh, policy)))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(leaf.shape, mesh, policy))

  return jax.tree_util.tree_map(put, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_sharded(tree, mesh, policy: str):
  """A concrete state's arrays (Variables' values too) placed on the mesh by `policy`."""

  def put(x):
    return jax.device_put(x, sharding_for(x.shape, mesh, policy))

  return jax.tree.map(put, tree)


def flat(tree) -> dict[str, object]:
  """{'a/b/c': leaf} over a pytree, Variables unwrapped to their values."""
  from orbax_linen_nnx import layout

  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  out = {}
  for keys, leaf in leaves:
    out['/'.join(layout.key_path(keys))] = leaf.get_raw_value() if isinstance(leaf, nnx.Variable) else leaf
  return out


def host_values(tree) -> dict[str, np.ndarray]:
  """{'a/b/c': host array} of every value in a tree: typed PRNG keys as their key data; None and
  abstract leaves (ShapeDtypeStruct) left out."""
  out = {}
  for path, v in flat(tree).items():
    if v is None or isinstance(v, jax.ShapeDtypeStruct):
      continue
    if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
      v = jax.random.key_data(v)
    out[path] = np.asarray(v)
  return out


def assert_all_equal(got, want):
  """Two trees hold values at the same paths, each of the same dtype and bit for bit equal."""
  got, want = host_values(got), host_values(want)
  assert set(got) == set(want), sorted(set(got) ^ set(want))
  for path, value in want.items():
    assert got[path].dtype == value.dtype, path
    np.testing.assert_array_equal(got[path], value, err_msg=path)


# Float32 math run twice in different summation orders (sharded vs unsharded,
# Linen vs NNX, one XLA CPU backend vs another) is not bit-equal, so results of
# *computations* are compared with a tolerance; restored *values* never are.
# Recursive summation of n float32 terms has a relative error of at most about
# n * eps (eps = 2**-23; Higham, "Accuracy and Stability of Numerical
# Algorithms", 2nd ed., section 4.2), so two orders differ by at most about
# 2 * n * eps, relative to the magnitudes summed.
F32_EPS = float(np.finfo(np.float32).eps)


def assert_reductions_close(got, want, *, terms: int, err_msg: str = ''):
  """`got` and `want` are the same float32 computation summed in different orders.

  `terms` counts the float32 terms summed along the computation (each matmul's
  inner size, each mean's count, over every training step it spans). Errors
  relative to each element use the array's largest magnitude as the scale, as
  elements that cancel to near zero keep the absolute error of their inputs.
  A wrong restore moves results by orders of magnitude more than this.
  """
  tol = 2 * terms * F32_EPS
  want = np.asarray(want, np.float64)
  got = np.asarray(got, np.float64)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.max(np.abs(want), initial=0.0)), err_msg=err_msg)


# Terms summed in one training step of the test MLP (batch 32): the two Dense
# contractions (16, 32), the loss mean (32 x 8), the gradient sums over the batch.
MLP_STEP_TERMS = D_IN + D_HID + 32 * D_OUT + 32
# The BatchNorm variant adds the batch mean and variance (32 each).
BN_STEP_TERMS = MLP_STEP_TERMS + 2 * 32


def assert_same(restored, expected: dict[str, object], pairs: dict[str, str]):
  """Every restored[target] equals expected[source] exactly (values and dtype-cast)."""
  got = flat(restored)
  for tgt, src in pairs.items():
    a = got[tgt]
    want = np.asarray(expected[src])
    np.testing.assert_array_equal(np.asarray(a), want.astype(np.asarray(a).dtype), err_msg=tgt)


def assert_sharded_as(restored, abstract, left_out=()):
  """Every restored array has exactly the sharding its abstract leaf asked for.

  `left_out`: the paths the restore leaves out of an nnx.State (kept in the plan, no source).
  """
  got, want = flat(restored), flat(abstract)
  assert set(want) - set(got) == set(left_out), sorted(set(want) ^ set(got) ^ set(left_out))
  for path, w in want.items():
    if path in left_out:
      continue
    a = got[path]
    if isinstance(a, jax.ShapeDtypeStruct) or not jax.tree.leaves(w):
      continue  # kept as given; or no array at all (optax.MaskedNode)
    assert isinstance(a, jax.Array), path
    assert a.sharding == w.sharding, (path, a.sharding, w.sharding)
    assert a.dtype == w.dtype, (path, a.dtype, w.dtype)
    for shard in a.addressable_shards:
      assert shard.data.shape == w.sharding.shard_shape(w.shape), path


def tree_hash(directory) -> str:
  """Hash of every file name and content under a directory."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()

"""Fuzzed round trips: random models, optimizers, shardings and renames through real checkpoints.

Each example builds a random model tree (depths, names with digits and
underscores, float32/bfloat16/int8/bool leaves, 0-d shapes; Orbax saves no
size-0 array), a real
Linen `TrainState` over it with a random optax optimizer, and the same model as
a real NNX module with `nnx.Optimizer`; random shardings over the 8 CPU
devices, and a random rename of its top-level modules. Properties:

- Linen -> NNX -> Linen through real checkpoints on disk is bit-exact, every
  leaf sharded as asked;
- a plan that succeeds reads every target exactly once: each stored chunk is
  loaded once;
- a plan that raises has read nothing.

CI runs few examples; run longer with
`FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz.py`.
"""

import os
import string
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import models
import orbax_linen_nnx
from orbax_linen_nnx import LinenCompatRestore, PlanError
from orbax_linen_nnx import rename as rename_rule, transpose as transpose_rule
from helpers import ChunkLoads

EXAMPLES = int(os.environ.get('FUZZ_EXAMPLES', '6'))
DTYPES = [np.dtype('float32'), np.dtype(ml_dtypes.bfloat16), np.dtype('int8'), np.dtype('bool')]
OPTIMIZERS = {
  'adam': lambda: optax.adam(1e-3),
  'adamw_chain': lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
  'sgd_momentum': lambda: optax.sgd(1e-2, momentum=0.9),
  'lion': lambda: optax.lion(1e-4),
  'inject': lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
}

names = st.builds(
  lambda head, tail, n: head + tail + (f'_{n}' if n is not None else ''),
  st.sampled_from(string.ascii_lowercase),
  st.text('abcxyz_', max_size=3),
  st.one_of(st.none(), st.integers(0, 12)),
)
# Orbax refuses to save arrays of size 0 ('Cannot save arrays with zero size'), so no checkpoint holds one.
shapes = st.one_of(st.just(()), st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple))


def _tree(depth: int):
  leaf = st.tuples(shapes, st.sampled_from(DTYPES))
  if depth == 0:
    return st.dictionaries(names, leaf, min_size=1, max_size=3)
  return st.dictionaries(names, st.one_of(leaf, _tree(depth - 1)), min_size=1, max_size=3)


class Bag(nnx.Module):
  """A real NNX module with any structure: submodules for dicts, nnx.List for lists, nnx.Param leaves."""

  def __init__(self, tree):
    for name, v in tree.items():
      setattr(self, name, _node(v))


def _node(v):
  if isinstance(v, dict):
    return Bag(v)
  if isinstance(v, list):
    return nnx.List([_node(x) for x in v])
  return nnx.Param(v)


def _values(spec, rng):
  if isinstance(spec, dict):
    return {k: _values(v, rng) for k, v in spec.items()}
  shape, dtype = spec
  if dtype == np.bool_:
    return rng.random(shape) < 0.5
  if dtype == np.int8:
    return rng.integers(-128, 128, shape).astype(np.int8)
  return rng.normal(size=shape).astype(dtype)


def _randomize(tree, rng):
  """Every float leaf of an optimizer state random (its init is mostly zeros); counts as they are."""

  def f(a):
    a = np.asarray(a)
    return rng.normal(size=a.shape).astype(a.dtype) if a.dtype.kind == 'f' or a.dtype == ml_dtypes.bfloat16 else a

  return jax.tree.map(f, tree)


def _spec(shape, draw) -> P:
  axes, spec = {'data': 4, 'model': 2}, []
  for n in shape:
    fits = [a for a, k in axes.items() if n and n % k == 0]
    pick = draw(st.sampled_from([None] + fits))
    spec.append(pick)
    axes.pop(pick, None)
  return P(*spec)


def _shard(abstract, mesh, draw):
  def put(leaf):
    is_var = isinstance(leaf, nnx.Variable)
    v = leaf.get_raw_value() if is_var else leaf
    if not isinstance(v, jax.ShapeDtypeStruct):
      return leaf
    s = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, _spec(v.shape, draw)))
    return leaf.copy(s) if is_var else s

  return jax.tree.map(put, abstract, is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.ShapeDtypeStruct)))


block = _tree(0)  # the leaves of one layer of a stack


@settings(
  max_examples=EXAMPLES,
  deadline=None,
  suppress_health_check=list(HealthCheck),
  derandomize=True,
  phases=[Phase.explicit, Phase.generate],
)  # no shrinking: each example writes checkpoints
@given(
  spec=_tree(2),
  opt=st.sampled_from(sorted(OPTIMIZERS)),
  seed=st.integers(0, 2**16),
  rename=st.booleans(),
  break_it=st.sampled_from([None, None, 'shape', 'extra']),
  layers=st.one_of(st.none(), st.tuples(block, st.integers(1, 4), st.sampled_from(['unrolled', 'stacked']))),
  flip=st.booleans(),
  data=st.data(),
)
def test_linen_nnx_linen_round_trip(mesh, spec, opt, seed, rename, break_it, layers, flip, data):
  rng = np.random.default_rng(seed)
  params = _values(spec, rng)
  tops = sorted(params)
  rules = [rename_rule({k: f'nnx_{i}' for i, k in enumerate(tops)})] if rename else []
  names = {k: f'nnx_{i}' for i, k in enumerate(tops)} if rename else {}
  nnx_params = {names.get(k, k): v for k, v in params.items()}
  stacks = None
  if layers is not None:  # a Linen loop of identical blocks: NNX unrolled (nnx.List) or stacked at axis 0
    one, n, how = layers
    per_layer = [_values(one, rng) for _ in range(n)]
    params.update({f'blocks_{i}': b for i, b in enumerate(per_layer)})
    nnx_params['blocks'] = per_layer if how == 'unrolled' else jax.tree.map(lambda *a: np.stack(a), *per_layer)
    stacks = {'blocks': {'linen': 0, 'nnx': 0}} if how == 'stacked' else None
  two_d = [k for k, v in params.items() if not isinstance(v, dict) and np.ndim(v) == 2 and not k.startswith('blocks')]
  if flip and two_d:  # a transposed leaf, and the rule that says so (inverted on the way back)
    k = two_d[0]
    nnx_params[names.get(k, k)] = params[k].T
    rules.append(transpose_rule(names.get(k, k), (1, 0)))
  rules = rules or None
  linen = train_state.TrainState.create(apply_fn=None, params={'params': params}, tx=OPTIMIZERS[opt]())
  linen = linen.replace(opt_state=_randomize(linen.opt_state, rng), step=np.int32(seed % 1000))

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    with ocp.CheckpointManager(tmp / 'linen') as m:
      m.save(1, args=ocp.args.StandardSave(linen))
    item = tmp / 'linen' / '1' / 'default'

    def make():
      model = Bag(nnx_params)
      return {'model': model, 'optimizer': nnx.Optimizer(model, OPTIMIZERS[opt](), wrt=nnx.Param)}

    abstract = _shard(nnx.state(nnx.eval_shape(make)), mesh, data.draw)
    if break_it == 'shape':  # a target leaf of another size: the plan must raise, having read nothing
      top_leaves = [k for k, v in nnx_params.items() if isinstance(v, np.ndarray) or np.isscalar(v)]
      if top_leaves:
        leaf = abstract['model'][top_leaves[0]]
        v = leaf.get_raw_value()
        abstract['model'][top_leaves[0]] = leaf.copy(jax.ShapeDtypeStruct(v.shape + (3,), v.dtype))
      else:
        break_it = 'extra'
    if break_it == 'extra':  # a target leaf with no source
      abstract['model']['zz_extra_9'] = nnx.Param(jax.ShapeDtypeStruct((2,), np.float32))

    with ChunkLoads(item) as loads:
      if break_it:
        with pytest.raises(PlanError):
          ocp.CheckpointManager(tmp / 'linen').restore(1, args=LinenCompatRestore(abstract, rules=rules, stacks=stacks))
      else:
        restored = ocp.CheckpointManager(tmp / 'linen').restore(
          1, args=LinenCompatRestore(abstract, rules=rules, stacks=stacks)
        )
    if break_it:
      assert loads.count == 0  # only metadata was read
      return
    stored = jax.tree.leaves(ocp.PyTreeCheckpointHandler().metadata(item).tree)
    chunks = sum(int(np.prod([-(-n // c) for n, c in zip(s.shape, s.storage.chunk_shape)])) for s in stored)
    assert loads.count == chunks  # every stored chunk loaded once, for every target
    # The plan said so before reading: its cost is what the restore decoded, chunk for chunk.
    cost = orbax_linen_nnx.plan(item, abstract, rules=rules, stacks=stacks).cost.of(0)
    assert cost.chunks == loads.count, cost
    models.assert_sharded_as(restored, abstract)
    want_model = models.host_values(nnx_params)
    got = models.host_values(restored)
    for path, value in want_model.items():
      assert got[f'model/{path}'].dtype == value.dtype
      np.testing.assert_array_equal(got[f'model/{path}'], value, err_msg=path)

    with ocp.CheckpointManager(tmp / 'nnx') as m:
      m.save(1, args=ocp.args.StandardSave(restored))
    linen_abstract = _shard(jax.eval_shape(lambda: linen), mesh, data.draw)
    back = ocp.CheckpointManager(tmp / 'nnx').restore(
      1, args=LinenCompatRestore(linen_abstract, rules=rules, stacks=stacks)
    )
    models.assert_all_equal(back, linen)
    models.assert_sharded_as(back, linen_abstract)

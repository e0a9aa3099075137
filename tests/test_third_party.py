"""Model code not written here through every face: Hugging Face's Linen Llama (transformers) into Google's NNX
Llama (tunix), and flaxmodels' Linen ResNet18 into a port of it. Each through restore, 'auto', a training step,
convert then plain Orbax, compare, and LinenCompatSave read back by the Linen model's own code in a process that
never imports this package (see third_party.py)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import models
import ports
import third_party as tp
from helpers import TESTS, save
from orbax_linen_nnx import LinenCompatRestore, LinenCompatSave, PlanError, cli, compare, inspection, source


def saved(tmp_path_factory, name, variables):
  """The Linen model's variables, saved by a CheckpointManager as its users save them."""
  directory = tmp_path_factory.mktemp(name)
  save(directory, variables)
  return directory, variables


@pytest.fixture(scope='module')
def hf_run(tmp_path_factory):
  return saved(tmp_path_factory, 'hf', tp.hf_variables())


def restored(directory, make, rules, target='eval_shape'):
  """A fresh NNX model (`make(seed)`) updated from the checkpoint, restored into `make(3)`'s abstract state
  (or, with target='module', into the initialised model itself)."""
  abstract = make(3) if target == 'module' else nnx.state(nnx.eval_shape(lambda: make(3)))
  with ocp.CheckpointManager(directory) as mngr:
    got = mngr.restore(1, args=LinenCompatRestore(abstract, rules=rules))
  model = make(5)
  nnx.update(model, nnx.state(got) if isinstance(got, nnx.Module) else got)  # a module target gives a module
  return model


def logits_by_their_own_code(model: str, run_dir, step: int) -> np.ndarray:
  """The Linen model's own code (third_party.py, `model` 'hf' or 'resnet') restores `step` of `run_dir` with
  plain Orbax in a fresh process that never imports this package, and computes its logits."""
  done = subprocess.run(
    [sys.executable, f'{TESTS}/third_party.py', model, str(run_dir), str(step)],
    capture_output=True,
    text=True,
    timeout=240,
    cwd=TESTS,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out['imported_orbax_linen_nnx'] is False
  return np.array(out['logits'])


def restored_tunix(directory, rules):
  return restored(directory, tp.tunix_llama, rules)


def test_restore_into_tunix_computes_and_trains_like_hugging_face(hf_run):
  directory, variables = hf_run
  model = restored_tunix(directory, tp.llama_rules())
  ids = tp.tokens()
  # The two frameworks' code sums in other orders (float32): a tolerance from the terms summed.
  models.assert_reductions_close(tp.tunix_logits(model, ids), tp.hf_logits(variables, ids), terms=tp.LOGIT_TERMS)
  np.testing.assert_array_equal(
    model.layers[1].attn.q_proj.w.get_value(),
    variables['params']['model']['layers']['1']['self_attn']['q_proj']['kernel'].reshape(tp.D, tp.HEADS, tp.HEAD_DIM),
  )

  # One SGD step of next-token cross-entropy in each, then the losses.
  def loss(logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

  grads = jax.grad(lambda v: loss(tp.hf_logits(v, ids)))(variables)
  stepped = jax.tree.map(lambda p, g: p - 0.5 * g, variables, grads)
  nnx_grads = nnx.grad(lambda m: loss(tp.tunix_logits(m, ids)))(model)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), nnx_grads))
  models.assert_reductions_close(
    loss(tp.tunix_logits(model, ids)), loss(tp.hf_logits(stepped, ids)), terms=3 * tp.LOGIT_TERMS
  )


def test_auto_says_why_it_cannot_pair_these(hf_run):
  """Leaf names differ (`kernel` against `w`, `weight`) and attention kernels change shape: 'auto' pairs
  nothing and says so, before any read."""
  directory, _ = hf_run
  with pytest.raises(PlanError, match="rules='auto'"):
    restored_tunix(directory, 'auto')
  # The rules that do the reshapes, then 'auto' for the rest: still nothing it can pair by name or shape
  # alone (leaf names differ), and it says so rather than restoring half.
  with pytest.raises(PlanError, match="rules='auto'"):
    restored_tunix(directory, [*tp.llama_rules()[:4], 'auto'])


def test_convert_then_plain_orbax_then_compare(hf_run, tmp_path, capsys):
  directory, variables = hf_run
  (tmp_path / 'target.py').write_text(
    f'import sys\nsys.path.insert(0, {TESTS!r})\nimport third_party as tp\nfrom flax import nnx\n\n'
    'def abstract():\n  return nnx.state(nnx.eval_shape(tp.tunix_llama))\n\nRULES = tp.llama_rules()\n'
  )
  target = f'{tmp_path}/target.py:abstract'
  assert (
    cli.main(
      [
        'convert',
        str(directory),
        str(tmp_path / 'nnx'),
        '--target',
        target,
        '--rules',
        f'{tmp_path}/target.py:RULES',
        '--quiet',
      ]
    )
    == cli.EXIT_OK
  )
  # Tunix's own model, restored by plain Orbax from what convert wrote.
  model = tp.tunix_llama(seed=9)
  nnx.update(
    model, ocp.StandardCheckpointer().restore(tmp_path / 'nnx' / 'default', nnx.state(nnx.eval_shape(tp.tunix_llama)))
  )
  ids = tp.tokens()
  models.assert_reductions_close(tp.tunix_logits(model, ids), tp.hf_logits(variables, ids), terms=tp.LOGIT_TERMS)
  # compare, both ways, bit for bit.
  for a, b in ((directory, tmp_path / 'nnx'), (tmp_path / 'nnx', directory)):
    found = compare.compare(source.open_checkpoint(a), source.open_checkpoint(b), rules=tp.llama_rules())
    assert found.equal and found.compared == 21, found
  capsys.readouterr()
  assert (
    cli.main(['compare', str(directory), str(tmp_path / 'nnx'), '--rules', f'{tmp_path}/target.py:RULES'])
    == cli.EXIT_OK
  )
  assert 'MATCH' in capsys.readouterr().out


def test_linen_compat_save_of_tunix_is_read_by_hugging_face_code(hf_run, tmp_path):
  """Tunix trains; every save goes through one manager; Hugging Face's own code reads the last one."""
  directory, _ = hf_run
  model = restored_tunix(directory, tp.llama_rules())
  ids = tp.tokens(seed=1)
  with ocp.CheckpointManager(tmp_path / 'run', options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    for step in (1, 2, 3):
      grads = nnx.grad(lambda m: jnp.mean(tp.tunix_logits(m, ids) ** 2))(model)
      nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads))
      mngr.save(step, args=LinenCompatSave(model, rules=tp.llama_rules()))
    mngr.wait_until_finished()
  models.assert_reductions_close(
    logits_by_their_own_code('hf', tmp_path / 'run', 3), tp.tunix_logits(model, tp.tokens()), terms=tp.LOGIT_TERMS
  )


# ---------------------------------------------------------------- flaxmodels' ResNet18 and a port of it


@pytest.fixture(scope='module')
def resnet_run(tmp_path_factory):
  """flaxmodels' ResNet18 variables: params and batch_stats."""
  return saved(tmp_path_factory, 'resnet', tp.resnet_variables())


def restored_port(directory, rules, target='eval_shape'):
  return restored(directory, lambda seed: ports.ResNet18(tp.CLASSES, nnx.Rngs(seed)), rules, target)


def test_resnet_port_restores_computes_and_trains_like_flaxmodels(resnet_run):
  directory, variables = resnet_run
  model = restored_port(directory, ports.resnet_rules())
  # 'auto' from the initialised port (its attribute order settles conv1/conv2, bn1/bn2/downsample_bn)
  # infers the same table and restores the same bits.
  with ocp.CheckpointManager(directory) as mngr:
    found = mngr.restore(
      1, args=LinenCompatRestore(ports.ResNet18(tp.CLASSES, nnx.Rngs(3)), rules='auto', dry_run=True)
    )
  assert found.inferred_renames == ports.resnet_rules()
  models.assert_all_equal(nnx.state(restored_port(directory, 'auto', target='module')), nnx.state(model))
  # From nnx.eval_shape three alike BatchNorms in a downsampling block (bn1, bn2, downsample_bn) are no
  # numbered family: it raises, naming them and the line that settles one.
  with pytest.raises(
    PlanError,
    match=r'(?s)Fix: .*rules=\[rename\(.*BasicBlock_2/BatchNorm_0, BasicBlock_2/BatchNorm_1,'
    r' BasicBlock_2/BatchNorm_2 and block2_0/bn1, block2_0/bn2, block2_0/downsample_bn all hold ',
  ):
    restored_port(directory, 'auto')

  x = tp.images()
  model.eval()
  models.assert_reductions_close(model(x), tp.resnet_logits(variables, x), terms=tp.RESNET_TERMS)
  # One SGD step in training mode (batch statistics from the batch, running averages updated) in each.
  labels = jnp.arange(x.shape[0]) % tp.CLASSES
  xent = lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  def linen_loss(params):
    logits, updates = tp.flaxmodels_resnet().apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
    )
    return xent(logits), updates

  (loss, updates), grads = jax.value_and_grad(linen_loss, has_aux=True)(variables['params'])
  stepped = {'params': jax.tree.map(lambda p, g: p - 0.1 * g, variables['params'], grads), **updates}
  model.train()
  nnx_loss, nnx_grads = nnx.value_and_grad(lambda m: xent(m(x)))(model)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), nnx_grads))
  models.assert_reductions_close(nnx_loss, loss, terms=tp.RESNET_TERMS)
  model.eval()
  models.assert_reductions_close(model(x), tp.resnet_logits(stepped, x), terms=3 * tp.RESNET_TERMS)


def test_resnet_port_saved_as_linen_is_read_by_flaxmodels_code(resnet_run, tmp_path):
  directory, _ = resnet_run
  model = restored_port(directory, ports.resnet_rules())
  with ocp.CheckpointManager(tmp_path / 'run', options=ocp.CheckpointManagerOptions(max_to_keep=1)) as mngr:
    for step in (1, 2, 3):  # the running averages move each step
      model.train()
      model(tp.images(seed=step))
      mngr.save(step, args=LinenCompatSave(model, rules=ports.resnet_rules()))
    mngr.wait_until_finished()
  model.eval()
  models.assert_reductions_close(
    logits_by_their_own_code('resnet', tmp_path / 'run', 3), model(tp.images()), terms=tp.RESNET_TERMS
  )


def test_resnet_convert_then_plain_orbax_then_compare(resnet_run, tmp_path, capsys):
  directory, variables = resnet_run
  (tmp_path / 'target.py').write_text(
    f'import sys\nsys.path.insert(0, {TESTS!r})\nimport ports\nfrom flax import nnx\n\n'
    'def abstract():\n  return nnx.state(nnx.eval_shape(lambda: ports.ResNet18(10, nnx.Rngs(0))))\n\n'
    'RULES = ports.resnet_rules()\n'
  )
  assert (
    cli.main(
      [
        'convert',
        str(directory),
        str(tmp_path / 'nnx'),
        '--target',
        f'{tmp_path}/target.py:abstract',
        '--rules',
        f'{tmp_path}/target.py:RULES',
        '--quiet',
      ]
    )
    == cli.EXIT_OK
  )
  model = ports.ResNet18(tp.CLASSES, nnx.Rngs(9))
  nnx.update(
    model,
    ocp.StandardCheckpointer().restore(
      tmp_path / 'nnx' / 'default', nnx.state(nnx.eval_shape(lambda: ports.ResNet18(tp.CLASSES, nnx.Rngs(0))))
    ),
  )
  model.eval()
  models.assert_reductions_close(model(tp.images()), tp.resnet_logits(variables, tp.images()), terms=tp.RESNET_TERMS)
  capsys.readouterr()
  assert (
    cli.main(['compare', str(tmp_path / 'nnx'), str(directory), '--rules', f'{tmp_path}/target.py:RULES'])
    == cli.EXIT_OK
  )
  assert 'MATCH' in capsys.readouterr().out
  # inspect names no stack in either (BatchNorm vectors, per-block attributes).
  assert inspection.stacks_found(source.open_checkpoint(tmp_path / 'nnx')) == []

"""Hugging Face's Linen Llama (transformers) and Google's NNX Llama (tunix), neither written here, through every
face: restore, 'auto', a training step, convert then plain Orbax, compare, and LinenCompatSave read back by the
Hugging Face model's own code in a process that never imports this package (see third_party.py)."""

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
import third_party as tp
from helpers import TESTS, save
from orbax_linen_nnx import LinenCompatRestore, LinenCompatSave, PlanError, cli, compare, source

@pytest.fixture(scope='module')
def hf_run(tmp_path_factory):
  """A Hugging Face Flax Llama's variables, saved by a CheckpointManager as its users save them."""
  directory = tmp_path_factory.mktemp('hf')
  variables = tp.hf_variables()
  save(directory, variables)
  return directory, variables


def restored_tunix(directory, rules):
  abstract = nnx.state(nnx.eval_shape(lambda: tp.tunix_llama(seed=3)))
  with ocp.CheckpointManager(directory) as mngr:
    restored = mngr.restore(1, args=LinenCompatRestore(abstract, rules=rules))
  model = tp.tunix_llama(seed=5)
  nnx.update(model, restored)
  return model


def test_restore_into_tunix_computes_and_trains_like_hugging_face(hf_run):
  directory, variables = hf_run
  model = restored_tunix(directory, tp.llama_rules())
  ids = tp.tokens()
  # The two frameworks' code sums in other orders (float32): a tolerance from the terms summed.
  models.assert_reductions_close(tp.tunix_logits(model, ids), tp.hf_logits(variables, ids), terms=tp.LOGIT_TERMS)
  np.testing.assert_array_equal(model.layers[1].attn.q_proj.w.get_value(), variables['params']['model']['layers'][
      '1']['self_attn']['q_proj']['kernel'].reshape(tp.D, tp.HEADS, tp.HEAD_DIM))

  # One SGD step of next-token cross-entropy in each, then the losses.
  def loss(logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

  grads = jax.grad(lambda v: loss(tp.hf_logits(v, ids)))(variables)
  stepped = jax.tree.map(lambda p, g: p - 0.5 * g, variables, grads)
  nnx_grads = nnx.grad(lambda m: loss(tp.tunix_logits(m, ids)))(model)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), nnx_grads))
  models.assert_reductions_close(loss(tp.tunix_logits(model, ids)), loss(tp.hf_logits(stepped, ids)),
                                 terms=3 * tp.LOGIT_TERMS)


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
      'def abstract():\n  return nnx.state(nnx.eval_shape(tp.tunix_llama))\n\nRULES = tp.llama_rules()\n')
  target = f'{tmp_path}/target.py:abstract'
  assert cli.main(['convert', str(directory), str(tmp_path / 'nnx'), '--target', target, '--rules',
                   f'{tmp_path}/target.py:RULES', '--quiet']) == cli.EXIT_OK
  # Tunix's own model, restored by plain Orbax from what convert wrote.
  model = tp.tunix_llama(seed=9)
  nnx.update(model, ocp.StandardCheckpointer().restore(tmp_path / 'nnx' / 'default',
                                                       nnx.state(nnx.eval_shape(tp.tunix_llama))))
  ids = tp.tokens()
  models.assert_reductions_close(tp.tunix_logits(model, ids), tp.hf_logits(variables, ids), terms=tp.LOGIT_TERMS)
  # compare, both ways, bit for bit.
  for a, b in ((directory, tmp_path / 'nnx'), (tmp_path / 'nnx', directory)):
    found = compare.compare(source.open_checkpoint(a), source.open_checkpoint(b), rules=tp.llama_rules())
    assert found.equal and found.compared == 21, found
  capsys.readouterr()
  assert cli.main(['compare', str(directory), str(tmp_path / 'nnx'), '--rules', f'{tmp_path}/target.py:RULES']
                  ) == cli.EXIT_OK
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
  done = subprocess.run([sys.executable, f'{TESTS}/third_party.py', str(tmp_path / 'run'), '3'],
                        capture_output=True, text=True, timeout=240, cwd=TESTS)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out['imported_orbax_linen_nnx'] is False
  models.assert_reductions_close(np.array(out['logits']), tp.tunix_logits(model, tp.tokens()), terms=tp.LOGIT_TERMS)

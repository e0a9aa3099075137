"""Plain Linen code reading a checkpoint, as a Linen user's own tooling would: it never imports orbax_linen_nnx.

    python tests/linen_reader.py JOBS_JSON

Each job names a checkpoint step, the Linen train state to restore it as (`kind`), and how many training
steps to take after. Prints one JSON object: per job, the restored values, the losses of those steps (dropout
off, so that they compare with another framework's), and whether this package was ever imported.
"""

import json
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax.training import train_state  # noqa: E402

import models  # noqa: E402  (the tests' Linen and NNX models; imports no orbax_linen_nnx)


def abstract(kind: str, mesh):
  """The Linen train state a Linen user restores into, sharded over the mesh."""
  if kind == 'bn_drop':  # Flax's BatchNorm guide: batch_stats beside params
    state = jax.eval_shape(lambda: models.linen_bn_drop_state(optax.adam(1e-2), steps=0))
  elif kind == 'mlp_params':  # TrainState.create(params=variables['params']), as Flax's MNIST example does
    model = models.LinenMLP()
    state = jax.eval_shape(
      lambda: train_state.TrainState.create(
        apply_fn=model.apply,
        params=model.init(jax.random.key(0), np.ones((1, models.D_IN)))['params'],
        tx=optax.adam(1e-2),
      )
    )
  else:
    raise ValueError(kind)
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=models.sharding_for(x.shape, mesh, 'two_axes')), state
  )


def path(keys) -> str:
  """'opt_state/0/mu/Dense_0/kernel' for a key path."""
  return '/'.join(str(next(getattr(k, a) for a in ('key', 'name', 'idx') if hasattr(k, a))) for k in keys)


def step(kind: str, state):
  if kind == 'bn_drop':
    return models.linen_bn_drop_step(state, jax.random.key(0), False)
  return models.linen_mlp_step(state, False)


def run(job: dict, mesh) -> dict:
  target = abstract(job['kind'], mesh)
  with ocp.CheckpointManager(job['directory']) as mngr:
    state = mngr.restore(job['step'], args=ocp.args.StandardRestore(target))
  sharded = all(a.sharding == t.sharding for a, t in zip(jax.tree.leaves(state), jax.tree.leaves(target)))
  values = {path(k): np.asarray(v).tolist() for k, v in jax.tree_util.tree_leaves_with_path(state)}
  losses = []
  for _ in range(job['steps']):
    state, loss = step(job['kind'], state)
    losses.append(float(loss))
  return {'values': values, 'losses': losses, 'sharded_as_asked': sharded, 'step': int(state.step)}


def main():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))
  jobs = json.loads(sys.argv[1])
  out = {'results': [run(job, mesh) for job in jobs], 'imported_orbax_linen_nnx': 'orbax_linen_nnx' in sys.modules}
  print(json.dumps(out))


if __name__ == '__main__':
  main()

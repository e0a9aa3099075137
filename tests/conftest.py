"""Test setup: an 8-device CPU mesh, created before JAX picks its backend."""

import jax

jax.config.update('jax_num_cpu_devices', 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def mesh():
  """A (4, 2) mesh over the 8 CPU devices, axes ('data', 'model')."""
  assert len(jax.devices()) == 8, 'tests need 8 CPU devices'
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 for the whole session (see object_store.py), stopped by its PID."""
  import object_store

  emulator = object_store.GcsEmulator(str(tmp_path_factory.mktemp('gcs') / 'emulator.log'))
  yield emulator
  emulator.stop()


@pytest.fixture(scope='session')
def s3(tmp_path_factory):
  """An S3 emulator (moto) on 127.0.0.1 for the whole session, stopped by its PID."""
  import object_store

  emulator = object_store.S3Emulator(str(tmp_path_factory.mktemp('s3') / 'emulator.log'))
  yield emulator
  emulator.stop()


@pytest.fixture(params=['local', 'gs'])
def storage(request, tmp_path):
  """Where a test's checkpoints go: local disk, or a fresh directory of the GCS emulator's bucket."""
  from etils import epath

  if request.param == 'local':
    return epath.Path(tmp_path)
  return request.getfixturevalue('gcs').root(request.node.name.split('[')[0])

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

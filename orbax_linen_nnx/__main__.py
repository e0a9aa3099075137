"""`python -m orbax_linen_nnx ...`: the command line (see cli.py)."""

import sys

from orbax_linen_nnx.cli import main

sys.exit(main())

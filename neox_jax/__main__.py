"""`python -m neox_jax ...`: the same as the `neox-jax` command."""

import sys

from neox_jax.cli import main

sys.exit(main())

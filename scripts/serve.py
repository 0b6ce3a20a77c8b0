"""`neox-jax serve` from a checkout (neox_jax/cli/serve.py): python scripts/serve.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing
from neox_jax.cli import main  # noqa: E402

sys.exit(main(["serve", *sys.argv[1:]]))

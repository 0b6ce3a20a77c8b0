"""`neox-jax evaluate` from a checkout (neox_jax/cli/evaluate.py): python scripts/evaluate.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing
from neox_jax.cli import main  # noqa: E402

sys.exit(main(["evaluate", *sys.argv[1:]]))

"""`neox-jax benchmark` from a checkout (neox_jax/cli/benchmark.py): python scripts/benchmark.py NAME [args]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing
from neox_jax.cli import main  # noqa: E402

sys.exit(main(["benchmark", *sys.argv[1:]]))

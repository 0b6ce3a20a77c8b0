"""`neox-jax memory-plan` from a checkout (neox_jax/cli/memory_plan.py): python scripts/memory_plan.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing
from neox_jax.cli import main  # noqa: E402

sys.exit(main(["memory-plan", *sys.argv[1:]]))

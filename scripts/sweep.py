"""`neox-jax sweep` as a script: python scripts/sweep.py --model EleutherAI/pythia-160m --pythia-steps log ..."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neox_jax.cli import main

sys.exit(main(["sweep", *sys.argv[1:]]))

import sys

from neox_jax.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))

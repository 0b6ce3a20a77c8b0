"""`python -m convert ...` in a checkout: the same as `neox-jax convert ...` (neox_jax/cli/convert.py)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from neox_jax.cli import main as cli

    return cli(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

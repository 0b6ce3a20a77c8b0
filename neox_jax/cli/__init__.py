"""The `neox-jax` command: one subcommand per module in this package.

Each subcommand module defines
    HELP: str                                   one line for `neox-jax --help`
    add_arguments(parser) -> None               its flags (the parser's description is the module docstring)
    run(args) -> int                            the body: library calls, returns the exit code
and is named in COMMANDS below. `scripts/NAME.py` and `python -m neox_jax NAME` reach the same code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings

# subcommand -> module (one entry per line). A module is imported for its HELP line; its flags (and the heavy
# imports they need) only when that subcommand runs
COMMANDS: dict[str, str] = {
    "convert": "neox_jax.cli.convert",
    "generate": "neox_jax.cli.generate",
    "finetune": "neox_jax.cli.finetune",
    "data": "neox_jax.cli.data",
    "evaluate": "neox_jax.cli.evaluate",
    "memory-plan": "neox_jax.cli.memory_plan",
    "benchmark": "neox_jax.cli.benchmark",
    "serve": "neox_jax.cli.serve",
    "sweep": "neox_jax.cli.sweep",
    "memorization": "neox_jax.cli.memorization",
    "data-loss": "neox_jax.cli.data_loss",
}


def _module(name: str):
    return importlib.import_module(COMMANDS[name])


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is one), or None: only its flags need building."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, the other subcommands get their one-line help but not their flags (so a run does
    not import every subcommand's dependencies)."""
    from neox_jax import __version__

    p = argparse.ArgumentParser(
        prog="neox-jax",
        description="GPT-NeoX (20B and the Pythia suite) in pure JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"neox-jax {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        mod = _module(name)
        sp = sub.add_parser(
            name, help=mod.HELP, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sp.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of any error"
        )
        if only is None or only == name:
            mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def _one_line_warnings(show):
    """A warnings.showwarning that prints NeoXWarnings as one `warning: ...` line and passes the rest to `show`."""
    from neox_jax.errors import NeoXWarning

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, NeoXWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; user errors (NeoXError) and environmental faults (OSError) end as one line on stderr and
    exit 1, Ctrl-C as 130 (SIGTERM while an output is staged: 143, see neox_jax/store/staging.py)."""
    from neox_jax.errors import NeoXError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_chosen(argv) or "").parse_args(argv)  # `neox-jax --help` builds no flags
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return int(args._run(args) or 0)
    except (NeoXError, OSError) as e:  # OSError: an environmental fault (permissions, a full disk, a vanished file)
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

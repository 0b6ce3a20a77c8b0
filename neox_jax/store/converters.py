"""The one seam between the library and the converters folder `convert/` (the only code that reads PyTorch files).

`package()` gives the converters as the package `neox_jax_convert`: in a checkout, the `convert/` folder beside
neox_jax/, loaded by its path (so a worktree or a second checkout runs its own converters, not those an editable
install points at; never as `import convert`, which a user's cwd could shadow); else the installed package.
`module(name)` is one converter module (`hf`, `hub`, ...). The command line (neox_jax/cli/convert.py) and the
library (`neox_jax.load(hub_id)`, sweeps) both come through here; nothing else imports convert/.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from neox_jax.errors import NeoXError

PACKAGE = "neox_jax_convert"  # the name `convert/` is installed under: a user's convert.py cannot shadow it
# the converter modules with register(subparsers), one per `neox-jax convert` subcommand group, in --help order
COMMANDS = ("hf_command", "neox", "merge", "quantize", "verify", "peft")


def package() -> ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    folder = Path(__file__).resolve().parents[2] / "convert"
    if not (folder / "__init__.py").is_file() or not (folder / "neox_layout.py").is_file():
        try:
            return importlib.import_module(PACKAGE)
        except ModuleNotFoundError as e:
            if e.name != PACKAGE:
                raise
            raise NeoXError(
                f"the converters are not installed (no {PACKAGE} package, no {folder}); reinstall neox-jax"
            ) from None
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def module(name: str) -> ModuleType:
    """A converter module, e.g. module("hub").cached_checkpoint(repo_id, revision, dtype)."""
    package()
    return importlib.import_module(f"{PACKAGE}.{name}")

"""The server's log lines: a handler of the `neox_jax` logger's own, not logging.basicConfig.

basicConfig configures the root logger only if it has no handler yet, and importing orbax (absl) gives it one at
WARNING first, so the server's info lines (what it serves, the compile time, disconnects) never appeared."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Handler(logging.StreamHandler):
    """Marks the handler this module installs, so a second call replaces it instead of doubling every line."""


def log_to_stderr(level: str = "info", stream=None) -> logging.Handler:
    """neox_jax.* records at `level` and above go to `stream` (default stderr), once, whatever the root logger has;
    they no longer propagate to the root (absl's handler would print them a second time)."""
    logger = logging.getLogger("neox_jax")
    for h in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(h)
    handler = _Handler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return handler

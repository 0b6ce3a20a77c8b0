"""The one base class for errors a user can act on (bad input, missing file, disk full, network off).

The `neox-jax` command prints these as a single line and exits 1; anything else is a bug and keeps its traceback.
Subclasses stay ValueErrors where they were, so library callers that catch ValueError keep working."""

from __future__ import annotations


class NeoXError(ValueError):
    """A user error or an environmental fault. The message names the file / tensor / flag, what was expected and
    what was found."""


class NeoXWarning(UserWarning):
    """Something a user should know that does not stop the work (the command prints it as one `warning:` line)."""


class DataError(NeoXError):
    """A data file cannot be read, is malformed, disagrees with its index, or holds too little data for the request;
    the message names the file."""

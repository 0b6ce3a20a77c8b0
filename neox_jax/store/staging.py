"""Writing an output directory so that nothing half-written ever looks finished.

`Staging(OUT)` is a context manager around a temporary directory `OUT.tmp-XXXXXXXX` beside OUT:
  - it holds `.owner.json` (pid, host, process start time), so a later run on the same OUT removes the temporary
    directories of earlier runs whose process is gone (killed, crashed) and never one whose process still runs;
  - `commit()` renames it to OUT; if OUT appeared meanwhile (another process), that is an error, not a merge;
  - on any error it is removed; disk full (ENOSPC / EDQUOT, or TensorStore's RESOURCE_EXHAUSTED from Orbax) becomes
    one NeoXError naming OUT and the free space;
  - SIGTERM, when no one else handles it, removes it and exits with 143 (128 + SIGTERM), as SIGINT does with 130.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from neox_jax.errors import NeoXError

OWNER = ".owner.json"
DISK_FULL_MARKERS = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")


class Terminated(SystemExit):
    """SIGTERM arrived while staging: the temporary directory is removed, the process exits with 143."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot, /proc/PID/stat field 22): a pid reused by a new process has
    another. None where /proc is absent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_alive(rec: dict) -> bool:
    """Whether the process that wrote an owner record still runs (True when it cannot be told: another host)."""
    if rec.get("host") != socket.gethostname():
        return True
    pid = int(rec.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OverflowError, ValueError):
        return False
    return rec.get("start") is None or _start_time(pid) in (None, rec["start"])


def remove_stale(out: Path, log=None) -> list[Path]:
    """Removes OUT.tmp-* directories whose owning process is gone; returns them. Ones without an owner record
    (written by an older version) or with a live owner are kept and named."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    removed = []
    for tmp in sorted(out.parent.glob(f"{out.name}.tmp-*")):
        if not tmp.is_dir():
            continue
        try:
            rec = json.loads((tmp / OWNER).read_text())
        except (OSError, ValueError):
            log(f"note: {tmp} has no owner record; it is not used and can be removed")
            continue
        if owner_alive(rec):
            log(f"note: {tmp} belongs to process {rec.get('pid')} on {rec.get('host')}, still running; left alone")
            continue
        _rmtree(tmp)
        log(f"removed {tmp}: left by process {rec.get('pid')}, which is gone")
        removed.append(tmp)
    return removed


def _mb(n: int) -> str:
    return f"{n / 1e6:.3g} MB"


def is_disk_full(exc: BaseException | None) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, Exception) and any(m in str(exc) for m in DISK_FULL_MARKERS)


def _rmtree(path: Path) -> None:
    # a write that was interrupted may still have an Orbax / TensorStore thread finishing a file in it: retry briefly
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)


class _DropDiskFullLogs(logging.Filter):
    """Orbax logs a disk-full write failure with its traceback from each of its threads before raising it; the
    raised error is reported once, as one line."""

    def filter(self, record):
        return not any(m in record.getMessage() for m in DISK_FULL_MARKERS)


class Staging:
    def __init__(self, out: str | os.PathLike, overwrite: bool = False, what: str = "output"):
        self.out = Path(out).absolute()
        self.overwrite, self.what = overwrite, what
        if self.out.exists() and not overwrite:
            raise NeoXError(f"{self.out} already exists; choose another output directory or remove it")
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._old_term = None
        self._filter = _DropDiskFullLogs()

    def __enter__(self) -> Staging:  # noqa: PYI034
        if not self.out.parent.is_dir():
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise NeoXError(
                    f"{self.out.parent}: cannot create the output's parent directory ({e.strerror})"
                ) from None
        remove_stale(self.out)
        try:
            self.tmp.mkdir()
            (self.tmp / OWNER).write_text(
                json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}) + "\n"
            )
        except OSError as e:
            _rmtree(self.tmp)
            raise self._os_error(e) from None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL,
            None,
        ):
            self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        logging.getLogger("absl").addFilter(self._filter)
        self._old_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return self

    def _unraisable(self, u):
        # after a failed write, TensorStore's callbacks find Orbax's event loop closed: noise, not the error
        if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)):
            self._old_hook(u)

    def _on_term(self, signum, frame):
        raise Terminated()

    def _os_error(self, e: OSError) -> NeoXError:
        if is_disk_full(e):
            return self.disk_full(e)
        return NeoXError(f"{self.out}: cannot write the {self.what} ({e.strerror or e}: {e.filename or self.tmp})")

    def disk_full(self, exc=None) -> NeoXError:
        free = shutil.disk_usage(self.out.parent).free
        return NeoXError(
            f"{self.out}: disk full while writing the {self.what} ({_mb(free)} free on "
            f"{self.out.parent}); the partial output was removed"
        )

    def check_space(self, nbytes: int, where: str) -> None:
        """Refuses to start writing nbytes when the disk has not room for them (a clear error, before a library
        fails half-way through a file). Orbax's OCDBT store holds up to about twice an array's bytes while it
        writes (measured on tmpfs: 0.52 MB failed with 1.05 MB free; stored, it takes 0.49 MB), hence 2x + 1 MiB."""
        free, need = shutil.disk_usage(self.tmp).free, 2 * nbytes + 2**20
        if need > free:
            raise NeoXError(
                f"{self.out}: disk full: {where} needs up to {_mb(need)} while it is written, "
                f"{_mb(free)} free on {self.out.parent}; the partial output was removed"
            )

    def commit(self) -> Path:
        """Moves the finished temporary directory to OUT (replacing OUT when overwrite=True)."""
        (self.tmp / OWNER).unlink(missing_ok=True)
        appeared = NeoXError(
            f"{self.out} appeared while the {self.what} was being written (another process?); "
            f"it was left as it is and this {self.what} was not moved there"
        )
        try:
            if self.out.exists():
                if not self.overwrite:
                    raise appeared
                old = self.out.with_name(f"{self.out.name}.old-{uuid.uuid4().hex[:8]}")
                self.out.rename(old)
                self.tmp.rename(self.out)
                _rmtree(old)
            else:
                self.tmp.rename(self.out)  # fails (ENOTEMPTY) if OUT appeared since the check, unless it is empty
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise appeared from None
            raise self._os_error(e) from None
        return self.out

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.tmp.exists():  # an error, a signal, or a writer that never committed: nothing may look written
                _rmtree(self.tmp)
                if isinstance(exc, (Terminated, KeyboardInterrupt)):
                    print(
                        f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}: removed the partial "
                        f"{self.what} {self.tmp}",
                        file=sys.stderr,
                    )
            if is_disk_full(exc) and not isinstance(exc, NeoXError):
                gc.collect()  # TensorStore's leftover callbacks report now, while the hooks above filter them
                raise self.disk_full(exc) from None
        finally:
            logging.getLogger("absl").removeFilter(self._filter)
            sys.unraisablehook = self._old_hook
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
        return False

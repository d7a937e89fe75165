"""A CUDA-graph capture that kills the process is tried once, not on every start.

A library may not survive being captured from outside: an onnxruntime run under a caller's capture can end
in an abort instead of an error (onnxruntime PR #32081), which no ``except`` catches. So each capture (with
the replays that check it) runs inside ``CaptureGuard.attempt``: it leaves a marker file in the cache, locked
by this process, and removes it when the capture returns or raises. A marker that outlived its process (its
lock is free) means the process died inside a capture; it is renamed ``.crashed``, and every later process
with the same libraries and GPU skips that capture, says why, and falls back as it would after a failed one.
A newer library (another version) or another GPU tries again. Without a usable cache folder or file locks
(not POSIX) there is no guard: the capture runs as it would without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import SdTurboError

log = logging.getLogger(__name__)
FOLDER = "capture-trials"


class CaptureGuard:
    """Captures of ``what`` with these ``facts`` (library versions, GPU, driver: what a fix would change)."""

    def __init__(self, what: str, facts: dict[str, str]):
        self.what, self.facts = what, dict(facts)
        blob = json.dumps({"what": what, **self.facts}, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _folder(self) -> Path | None:
        try:
            folder = trials_folder()
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except (OSError, SdTurboError) as e:
            log.debug("no capture guard (%s)", e)
            return None

    def crashed(self) -> str | None:
        """Why this capture is not tried (a process died inside it before), or None."""
        folder = self._folder()
        if folder is None:
            return None
        record = folder / f"{self.key}.crashed"
        for marker in folder.glob(f"{self.key}.*.pending"):
            if _abandoned(marker):
                with contextlib.suppress(FileNotFoundError):  # another process may have just renamed it
                    os.replace(marker, record)
        try:
            facts = json.loads(record.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            facts = {}
        versions = ", ".join(f"{k} {v}" for k, v in sorted(self.facts.items()))
        return (
            f"capturing {self.what} killed an earlier process (pid {facts.get('pid', '?')} on "
            f"{facts.get('host', '?')}, {facts.get('started', '?')}) with {versions}; it is not tried again with "
            f"these; remove {record} to try it again"
        )

    @contextlib.contextmanager
    def attempt(self):
        """Run the block (a capture and its checks) with a marker that says so while this process lives."""
        folder = self._folder()
        fd = None
        if folder is not None:
            try:
                fd = _hold_marker(folder, self.key, {"what": self.what, **self.facts})
            except OSError as e:
                log.debug("no capture guard (%s)", e)
        try:
            yield
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    (folder / _marker_name(self.key)).unlink()
                os.close(fd)  # releases the lock


def trials_folder() -> Path:
    """Where the markers and records are: ``$SDTURBO_CAPTURE_TRIALS`` where set (gpu_check keeps them with its
    results, for its test runs too), else the cache's ``capture-trials``."""
    from .cache import cache_root

    return Path(os.environ.get("SDTURBO_CAPTURE_TRIALS") or cache_root() / FOLDER)


def crash_records() -> list[str]:
    """One line per capture that killed a process here and is skipped since (for ``sdturbo info``)."""
    try:
        records = sorted(trials_folder().glob("*.crashed"))
    except (OSError, SdTurboError):
        return []
    lines = []
    for path in records:
        try:
            facts = json.loads(path.read_text())
        except (OSError, ValueError):
            facts = {}
        what = facts.pop("what", "?")
        run = ", ".join(f"{facts.pop(k, '?')}" for k in ("pid", "host", "started"))
        versions = ", ".join(f"{k} {v}" for k, v in sorted(facts.items()))
        lines.append(f"  {what} with {versions} (killed pid {run}); remove {path} to try it again")
    return lines


def _marker_name(key: str) -> str:
    return f"{key}.{socket.gethostname()}-{os.getpid()}.pending"


def _hold_marker(folder: Path, key: str, facts: dict) -> int | None:
    """A locked marker under its final name (locked before it is renamed there, so no other process can see
    it unlocked while this one lives); its descriptor, to close when done. None where there are no locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    tmp = folder / f".{_marker_name(key)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {**facts, "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%F %T %Z")}
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        os.replace(tmp, folder / _marker_name(key))
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


def _abandoned(marker: Path) -> bool:
    """Whether no live process holds ``marker``'s lock (its process died inside the capture)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:  # gone: its process finished
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its process is inside the capture now (or locks do not work here: assume so)
        return False
    else:
        return marker.exists()  # not removed by its process between the open and the lock
    finally:
        os.close(fd)

"""A CUDA-graph capture that kills the process is tried once, not on every start.

A library may not survive being captured from outside: an onnxruntime run under a caller's capture can end
in an abort instead of an error (onnxruntime PR #32081), which no ``except`` catches. So each capture (with
the replays that check it) runs inside ``CaptureGuard.attempt``: it leaves a marker file in the cache, named
for this attempt alone and locked by this process, and removes it when the capture returns or raises. A
marker of this host that outlived its process (its lock is free) means the process died inside a capture:
crashed, or killed from outside in that moment, which no one can tell apart afterwards. It becomes a
``.crashed`` record, and every later process with the same facts (model, settings, libraries, GPU) skips that
capture, says why, and falls back as it would after a failed one. Other facts (a newer library, another GPU)
try again. The guard never fails a request: without a usable folder or file locks (not POSIX) there is none,
and the capture runs as it would without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
FOLDER = "capture-trials"


def trials_folder() -> Path:
    """Where the markers and records are: ``$SDTURBO_CAPTURE_TRIALS`` where set (gpu_check keeps them with its
    results), else the cache's ``capture-trials``."""
    from .cache import cache_root

    return Path(os.environ.get("SDTURBO_CAPTURE_TRIALS") or cache_root() / FOLDER)


class CaptureGuard:
    """Captures of ``what`` with these ``facts`` (what a fix would change: versions, GPU, model, settings)."""

    def __init__(self, what: str, facts: dict[str, str]):
        self.what, self.facts = what, {k: str(v) for k, v in facts.items()}
        blob = json.dumps({"what": what, **self.facts}, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _folder(self) -> Path | None:
        try:
            folder = trials_folder()
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except Exception as e:  # no usable folder (read-only, no home): no guard
            log.debug("no capture guard (%s)", e)
            return None

    def crashed(self) -> str | None:
        """Why this capture is not tried (a process died inside it before), or None. Never raises."""
        try:
            return self._crashed()
        except Exception as e:
            log.debug("capture guard: cannot read its records (%s)", e)
            return None

    def _crashed(self) -> str | None:
        folder = self._folder()
        if folder is None:
            return None
        record = folder / f"{self.key}.crashed"
        facts = None
        for marker in folder.glob(f"{self.key}.{_host()}-*.pending"):  # this host's only: locks may be local
            if _abandoned(marker):
                facts = _read(marker)
                try:
                    os.replace(marker, record)
                except FileNotFoundError:  # another process has just recorded it
                    pass
                except OSError as e:  # a folder this user may not change: the marker says it all the same
                    log.debug("capture guard: cannot record %s (%s)", marker, e)
                    return self._message(facts, marker)
        for tmp in folder.glob(f".{self.key}.{_host()}-*.pending.tmp"):  # died before its marker was in place
            if _abandoned(tmp, identity=False):
                tmp.unlink(missing_ok=True)
        if facts is None and not record.exists():
            return None
        return self._message(_read(record) if facts is None else facts, record)

    def _message(self, facts: dict, record: Path) -> str:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(self.facts.items()))
        return (
            f"a process died while capturing {self.what} (crashed, or was killed in that moment: pid "
            f"{facts.get('pid', '?')} on {facts.get('host', '?')}, {facts.get('started', '?')}) with {versions}; it "
            f"is not tried again with these; remove {record} to try it again"
        )

    @contextlib.contextmanager
    def attempt(self):
        """Run the block (a capture and its checks) with a marker that says so while this process lives. Only
        the block's own exceptions come out of it."""
        folder, held = self._folder(), None
        if folder is not None:
            try:
                held = _hold_marker(folder, self.key, {"what": self.what, **self.facts})
            except Exception as e:
                log.debug("no capture guard (%s)", e)
        try:
            yield
        finally:
            if held is not None:
                fd, marker = held
                with contextlib.suppress(OSError):
                    marker.unlink()
                os.close(fd)  # releases the lock


def crash_records() -> list[str]:
    """One line per capture that killed a process here and is skipped since (for ``sdturbo info``)."""
    try:
        records = sorted(trials_folder().glob("*.crashed"))
    except Exception:
        return []
    lines = []
    for path in records:
        facts = _read(path)
        what = facts.pop("what", "?")
        run = ", ".join(f"{facts.pop(k, '?')}" for k in ("pid", "host", "started"))
        versions = ", ".join(f"{k} {v}" for k, v in sorted(facts.items()))
        lines.append(f"  {what} with {versions} (died: pid {run}); remove {path} to try it again")
    return lines


def _host() -> str:
    return socket.gethostname().replace("/", "_")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _hold_marker(folder: Path, key: str, facts: dict) -> tuple[int, Path] | None:
    """A marker for this attempt alone, locked before it is renamed into place (no other process can see it
    unlocked while this one lives): its descriptor, to close when done, and its path. None without locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    name = f"{key}.{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.pending"
    tmp, marker = folder / f".{name}.tmp", folder / name
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {**facts, "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%F %T %Z")}
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        os.replace(tmp, marker)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd, marker


def _abandoned(marker: Path, identity: bool = True) -> bool:
    """Whether no live process holds ``marker``'s lock (its process died inside the capture). ``identity``:
    and the file locked is still the one at that path (not one removed meanwhile)."""
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
        if not identity:
            return True
        try:
            now = os.stat(marker)
        except FileNotFoundError:  # removed by its process between the open and the lock
            return False
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
    finally:
        os.close(fd)

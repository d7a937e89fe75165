"""Writing folders that other processes read: atomic files, an atomic folder swap, one writer at a time.

Every cache and bundle writer follows the same rules: build under a temporary name, then rename into
place; hold the folder's lock (``locked``) while checking and changing it, so concurrent runs wait for
each other instead of racing; and, holding it, remove what killed runs left (``remove_leftovers``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .errors import InputError, SdTurboError

log = logging.getLogger(__name__)


def make_shareable(path: Path) -> None:
    """Give a folder made by mkdtemp (0700) or a file made private by a library the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (where the folders still missing would be made)."""
    while not path.exists():
        path = path.parent
    return path


def human_size(n: float) -> str:
    """``n`` bytes as people read them: 1.2 GB, 5.5 MB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def folder_bytes(folder: Path) -> int:
    """The size of the files under ``folder`` (0 when there is none)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def check_free_space(folder: Path, need: int, doing: str, why: str, advice: str) -> None:
    """Refuse, before the work starts, what the free space under ``folder`` cannot hold: an InputError saying
    ``doing`` needs about ``need`` bytes (``why``: what they are) and how much is free. A file system that
    reports no size at all (some network mounts) is not judged."""
    usage = shutil.disk_usage(nearest_existing(folder))
    if usage.total and usage.free < need:
        raise InputError(
            f"{doing} needs about {human_size(need)} free in {folder}: {why}; {human_size(usage.free)} is free "
            f"there. {advice}"
        )


@contextlib.contextmanager
def naming_failures(path: Path):
    """An OSError raised in the block without a path (``write()`` on a full disk says only "[Errno 28] No space
    left on device") is raised again naming ``path``, where it was writing, so the user knows which disk to free."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def temp_prefix(prefix: str) -> str:
    """``prefix`` and this process's id, for a temporary name beside what it will replace: ``remove_leftovers``
    then removes it only once its writer is gone."""
    return f"{prefix}@{os.getpid()}@"


def _writer_alive(name: str) -> bool:
    """Whether the process that made the temporary ``name`` (``temp_prefix``) still runs; False for a name
    without one."""
    found = re.search(r"@(\d+)@", name)
    if found is None:
        return False
    try:
        os.kill(int(found[1]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # (another user's process: alive)
        return True
    return True


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(f".{path.name}."))
    try:
        with naming_failures(path), os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        make_shareable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lock_file(target: Path) -> Path:
    """The lock of ``target``: under the cache root (not beside the target, so that a user's folders get no
    extra files), named by the target's absolute path. Lock files are never removed: removing one that
    another process waits on would let a third take it at the same time."""
    from .cache import cache_root

    key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:32]
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.lock"


@contextlib.contextmanager
def locked(target: Path, what: str):
    """Hold the lock of ``target`` while the block runs; other processes wait, and are told what they wait
    for. Where locks are not available (no usable cache root, a file system without flock) the block runs
    unlocked, as it would have without this."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(_lock_file(target), os.O_RDWR | os.O_CREAT, 0o666)
    except (OSError, SdTurboError) as e:
        log.debug("no lock for %s (%s)", target, e)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting: another process %s %s", what, target)
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("waited %.1f s for %s", time.monotonic() - start, target)
        except OSError as e:  # e.g. ENOLCK on some network file systems
            log.debug("no lock for %s (%s)", target, e)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(folder: Path, pattern: str) -> None:
    """Remove ``pattern`` matches in ``folder``: temporary files of killed runs. Call holding the lock that
    every writer of these names holds. A name whose writer still runs is kept: a run with another cache (its
    locks are under its cache root) may be writing it."""
    for path in folder.glob(pattern):
        if _writer_alive(path.name):
            log.debug("keeping %s: the process writing it still runs", path)
            continue
        log.info("removing %s, left by an interrupted run", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: Path, dest: Path) -> None:
    """Put the folder ``new`` at ``dest``, replacing the folder there. Readers of ``dest`` see the old folder
    or the new one at every moment (an atomic exchange, then the old one is removed). Where the exchange is
    not available, two renames leave ``dest`` absent for a moment."""
    if not dest.exists():
        os.replace(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
        return
    trash = dest.with_name(temp_prefix(f".{dest.name}.old-"))
    os.replace(dest, trash)
    os.replace(new, dest)
    shutil.rmtree(trash, ignore_errors=True)

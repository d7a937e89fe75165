"""Content checks at the price of one hash per change: sha256 once, then a stamp.

Every file we load from a bundle or a cache has a recorded sha256 (the manifest's, or the cache record's).
Hashing gigabytes on every load would cost seconds of cold start, so a file that hashed right once gets a
*stamp*: its device, inode, size, mtime and ctime, kept under the cache root. The next load compares the
stamp with ``stat()`` and hashes again only if any of those changed. ctime cannot be set back by a user
(``touch -d`` sets mtime only), so a file written in place, even at the same size and with its mtime
restored, is hashed again.

    <cache root>/verified/<key>.json    key: the recorded sha256 and the files' absolute paths

``SDTURBO_VERIFY=size`` skips the hashing and checks sizes only: for deployments whose bundle sits on a
read-only image and whose cache does not persist, where every start would hash gigabytes again (about 1.3 s
per GB on a 2-core machine, 0.8 s from the page cache). The risk is the one this module exists to remove: a
file damaged at the same size is used. The default, ``sha256``, is the safe choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .errors import InputError, IntegrityError, SdTurboError
from .files import atomic_write

log = logging.getLogger(__name__)


def file_sha256(*paths: Path) -> str:
    """sha256 of the files' bytes, one after the other."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def stat_stamp(paths: list[Path]) -> list[list[int]]:
    """What a change to any of ``paths`` changes: device, inode, size, mtime and ctime of each."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _stamp_file(paths: list[Path], sha256: str) -> Path | None:
    from .cache import cache_root

    key = hashlib.sha256("\0".join([sha256, *(str(p.resolve()) for p in paths)]).encode()).hexdigest()
    try:
        return cache_root() / "verified" / f"{key[:32]}.json"
    except SdTurboError:  # a bad cache root is reported where the cache is used; here it only costs hashing
        return None


def is_stamped(paths: list[Path], sha256: str) -> bool:
    """True when ``paths`` hashed to ``sha256`` before and have not changed since."""
    stamp = _stamp_file(paths, sha256)
    try:
        return stamp is not None and json.loads(stamp.read_text()) == {"sha256": sha256, "files": stat_stamp(paths)}
    except (OSError, ValueError):
        return False


def stamp(paths: list[Path], sha256: str, stats: list[list[int]] | None = None) -> None:
    """Record that ``paths`` (as they are now, or as ``stats`` says) hash to ``sha256``. Best effort: without a
    writable cache root, later loads hash again."""
    stamp_path = _stamp_file(paths, sha256)
    if stamp_path is None:
        return
    try:
        stamp_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(stamp_path, json.dumps({"sha256": sha256, "files": stats or stat_stamp(paths)}))
    except OSError as e:
        log.debug("cannot keep the verification stamp of %s (%s); it is hashed again next time", paths[0], e)


def hashing_on() -> bool:
    """False when ``SDTURBO_VERIFY=size`` says to trust files of the right size (see the module's notes)."""
    mode = os.environ.get("SDTURBO_VERIFY", "sha256")
    if mode not in ("sha256", "size"):
        raise InputError(f"SDTURBO_VERIFY={mode!r} is not allowed; use sha256 (the default) or size")
    return mode == "sha256"


def verify(paths: list[Path], sha256: str, what: str, *, rehash: bool = False, digest=None) -> bool:
    """Raise IntegrityError unless the bytes of ``paths`` hash to ``sha256`` (by ``digest(*paths)``, default
    ``file_sha256``). Hashes only files changed since they last verified (unless ``rehash``). Returns True when it
    hashed."""
    paths = [Path(p) for p in paths]
    if not rehash and not hashing_on():
        return False
    if not rehash and is_stamped(paths, sha256):
        return False
    before = stat_stamp(paths)
    start = time.perf_counter()
    got = (digest or file_sha256)(*paths)
    if got != sha256:
        raise IntegrityError(
            f"{what} ({paths[0]}) does not match its recorded sha256 (it hashes to {got[:16]}..., the record says "
            f"{sha256[:16]}...): the file was changed or damaged"
        )
    seconds = time.perf_counter() - start
    size = sum(s[2] for s in before)
    log.debug("verified %s: %.2f GB in %.2f s", what, size / 1e9, seconds)
    if stat_stamp(paths) == before:  # not written while we read it
        stamp(paths, sha256, before)
    return True


def write_checked(path: Path, data: bytes) -> None:
    """Write a cache file with its sha256 beside it (``<name>.sha256``), for ``read_checked``."""
    atomic_write(path, data)
    atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest())


def read_checked(path: Path, what: str) -> bytes | None:
    """The bytes of a cache file written by ``write_checked``; None (and the file removed, with a warning)
    when it does not match its sha256 or has none, so that it is made again instead of used."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    sidecar = path.with_name(path.name + ".sha256")
    try:
        ok = sidecar.read_text().strip() == hashlib.sha256(data).hexdigest()
    except OSError:
        ok = False
    if not ok:
        log.warning("%s %s does not match its checksum; ignoring it (it is made again)", what, path)
        path.unlink(missing_ok=True)
    return data if ok else None

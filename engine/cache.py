"""Where models and bundles are cached: ``$SDTURBO_CACHE``, else the user's cache directory."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root() -> Path:
    env = os.environ.get("SDTURBO_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError as e:  # no $HOME, and a user id without a passwd entry (a container's --user)
            from .errors import InputError

            raise InputError(f"cannot find a cache folder ({e}); set SDTURBO_CACHE to a writable folder") from e
    return Path(base) / "sdturbo"


def cache_folder(path: Path) -> Path:
    """``path``, a folder under the cache root, made if missing and checked writable before anything is written
    there: a cache root that is a file or read-only gets one line naming SDTURBO_CACHE."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(path, os.W_OK | os.X_OK) else "not writable"
    except OSError as e:
        problem = e.strerror or str(e)
    if problem:
        from .errors import InputError

        env = os.environ.get("SDTURBO_CACHE")
        fix = f"SDTURBO_CACHE={env} must name a writable folder" if env else "set SDTURBO_CACHE to a writable folder"
        raise InputError(f"cannot use the cache folder {path} ({problem}); {fix}")
    return path


def bundle_dir_for(model: str) -> Path:
    """The cache folder of the bundle exported from ``model`` (a hub id, folder or random:<name>): one per
    model, however a local folder is spelled (``mdl``, ``./mdl``, its absolute path: named after the folder)."""
    local = Path(model).expanduser()
    key = str(local.resolve()) if local.exists() else model
    name = Path(key).name if local.exists() else model
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[-60:] or "model"
    return cache_root() / "bundles" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def folder_stamp(folder: Path, files: list[Path] | None = None) -> str:
    """A fingerprint of a folder's files (names, sizes, mtimes): cheap enough for every run, and different after
    any of them is replaced or rewritten. ``files``: those (in this order; one missing counts as such; a Hugging
    Face cache blob by its content's name in place of its mtime), else every file in the folder, hidden ones left
    out."""
    named = files is not None
    if files is None:
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    entries = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        try:
            st = path.stat()
        except FileNotFoundError:
            entries.append(f"{rel}\0missing")
            continue
        blob = hub_blob(path) if named else None
        entries.append(f"{rel}\0{st.st_size}\0{blob or st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def hub_blob(path: Path) -> str | None:
    """The name of the Hugging Face cache blob ``path`` links to (``models--org--name/blobs/<hash of its content>``,
    as a Hub snapshot's files do), or None: a copy or restore that changes its mtime does not change it."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and target.parent.parent.name.startswith("models--"):
        return f"blob:{target.name}"
    return None


def random_model_folder(name: str) -> Path:
    """Where ``random:<name>`` is built once, as an ordinary diffusers folder."""
    return cache_root() / "models" / f"random-{name}"


def local_model_folder(model: str) -> Path | None:
    """The folder ``model`` names on this machine (a local folder, or a random model already built), else None."""
    if model.startswith("random:"):
        folder = random_model_folder(model.removeprefix("random:"))
    else:
        folder = Path(model).expanduser()
    return folder if folder.is_dir() else None


def check_model_name(model) -> None:
    """An empty model name is refused: ``--model "$UNSET"`` took the default model (a download of gigabytes), or
    the current folder."""
    if not isinstance(model, str) or not model.strip():
        from .errors import InputError

        raise InputError(
            f"model {model!r} is empty; give a Hub id like 'stabilityai/sd-turbo', a diffusers folder, or "
            f"random:sd-turbo / random:tiny"
        )


def ensure_bundle(model: str, precision: str, tiny_vae: bool = False) -> Path:
    """The cached bundle of ``model`` holding ``precision`` (and with ``tiny_vae``, a tiny autoencoder: the
    model's own TAESD, added when missing); exported once (needs the export extra).

    The cache follows the model's content: a local model folder whose files changed since the export, or a
    cached bundle that fails its checks (a damaged file), is exported again, with a warning."""
    from .bundle import MANIFEST, Bundle
    from .errors import BundleError

    check_model_name(model)
    path = bundle_dir_for(model)
    force = False
    if (path / MANIFEST).is_file():
        try:
            bundle = Bundle(path)
            bundle.check_files()  # (export completes only a whole bundle)
            folder = local_model_folder(model)
            if folder is not None and not _unchanged_since(bundle.manifest["model"], folder):
                _say_changed(model, bundle.precisions, precision)
                force = True
            elif precision in bundle.precisions and (bundle.tiny_vae is not None or not tiny_vae):
                for name in bundle.component_names:
                    bundle.component(precision, name)
                bundle.prompt_tokenizers()
                return path
        except BundleError as e:
            log.warning("the cached bundle of %s is damaged (%s); exporting it again", model, e)
            force = True
    cache_folder(path.parent)  # a cache root that is a file or read-only: one line, before the slow imports
    try:
        from ..export.bundle_writer import export_bundle
    except ImportError as e:
        from .errors import export_extra_missing

        raise export_extra_missing(f"exporting {model!r}", e, "; or pass --bundle with an exported bundle") from e
    from .errors import ModelChanged

    tiny = "auto" if tiny_vae else None
    try:
        return export_bundle(model, path, precisions=(precision,), force=force, tiny_vae=tiny)
    except ModelChanged:  # a hub id's files changed (a new revision) since the bundle's other precisions
        if force:
            raise
        _say_changed(model, Bundle(path).precisions, precision)
        return export_bundle(model, path, precisions=(precision,), force=True, tiny_vae=tiny)


def _say_changed(model: str, had: tuple[str, ...], precision: str) -> None:
    """The warning of a cached bundle exported again: in ``precision``; those it also had, when next asked for."""
    others = [p for p in had if p != precision]
    later = f" (its {', '.join(others)} graphs are exported again when next asked for)" if others else ""
    log.warning("%s changed since its cached bundle was exported; exporting it again in %s%s", model, precision, later)


def _unchanged_since(model: dict, folder: Path) -> bool:
    """Whether the model folder is as it was when a bundle's manifest ``model`` entry was written (its
    source_stamp, or the files' source_sha256 where the stamp differs)."""
    from ..export.models import unchanged_since  # (torch-free: file names, stat, hashes)

    return unchanged_since(model.get("source_stamp"), folder, model.get("source_sha256"))

"""Where models and bundles are cached: ``$SDTURBO_CACHE``, else the user's cache directory."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("SDTURBO_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdturbo"


def bundle_dir_for(model: str) -> Path:
    """The cache folder of the bundle exported from ``model`` (a hub id, folder or random:<name>)."""
    key = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[-60:] or "model"
    return cache_root() / "bundles" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_bundle(model: str, precision: str) -> Path:
    """The cached bundle of ``model`` holding ``precision``; exported once (needs the export extra)."""
    from .bundle import MANIFEST, Bundle

    path = bundle_dir_for(model)
    if (path / MANIFEST).is_file() and precision in Bundle(path).precisions:
        return path
    try:
        from ..export.bundle_writer import export_bundle
    except ImportError as e:
        from .errors import BackendError

        raise BackendError(
            f"exporting {model!r} needs PyTorch and diffusers ({e.name} is missing): "
            f"pip install 'sdturbo[export]', or pass --bundle with an exported bundle"
        ) from e
    return export_bundle(model, path, precisions=(precision,))

"""Write a bundle: ONNX per component and precision, tokenizer.json, manifest.json; atomically.

A new bundle is written under a temporary sibling folder and renamed into place when complete. Adding a
precision to an existing bundle writes ``onnx/<precision>`` under a temporary name, renames it in, and
rewrites the manifest last (the manifest is the commit point: see engine/bundle.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from ..engine.bundle import MANIFEST, SCHEMA_VERSION, Bundle
from ..engine.errors import BundleError, InputError
from ..engine.files import atomic_write, locked, make_shareable, remove_leftovers, replace_dir
from ..engine.integrity import file_sha256, stamp
from ..engine.spec import DTYPES, component_specs, component_specs_xl
from .models import LoadedModel, load_model
from .onnx_export import export_component
from .rss import PeakRss

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")  # export order matters: fp16 converts the loaded modules in place


EXPORT_TOOLS = ("sdturbo", "torch", "diffusers", "transformers", "onnx", "onnx-graphsurgeon", "tokenizers")


def tool_versions(dists: tuple[str, ...] = EXPORT_TOOLS) -> dict[str, str]:
    """Python's version and each installed distribution's (missing ones are left out)."""
    out = {"python": platform.python_version()}
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def export_bundle(
    model: str,
    out: str | os.PathLike,
    precisions=("fp32", "fp16"),
    max_batch: int = 16,
    min_size: int = 64,
    max_size: int = 1024,
    force: bool = False,
) -> Path:
    """Export ``model`` into the bundle folder ``out`` (created, or completed with missing precisions).

    ``force`` replaces the bundle at ``out`` (never a folder that is not a bundle). One process writes a
    bundle at a time: others wait for it, then use or complete what it wrote. Readers see the old bundle
    or the new one at every moment."""
    out = Path(out)
    precisions = _check_args(precisions, max_batch, min_size, max_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out, "is exporting"):
        remove_leftovers(out.parent, f".{out.name}.tmp-*")
        remove_leftovers(out.parent, f".{out.name}.old-*")
        existing = _existing(out, force)
        todo = [p for p in precisions if existing is None or p not in existing.precisions]
        if not todo:
            log.info("bundle %s already has %s", out, ", ".join(precisions))
            return out
        lm = load_model(model, half="fp32" not in todo)
        if existing is not None:
            _check_same_model(existing, lm, out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        make_shareable(tmp)
        try:
            components = _write_onnx(lm, tmp, [p for p in PRECISIONS if p in todo])
            if existing is None:
                manifest = _manifest(lm, tmp, max_batch, min_size, max_size)
                manifest["components"] = components
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
                if force:
                    replace_dir(tmp, out)  # out is absent, an empty folder or a bundle
                else:
                    _publish(tmp, out)
            else:
                for p in todo:
                    dest = out / "onnx" / p
                    if dest.exists():  # left by an interrupted run: not in the manifest, so not in use
                        shutil.rmtree(dest)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp / "onnx" / p, dest)
                manifest = dict(existing.manifest)
                manifest["components"] = {**manifest["components"], **components}
                atomic_write(out / MANIFEST, json.dumps(manifest, indent=2))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _stamp_written(Bundle(out), todo)
    log.info("bundle ready: %s", out)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the new bundle into place (``out`` is absent or an empty folder). A bundle put there meanwhile by
    a writer that does not take the lock (an older sdturbo) is kept: it is the same model."""
    try:
        os.replace(tmp, out)
    except OSError as e:
        if not (out / MANIFEST).is_file():
            raise BundleError(
                f"--out {out} appeared during the export and is not a bundle; choose another --out"
            ) from e
        log.info("another process exported %s first; using that one", out)


def _check_same_model(existing: Bundle, lm: LoadedModel, out: Path) -> None:
    """A precision is added only from the model the bundle was exported from, as it was then."""
    if existing.config_hash != lm.config_hash():
        raise BundleError(
            f"bundle {out} was exported from another model ({existing.model_id}); "
            f"use another --out or --force to replace it"
        )
    recorded = existing.manifest["model"].get("source_stamp")
    if recorded is not None and recorded != lm.source_stamp():
        raise BundleError(
            f"bundle {out} was exported from {existing.model_id} before its files changed; a precision added now "
            f"would not match the others: use --force to export it again, or another --out"
        )


def _stamp_written(bundle: Bundle, precisions: list[str]) -> None:
    """The files just written hashed to their recorded sha256 as they were written: say so, so that the first
    load does not hash them again (integrity.py)."""
    for precision in precisions:
        for comp in bundle.components[precision].values():
            stamp([comp.onnx] + ([comp.data] if comp.data else []), comp.sha256)
    for path, sha in bundle.tokenizer_sha256.items():
        if sha is not None:
            stamp([path], sha)


def _check_args(precisions, max_batch, min_size, max_size) -> tuple[str, ...]:
    precisions = tuple(precisions)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise InputError(f"precision {bad or precisions!r} is not allowed; use one or more of {PRECISIONS}")
    if not 1 <= max_batch <= 256:
        raise InputError(f"max_batch={max_batch} is not allowed; use 1 to 256")
    if min_size % 8 or max_size % 8 or not 8 <= min_size <= max_size <= 4096:
        raise InputError(f"size range {min_size}-{max_size} is not allowed; use multiples of 8 within 8-4096")
    return precisions


def _existing(out: Path, force: bool) -> Bundle | None:
    """The bundle at ``out`` to complete; None to write a new one (nothing there, an empty folder, or a bundle
    to replace with ``force``). Anything else at ``out`` is the user's: refused, with or without ``force``."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BundleError(f"--out {out} is a file, not a bundle folder; choose another --out")
    if not (out / MANIFEST).is_file():
        if not any(out.iterdir()):
            return None
        raise BundleError(
            f"--out {out} is a folder that is not a bundle (it has no {MANIFEST}); it is left as it is "
            f"(--force replaces bundles only): choose another --out, or empty that folder"
        )
    return None if force else Bundle(out)


def specs_for(lm: LoadedModel) -> dict:
    """The component contracts of ``lm``'s family, sized from its configs."""
    te, channels = lm.text_encoder.config, lm.vae.config.latent_channels
    if lm.family == "sdxl-turbo":
        te2 = lm.text_encoder_2.config
        return component_specs_xl(
            te.max_position_embeddings, te.hidden_size, te2.hidden_size, te2.projection_dim, channels
        )
    return component_specs(te.max_position_embeddings, te.hidden_size, channels)


def _write_onnx(lm: LoadedModel, root: Path, precisions: list[str]) -> dict:
    specs = specs_for(lm)
    components: dict = {}
    total = len(precisions) * len(specs)
    done = 0
    for precision in precisions:
        if precision == "fp16":  # the SDXL VAE stays fp32: it overflows in fp16 (component_specs_xl)
            modules = [lm.text_encoder, lm.unet, *([lm.text_encoder_2] if lm.text_encoder_2 else [])]
            for module in modules + ([] if lm.family == "sdxl-turbo" else [lm.vae]):
                module.half()
        folder = root / "onnx" / precision
        folder.mkdir(parents=True, exist_ok=True)
        for name in specs:
            done += 1
            log.info("[%d/%d] exporting %s (%s)", done, total, name, precision)
            spec = specs[name].resolve(precision)
            path = folder / f"{name}.onnx"
            start, rss = time.perf_counter(), PeakRss()
            data = export_component(lm, spec, path)
            seconds, peak = time.perf_counter() - start, rss.peak_mb()
            files = [path] + ([data] if data else [])
            for f in files:
                make_shareable(f)
            components.setdefault(precision, {})[name] = {
                "onnx": f"onnx/{precision}/{path.name}",
                "data": f"onnx/{precision}/{data.name}" if data else None,
                "sha256": file_sha256(*files),
                "bytes": sum(f.stat().st_size for f in files),
                "inputs": [t.to_json() for t in spec.inputs],
                "outputs": [t.to_json() for t in spec.outputs],
                "dtype": DTYPES[precision],
                "export_seconds": round(seconds, 2),
                "export_peak_rss_mb": peak,
            }
            log.info("    %s (%s): %.1f s, peak RSS %s MB", name, precision, seconds, peak)
    return components


def _manifest(lm: LoadedModel, root: Path, max_batch: int, min_size: int, max_size: int) -> dict:
    tok = lm.tokenizer
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    te, vae = lm.text_encoder.config, lm.vae.config
    extra = {}
    if lm.tokenizer_2 is not None:
        lm.tokenizer_2.backend_tokenizer.save(str(root / "tokenizer_2.json"))
        t2 = lm.tokenizer_2
        extra["tokenizer_2"] = {
            "file": "tokenizer_2.json",
            "max_length": int(te.max_position_embeddings),
            "pad_id": int(t2.pad_token_id),
            "pad_token": str(t2.pad_token),
            "sha256": file_sha256(root / "tokenizer_2.json"),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "id": lm.model_id,
            "config_hash": lm.config_hash(),
            "family": lm.family,
            "source_stamp": lm.source_stamp(),
        },
        "scheduler": {k: v for k, v in lm.scheduler_config.items() if k == "_class_name" or not k.startswith("_")},
        "vae": {
            "scaling_factor": float(vae.scaling_factor),
            "latent_channels": int(vae.latent_channels),
            "scale_factor": 2 ** (len(vae.block_out_channels) - 1),
        },
        "text": {"hidden_size": int(te.hidden_size), "vocab_size": int(te.vocab_size)},
        "tokenizer": {
            "file": "tokenizer.json",
            "max_length": int(te.max_position_embeddings),
            "pad_id": int(tok.pad_token_id),
            "pad_token": str(tok.pad_token),
            "sha256": file_sha256(root / "tokenizer.json"),
        },
        **extra,
        "limits": {"max_batch": max_batch, "min_size": min_size, "max_size": max_size},
        "components": {},
        "tools": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

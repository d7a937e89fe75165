"""ONNX Runtime transformer-optimized graphs in a bundle: where they live, and whether one may be used.

``sdturbo build BUNDLE --ort-optimize`` (export/ort_optimize.py) writes them; the ONNX Runtime backend loads
one in place of the bundle's plain graph when it is valid for this onnxruntime and provider.

    ort-optimized/<onnxruntime version>-<provider>/<precision>/<component>.onnx (+ .onnx.data, + .json record)

An optimized graph is keyed by what it was made from and for: the sha256 of the bundle's ONNX it was
optimized from (the fp32 graph, whose patterns ONNX Runtime's fusions match) and of the graph it stands in
for (the fp16 one: same inputs and outputs), the onnxruntime version (its fused ops are contrib ops whose
kernels change between versions) and the provider (``cuda``: every fusion ONNX Runtime's own Stable
Diffusion pipeline makes, several of which have CUDA kernels only; ``cpu``: only fusions with CPU kernels).
The optimizer's output does not depend on the machine, so no device is in the key. The record is written
last and holds the sha256 of the optimized files: one that is stale (the bundle changed) or damaged is
refused with a warning and the plain graph runs instead, never the optimized one (hashed once per change,
see engine/integrity.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..bundle import Bundle
from ..errors import BundleError, IntegrityError
from ..files import locked
from ..integrity import verify
from .ort_cache import graph_files

log = logging.getLogger(__name__)

FOLDER = "ort-optimized"
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
SOURCE_PRECISION = "fp32"
RECIPE = 1  # what export/ort_optimize.py makes (fusions, fp32 nodes): bump it there to rebuild older graphs
# components whose recipe moved on alone (a bump for all would rebuild every UNet for a text encoder change):
# 2, attention fused into MultiHeadAttention where onnxruntime's optimizer did not (export/attention.py)
RECIPES = {name: 2 for name in ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")}


def recipe(name: str) -> int:
    """The optimizer recipe this sdturbo makes for component ``name``."""
    return RECIPES.get(name, RECIPE)


def provider_key(providers) -> str:
    """The key of an ONNX Runtime provider list: ``cuda`` when it runs on CUDA, else ``cpu``."""
    return "cuda" if PROVIDERS["cuda"] in providers else "cpu"


def optimized_paths(bundle: Bundle, ort_version: str, provider: str, precision: str, name: str) -> tuple[Path, Path]:
    """(graph, record) of component ``name``'s optimized graph."""
    folder = bundle.root / FOLDER / f"{ort_version}-{provider}" / precision
    return folder / f"{name}.onnx", folder / f"{name}.json"


def sources(bundle: Bundle, precision: str, name: str) -> dict[str, str]:
    """The sha256 of the bundle graphs an optimized ``name`` depends on (from the manifest)."""
    out = {}
    for p in dict.fromkeys((SOURCE_PRECISION, precision)):
        comp = bundle.components.get(p, {}).get(name)
        if comp is None:
            raise BundleError(
                f"bundle {bundle.root} has no {p} {name}; optimizing needs the fp32 and {precision} ONNX "
                f"(export with --precision all)"
            )
        out[p] = comp.sha256
    return out


def why_not_valid(bundle: Bundle, rec: dict, name: str) -> str | None:
    """None when the record ``rec`` matches the bundle as it is now, else why not (files are not hashed here)."""
    try:
        want = sources(bundle, rec.get("precision", "?"), name)
    except BundleError as e:
        return str(e)
    if rec.get("sources") != want:
        return "the bundle's ONNX changed since it was optimized"
    if rec.get("recipe") != recipe(name):
        return f"it was made by optimizer recipe {rec.get('recipe')!r}, this sdturbo makes {recipe(name)}"
    if "sha256" not in rec:
        return "its record has no sha256"
    return None


def damage(model: Path, rec: dict, name: str) -> str | None:
    """None when the files of a valid record hash to its sha256 (once per change), else what is wrong."""
    try:
        verify(graph_files(model, rec), rec["sha256"], f"the optimized {name} graph")
    except (IntegrityError, OSError) as e:
        return str(e)
    return None


def check_optimized(
    bundle: Bundle, name: str, ort_version: str, provider: str, precision: str
) -> tuple[Path, str | None]:
    """(graph, None) when ``name``'s optimized graph is valid; else (graph, why not). Call holding its lock."""
    model, record = optimized_paths(bundle, ort_version, provider, precision, name)
    if not record.is_file():
        return model, "none was built"
    try:
        rec = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        return model, f"its record {record} is unreadable ({e})"
    return model, why_not_valid(bundle, rec, name) or damage(model, rec, name)


def find_optimized(bundle: Bundle, name: str, ort_version: str, provider: str, precision: str) -> Path | None:
    """The valid optimized graph of ``name``, or None: none built (quietly), or stale or damaged (a warning)."""
    model, record = optimized_paths(bundle, ort_version, provider, precision, name)
    if not record.is_file():
        return None
    with locked(model, "is optimizing"):
        model, why = check_optimized(bundle, name, ort_version, provider, precision)
    if why is None:
        return model
    log.warning(
        "not using the optimized %s graph in %s: %s; running the plain graph (rebuild it with `sdturbo build %s "
        "--ort-optimize%s`)",
        name,
        model.parent,
        why,
        bundle.root,
        "" if provider == "cuda" else f" --ort-provider {provider}",  # (cuda: the build's default)
    )
    return None


def list_optimized(bundle: Bundle) -> list[dict]:
    """Every optimized graph's record, with ``path`` and ``state`` (valid, STALE or BROKEN: why)."""
    out = []
    for record in sorted((bundle.root / FOLDER).glob("*/*/*.json")):
        model = record.with_suffix(".onnx")
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            out.append({"path": str(record), "state": "BROKEN: unreadable record"})
            continue
        stale = why_not_valid(bundle, rec, record.stem)
        broken = None if stale else damage(model, rec, record.stem)
        state = f"STALE: {stale}" if stale else f"BROKEN: {broken}" if broken else "valid"
        out.append({**rec, "component": record.stem, "path": str(model), "state": state})
    return out

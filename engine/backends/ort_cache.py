"""ONNX Runtime's optimized graphs, cached in the bundle so later loads skip the optimizer.

Measured on the full-size fp32 UNet, 2-core x86 CPU: session creation 21.8 s with ORT_ENABLE_ALL,
1.8 s from the cached optimized graph, with the same run time. Optimized graphs carry CPU-specific
layouts, so the cache is keyed like an engine: ONNX sha256, onnxruntime version, CPU.

    ort/<onnxruntime version>-<cpu key>/<precision>/<component>.onnx (+ .onnx.data, + .json record)

The record is written last: without a matching record the cached files are ignored and rewritten. It
names the ONNX the graph was made from by its sha256, which the bundle checks its ONNX against before any load
(Bundle.component), so a bundle copied elsewhere (new mtimes, the same bytes) keeps its cache; and it holds
the sha256 of the cached files: a cached graph that does not match it (damaged in place, even at the same
size) is rebuilt with a warning, never used (hashed once per change, see engine/integrity.py). One process
writes a component's cache at a time; the others wait and load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from ..bundle import Bundle, ComponentFile
from ..errors import IntegrityError, first_line
from ..files import atomic_write, locked, make_shareable, nearest_existing, remove_leftovers, temp_prefix
from ..integrity import file_sha256, stamp, verify

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cpu_key() -> str:
    """The machine and its instruction-set flags, hashed (optimized layouts depend on AVX2/AVX-512)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def cache_paths(bundle: Bundle, ort_version: str, precision: str, name: str) -> tuple[Path, Path]:
    folder = bundle.root / "ort" / f"{ort_version}-{cpu_key()}" / precision
    return folder / f"{name}.onnx", folder / f"{name}.json"


def cached_model(bundle: Bundle, comp: ComponentFile, ort_version: str, precision: str) -> Path | None:
    """The cached optimized graph of ``comp`` if its record matches; else None."""
    model, record = cache_paths(bundle, ort_version, precision, comp.spec.name)
    try:
        rec = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("onnx_sha256") != comp.sha256 or "sha256" not in rec:  # (comp: checked against the manifest)
        return None
    try:
        verify(graph_files(model, rec), rec["sha256"], f"the cached optimized {comp.spec.name} graph")
    except (IntegrityError, OSError) as e:
        log.warning("%s; rebuilding it from the bundle's ONNX", e)
        return None
    return model


def list_cached(bundle: Bundle) -> list[dict]:
    """Every cached graph's record, with ``precision``, ``component`` and ``state``: valid (for the onnxruntime
    and CPU its record names), STALE (made from other ONNX) or BROKEN; either is made again by the next load."""
    out = []
    for record in sorted((bundle.root / "ort").glob("*/*/*.json")):
        rec, precision, name = {}, record.parent.name, record.stem
        try:
            rec = json.loads(record.read_text())
            comp = bundle.components.get(precision, {}).get(name)
            if comp is None:
                state = f"STALE: this bundle has no {precision} {name}"
            elif rec.get("onnx_sha256") != comp.sha256:
                state = "STALE: the bundle's ONNX changed since"
            else:
                verify(graph_files(record.with_suffix(".onnx"), rec), rec["sha256"], f"the cached {name} graph")
                state = "valid"
        except (OSError, ValueError, AttributeError, KeyError, IntegrityError) as e:
            rec, state = rec if isinstance(rec, dict) else {}, f"BROKEN: {first_line(e)}"
        out.append({**rec, "precision": precision, "component": name, "state": state})
    return out


def graph_files(model: Path, rec: dict) -> list[Path]:
    """The files of a graph written by ``publish_graph``: ``model``, and its external data if the record has any."""
    return [model] + ([model.with_name(model.name + ".data")] if rec.get("data_bytes") is not None else [])


def publish_graph(tmp: Path, model: Path, record: Path, rec: dict) -> dict:
    """Move the graph written in the folder ``tmp`` under ``model``'s name (with its ``.data``, if any) in as
    ``model``, then write ``rec`` plus the files' size and sha256 as its record, last, and stamp the files
    (integrity.py). The old record goes first: no record ever describes files it was not written for."""
    record.unlink(missing_ok=True)
    data = model.with_name(model.name + ".data")
    built_data = (tmp / data.name).is_file()
    if not built_data:
        data.unlink(missing_ok=True)
    for f in (tmp / data.name, tmp / model.name):
        if f.is_file():
            make_shareable(f)
            os.replace(f, model.parent / f.name)
    rec = {**rec, "data_bytes": data.stat().st_size if built_data else None}
    files = graph_files(model, rec)
    rec["bytes"] = sum(f.stat().st_size for f in files)
    rec["sha256"] = file_sha256(*files)
    atomic_write(record, json.dumps(rec, indent=2))
    stamp(files, rec["sha256"])
    return rec


def load_session(ort, options, bundle: Bundle, comp: ComponentFile, ort_version: str, precision: str, providers):
    """A session from the cached optimized graph when it is valid, else from the bundle's ONNX (caching the
    optimized graph for next time)."""
    model, _ = cache_paths(bundle, ort_version, precision, comp.spec.name)
    with locked(model, "is optimizing"):
        cached = cached_model(bundle, comp, ort_version, precision)
        if cached is not None:
            level = options.graph_optimization_level
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return ort.InferenceSession(str(cached), options, providers=providers)
            except Exception as e:  # onnxruntime's own exceptions: rebuilt from the bundle's ONNX, never fatal
                log.warning("ignoring the cached optimized %s (%s)", comp.spec.name, e)
                options.graph_optimization_level = level
        return create_and_cache(ort, options, bundle, comp, ort_version, precision, providers)


def create_and_cache(
    ort, options, bundle: Bundle, comp: ComponentFile, ort_version: str, precision: str, providers: list[str]
):
    """Create a session from the bundle's ONNX, having onnxruntime write its optimized graph to the cache."""
    model, record = cache_paths(bundle, ort_version, precision, comp.spec.name)
    for old in (record, model, model.with_name(model.name + ".data")):  # stale or broken (not valid: we are here):
        with contextlib.suppress(OSError):  # gone first, so that its replacement never needs the disk twice
            old.unlink(missing_ok=True)
    try:
        model.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(model.parent, f".{comp.spec.name}.tmp-*")  # the caller holds this component's lock
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{comp.spec.name}.tmp-"), dir=model.parent))
    except OSError as e:  # a read-only bundle: run without the cache
        _not_cached(comp.spec.name, model.parent, str(e))
        return ort.InferenceSession(str(comp.onnx), options, providers=providers)
    try:
        options.optimized_model_filepath = str(tmp / model.name)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", model.name + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = ort.InferenceSession(str(comp.onnx), options, providers=providers)
        except Exception as e:  # writing the optimized graph failed (a full disk), or the bundle's ONNX did
            shutil.rmtree(tmp, ignore_errors=True)  # (what onnxruntime wrote of it: the space it may need)
            options.optimized_model_filepath = ""  # nothing written: a bad ONNX raises its own error here
            session = ort.InferenceSession(str(comp.onnx), options, providers=providers)
            _not_cached(comp.spec.name, model.parent, first_line(e).rsplit(" FAIL : ", 1)[-1])  # (its own words)
            return session
        rec = {"onnx_sha256": comp.sha256, "onnxruntime": ort_version, "cpu": cpu_key()}
        try:
            publish_graph(tmp, model, record, rec)
        except OSError as e:  # the session is made; only its cache is lost (without a record, never used)
            _not_cached(comp.spec.name, model.parent, str(e))
            return session
        log.info("cached the optimized %s graph in %s", comp.spec.name, model.parent)
        return session
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _not_cached(name: str, folder: Path, why: str) -> None:
    """Say that ``name``'s optimized graph could not be cached in ``folder``: it runs all the same, optimized
    again at every load (seconds, or a minute for a full-size UNet)."""
    try:  # (the folder itself may be missing: a read-only bundle)
        free = f"; {shutil.disk_usage(nearest_existing(folder)).free / 1e6:.0f} MB free there"
    except OSError:
        free = ""
    log.warning(
        "could not cache the optimized %s graph in %s (%s%s); it runs without the cache, and every load "
        "optimizes it again",
        *(name, folder, why, free),
    )

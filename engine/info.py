"""``sdturbo info``: a readable summary of a bundle, and whether each of its files is intact.

Each component is checked for size and content (sha256; hashed once per change of its files, see
integrity.py, or every time with ``verify``); the tokenizers for presence, content and readability."""

from __future__ import annotations

from .bundle import Bundle
from .capture_guard import crash_records
from .errors import BundleError
from .files import folder_bytes
from .integrity import verify as check_content
from .tokenizer import PromptTokenizer


def describe(path, verify: bool = False, broken: list[str] | None = None) -> str:
    """The summary; ``verify`` hashes every file again instead of trusting stamps of earlier checks. The
    bundle's own files found broken (its ONNX and tokenizers; not the caches made from them, an engine or an
    optimized graph, which are rebuilt with a warning) are appended to ``broken``."""
    broken = [] if broken is None else broken
    b = Bundle(path)
    m = b.manifest
    lines = [
        f"bundle     {b.root}",
        f"model      {b.model_id} ({b.family}, config {b.config_hash[:12]})",
        f"schema     {m['schema_version']}, written {m.get('created', '?')} by "
        + ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items()),
        f"scheduler  {m['scheduler'].get('_class_name', 'EulerDiscreteScheduler')} "
        f"({b.scheduler.timestep_spacing}, {b.scheduler.prediction_type})",
        f"limits     batch <= {b.limits.max_batch}, sides {b.limits.min_size}-{b.limits.max_size} px "
        f"(multiples of {b.vae_scale_factor})",
        f"tiny vae   {b.tiny_vae.source} (scaling_factor {b.tiny_vae.scaling_factor:g}; generate --vae tiny)"
        if b.tiny_vae
        else f"tiny vae   none (add one: sdturbo export {b.model_id} --out {b.root} --tiny-vae SOURCE)",
        "onnx:",
    ]
    for precision, comps in b.components.items():
        for name, comp in comps.items():
            try:
                b.component(precision, name, rehash=verify)
                state = "ok"
            except BundleError as e:
                state = f"BROKEN: {e}"
                broken.append(f"{precision} {name}")
            ins = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in comp.spec.inputs)
            lines.append(f"  {precision:5} {name:16} {comp.bytes / 1e6:9.1f} MB  {ins}  [{state}]")
    lines += describe_tokenizers(b, verify, broken)
    lines += describe_engines(b)
    lines += describe_optimized(b)
    lines += describe_session_cache(b)
    crashed = crash_records()
    if crashed:
        lines += ["CUDA-graph captures skipped on this machine (each killed a process once):", *crashed]
    return "\n".join(lines)


def describe_optimized(b: Bundle) -> list[str]:
    """ONNX Runtime's optimized graphs (`sdturbo build --ort-optimize`): key, fused ops, state."""
    from .backends.ort_optimized import list_optimized

    records = list_optimized(b)
    if not records:
        return ["optimized:  none (ONNX Runtime fused graphs: `sdturbo build BUNDLE --ort-optimize`)"]
    lines = ["optimized:  (ONNX Runtime transformer optimizer)"]
    for rec in records:
        fused = ", ".join(f"{k} {v}" for k, v in rec.get("fused", {}).items()) or "no fused ops"
        lines.append(
            f"  onnxruntime {rec.get('onnxruntime', '?')} {rec.get('provider', '?'):4} {rec.get('precision', '?'):4} "
            f"{rec.get('component', '?'):16} {rec.get('bytes', 0) / 1e6:8.1f} MB  {fused}  [{rec['state']}]"
        )
    return lines


def describe_session_cache(b: Bundle) -> list[str]:
    """ONNX Runtime's CPU session graphs (``ort/``, written by the first load): its size, then each graph's state."""
    from .backends.ort_cache import list_cached

    folder = b.root / "ort"
    if not folder.is_dir():
        return ["ort cache:  none (ONNX Runtime's CPU session graphs: written by the first CPU load)"]
    lines = [f"ort cache:  {folder_bytes(folder) / 1e6:.1f} MB in {folder} (ONNX Runtime's CPU session graphs)"]
    for rec in list_cached(b):
        lines.append(
            f"  onnxruntime {rec.get('onnxruntime', '?')} {rec.get('cpu', '?')} {rec['precision']:4} "
            f"{rec['component']:16} {rec.get('bytes', 0) / 1e6:8.1f} MB  [{rec['state']}]"
        )
    return lines


def describe_tokenizers(b: Bundle, verify: bool, broken: list[str]) -> list[str]:
    lines = ["tokenizers:"]
    for path, *settings in b.tokenizers:
        sha = b.tokenizer_sha256[path]
        try:
            if not path.is_file():
                raise BundleError(f"{path.name} is missing")
            if sha is not None:
                check_content([path], sha, path.name, rehash=verify)
            PromptTokenizer(path, *settings)
            state = "ok" if sha is not None else "ok (readable; this bundle records no checksum for it)"
        except BundleError as e:
            state = f"BROKEN: {e}"
            broken.append(path.name)
        lines.append(f"  {path.name:27} [{state}]")
    return lines


def describe_engines(b: Bundle) -> list[str]:
    from .engine_store import Profile, find_engine, list_engines

    records = list_engines(b)
    if not records:
        return ["engines:  none (build them with `sdturbo build`)"]
    here = _this_machine()
    lines = [f"engines:  (this machine: {here or 'no GPU / no TensorRT'})"]
    for rec in records:
        if rec.get("incomplete"):
            lines.append(
                f"  {rec['path']}  {rec['plan_bytes'] / 1e6:8.1f} MB  [incomplete: no build record (a build that did "
                f"not finish, or a copy); never loaded, `sdturbo build` builds it again]"
            )
            continue
        key = rec.get("key", {})
        try:
            profile = Profile(**{k: tuple(v) for k, v in key["profile"].items()})
            what = (
                f"{key['library']} {key['library_version']} {key['device']:6} {profile.tag:18} "
                f"{key['component']:16} {rec.get('plan_bytes', 0) / 1e6:8.1f} MB"
            )
        except (KeyError, TypeError, ValueError, AttributeError):  # (a record not written by `build`)
            lines.append(f"  {rec['path']}  [corrupt record]")
            continue
        if key["component"] not in b.component_names:
            lines.append(f"  {what}  [stray: not a component of this bundle; never loaded, remove it]")
            continue
        try:
            find_engine(b, key["component"], key["library"], key["library_version"], key["device"], profile)
            state = "valid"
        except BundleError as e:
            state = f"STALE: {e}"
        fits = (
            "fits here" if here and here == (key["library"], key["library_version"], key["device"]) else "not for here"
        )
        lines.append(f"  {what}  [{state}; {fits}]")
    return lines


def _this_machine():
    """(library, version, device) engines must match to run here, or None without a GPU or TensorRT."""
    try:
        from .backends.trt_lib import import_trt
        from .cuda import current_compute_capability, gpu_available

        if not gpu_available():
            return None
        trt, flavour = import_trt()
        return (flavour, trt.__version__, f"sm{current_compute_capability()}")
    except Exception:  # info must describe the bundle even where CUDA or TensorRT is broken
        return None

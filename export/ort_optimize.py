"""ONNX Runtime's transformer optimizer on a bundle: fused fp16 graphs for the ONNX Runtime backend.

What ONNX Runtime's own Stable Diffusion pipeline does (``onnxruntime/transformers/models/stable_diffusion/
optimize_pipeline.py``), on the bundle's graphs: fuse the **fp32** graph (the fusions match fp32 patterns; on
our fp16 graphs the UNet's fail), then convert it to fp16 with onnxruntime's converter and its default list
of ops kept in fp32, so the result has the same inputs and outputs as the bundle's fp16 graph (timestep
stays float32). A component the fp16 bundle keeps in fp32 (SDXL's VAE, which overflows fp16) is fused and
kept in fp32, as that pipeline does. Model types: ``clip`` for text encoders, ``unet``, ``vae``.

Providers (one switch, ``provider``):

- ``cuda`` (the default): every fusion that pipeline makes: MultiHeadAttention (packed QKV / KV in fp16, for
  flash and memory-efficient attention), GroupNorm and SkipGroupNorm (NHWC), NhwcConv, BiasSplitGelu,
  BiasAdd, SkipLayerNormalization, BiasGelu/QuickGelu. GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu
  and BiasAdd have CUDA kernels only (onnxruntime 1.32): such a graph does not load on the CPU.
- ``cpu``: only fusions with CPU kernels (MultiHeadAttention unpacked, SkipLayerNormalization, BiasGelu,
  QuickGelu), for the CPU provider and for checking fused graphs against plain ones without a GPU.

Text encoders and VAEs get their attention fused into MultiHeadAttention by export/attention.py first, for both
providers: onnxruntime's CLIP fusion does not match the causal mask transformers 5 exports, and its VAE fusion
does not match the scaled-dot-product attention diffusers exports (ONNX Runtime's own pipeline exports the VAE
with SDPA switched off, so its pattern matches there).

The ONNX-Runtime-level pass of that pipeline (``optimize_by_onnxruntime`` on a CUDA session) is not run here:
it needs a GPU, and the backend's session applies the same optimizations (ORT_ENABLE_ALL) when it loads.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from packaging.version import Version

from ..engine.backends.onnxruntime import import_onnxruntime, ort_distributions
from ..engine.backends.ort_cache import publish_graph
from ..engine.backends.ort_optimized import PROVIDERS, check_optimized, optimized_paths, recipe, sources
from ..engine.bundle import Bundle
from ..engine.errors import BackendError, InputError
from ..engine.files import check_free_space, human_size, locked, naming_failures, remove_leftovers, temp_prefix
from ..engine.spec import axis_values
from . import attention
from .proto_io import save_streamed, value_bytes

log = logging.getLogger(__name__)

MODEL_TYPES = {
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
    "tiny_vae_decoder": "vae",  # convolutions and ReLUs: little to fuse, but the same fp16 conversion
    "tiny_vae_encoder": "vae",
}
CUDA_ONLY_FUSIONS = (  # FusionOptions switches whose fused ops have no CPU kernel (onnxruntime 1.32)
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)
# Kept in fp32 beyond onnxruntime's defaults: the UNet's sinusoidal timestep embedding (timestep x frequency
# reaches ~1000, where fp16 steps by 0.5: the sines would be noise), as diffusers and our fp16 export keep it.
FP32_NODES = ("/model/time_proj/",)
LOWEST_ORT = "1.18"  # the first whose optimizer takes a ModelProto (pyproject.toml: the lowest versions checked)


def fusion_options(model_type: str, provider: str, float16: bool):
    """The fusions ONNX Runtime's Stable Diffusion pipeline enables for ``model_type``, less those without
    kernels for ``provider``."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(model_type)
    if model_type == "unet":  # as optimize_pipeline.py: packed QKV/KV only in fp16 (its fused attention kernels)
        opts.enable_packed_kv = float16 and opts.enable_packed_kv
        opts.enable_packed_qkv = float16 and opts.enable_packed_qkv
    if provider == "cpu":
        for switch in CUDA_ONLY_FUSIONS:
            if hasattr(opts, switch):
                setattr(opts, switch, False)
    return opts


@contextlib.contextmanager
def numpy2_compatible():
    """onnxruntime 1.32's UNet attention fusion reads the head count with ``int()`` of a 1-element array,
    which numpy >= 2.4 refuses (TypeError). While the optimizer runs, read it with ``.item()`` instead."""
    import onnxruntime.transformers  # noqa: F401  (puts the optimizer's own folder on sys.path)
    from fusion_attention_unet import FusionAttentionUnet  # the module the optimizer itself imports

    original = FusionAttentionUnet.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2=False):
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1 and int(value.item()) > 0:
                    return int(value.item())
            return 0
        return original(self, reshape_q, is_torch2)

    FusionAttentionUnet.get_num_heads = get_num_heads
    try:
        yield
    finally:
        FusionAttentionUnet.get_num_heads = original


@contextlib.contextmanager
def optimizer_quiet():
    """onnxruntime's optimizer logs each fusion and node removal at INFO: dozens of lines a graph, through its
    progress bar, that buried ours. While it runs they show with -v only (its warnings always). Its modules log
    under their own top-level names (its folder is on sys.path) or the package's: each is named here."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    import onnxruntime.transformers

    stems = [p.stem for p in Path(onnxruntime.transformers.__file__).parent.glob("*.py")]
    loggers = [logging.getLogger(n) for stem in stems for n in (stem, f"onnxruntime.transformers.{stem}")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# Initializers above this size are left out of the copies onnxruntime's shape inference makes (as graph inputs
# of the same type and shape): weights, not the few-element tensors whose values make shapes.
WEIGHTLESS_ABOVE = 1 << 20


@contextlib.contextmanager
def weightless_shape_inference(above: int | None = None):
    """onnxruntime's optimizer and fp16 converter run its symbolic shape inference, for shapes and types
    alone, on whole copies of the model, weights included: a full-size UNet's fp32 weights two and three times
    in memory at once (SDXL's 10 GB took `build --ort-optimize` past 24 GB and the kernel's OOM killer). While
    this block runs, each copy leaves out the initializers above ``above`` bytes, made graph inputs of the same
    type and shape; the shapes and types inferred are the same (tested: the graphs made are identical)."""
    import onnxruntime.transformers  # noqa: F401  (puts the optimizer's own folder on sys.path)

    try:
        from shape_infer_helper import SymbolicShapeInference  # the class the optimizer itself uses

        original = SymbolicShapeInference._preprocess  # where a run copies the model it is given
    except (ImportError, AttributeError):  # another onnxruntime's layout: its own copies (more memory, same graphs)
        yield
        return
    above = WEIGHTLESS_ABOVE if above is None else above

    def _preprocess(self, in_mp):
        return original(self, weightless(in_mp, above))

    SymbolicShapeInference._preprocess = _preprocess
    try:
        yield
    finally:
        SymbolicShapeInference._preprocess = original


def weightless(model, above: int):
    """``model`` without the initializers above ``above`` bytes, which become graph inputs (its nodes copied)."""
    import onnx

    graph = model.graph
    big = [t for t in graph.initializer if value_bytes(t) > above]
    if not big:
        return model
    inputs = [*graph.input, *(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big)]
    names = {t.name for t in big}
    light = onnx.helper.make_graph(
        graph.node,
        graph.name,
        inputs,
        graph.output,
        [t for t in graph.initializer if t.name not in names],
        value_info=graph.value_info,
    )
    return onnx.helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)


def fused_op_counts(model) -> dict[str, int]:
    """Operators of onnxruntime's contrib domain in ``model`` (an onnx ModelProto), counted."""
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft").items()))


def optimize_graph(src: Path, dst: Path, name: str, spec, provider: str, dims: dict | None = None) -> dict[str, int]:
    """Fuse the fp32 graph ``src`` for ``provider`` and convert it to the float types of ``spec`` (the
    component's contract in the target precision); write it to ``dst`` (an empty folder's file). ``dims``: the
    symbolic axes' values for the checks of our attention fusion (``attention.check_feeds``). Returns the fused
    op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[name]
    floats = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs) if t.dtype.startswith("float")}
    float16 = "float16" in floats.values()
    fused = None
    if model_type in ("clip", "vae"):  # attentions onnxruntime's fusions miss (export/attention.py): ours first
        # beside dst, so a killed run's copy of large weights is cleared with dst's folder (remove_leftovers)
        with tempfile.TemporaryDirectory(prefix=".attention-", dir=dst.parent) as work:
            fused, n = attention.fuse_file(src, Path(work), dims)
        log.info("%s: %d attentions fused into MultiHeadAttention", name, n)
        if fused is not None:
            import onnx

            onnx.load_external_data_for_model(fused, str(src.parent))
    from onnx_model import OnnxModel  # the optimizer's own (onnxruntime.transformers puts its folder on sys.path)

    from .graph_fixes import needs_external_data

    with optimizer_quiet(), numpy2_compatible(), weightless_shape_inference():  # (fusing and converting infer shapes)
        m = optimize_model(
            str(src) if fused is None else fused,
            model_type=model_type,
            num_heads=0,  # deduced from the graph
            hidden_size=0,
            opt_level=0,  # fusions only; the session optimizes the rest when it loads
            optimization_options=fusion_options(model_type, provider, float16),
            use_gpu=provider == "cuda",
        )
        del fused
        # The fusions replace weights (they transpose and concatenate them), and protobuf (upb) frees a replaced
        # weight only with the whole graph: a graph carried from fusing into converting held both stages' weights
        # (SD-Turbo's UNet: 3.4 GB of fp32 weights, peak 9.3 GB). In between, the graph goes through the disk, so
        # the converter starts with the live weights only.
        if float16:  # onnxruntime's converter with its default fp32 op list; float32 IO (timestep) kept
            graph = [m.model]
            del m  # (with its caches of the graph's nodes, which keep all of the graph's memory alive)
            with tempfile.TemporaryDirectory(prefix=".stage-", dir=dst.parent) as work:
                m = OnnxModel(_through_disk(graph, Path(work)))
            keep = [n for n, d in floats.items() if d == "float32"]
            m.convert_float_to_float16(keep_io_types=keep, **fp32_kept(m.model))
    _check_contract(m.model, spec)
    if needs_external_data(m.model):
        m.save_model_to_file(str(dst), use_external_data_format=True)
    else:  # in one piece, as save_model_to_file writes it, but one weight at a time (export/proto_io.py)
        m.topological_sort()
        _declare_ms_opset(m.model)
        save_streamed(m.model, dst)
    counts = fused_op_counts(m.model)
    del m
    gc.collect()  # the optimizer's objects refer to each other: without this the graph outlives the call
    return counts


def _declare_ms_opset(model) -> None:
    """The com.microsoft opset (version 1) in ``model``'s imports where its graph uses that domain's (fused) ops and
    does not import it: what onnxruntime's ``OnnxModel.save`` adds before it writes a graph."""
    domain = "com.microsoft"
    if any(n.domain == domain for n in model.graph.node) and not any(o.domain == domain for o in model.opset_import):
        opset = model.opset_import.add()
        opset.domain, opset.version = domain, 1


def _through_disk(holder: list, work: Path):
    """The graph in ``holder`` (a one-item list, its only reference) written to ``work`` with its weights
    beside it, freed, then read back: the same graph (node order, names, values), in memory that holds its live
    weights and nothing else."""
    import onnx

    path = work / "graph.onnx"
    located = {t.name for t in holder[0].graph.initializer if t.HasField("data_location")}
    onnx.save_model(
        holder.pop(), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="graph.onnx.data"
    )
    gc.collect()
    model = onnx.load(str(path))
    for t in model.graph.initializer:  # reading the weights back sets data_location (to DEFAULT): as it was
        if t.name not in located:
            t.ClearField("data_location")
    for f in work.iterdir():
        f.unlink()
    return model


def fp32_kept(model) -> dict:
    """What onnxruntime's fp16 converter must leave in fp32 (its ``op_block_list`` and ``node_block_list``): its
    own default ops; the UNet's timestep embedding (FP32_NODES); every ArgMax and the float32 Cast that
    float_argmax put before an integer one (the converter would make it float16, exact only up to 2048: CLIP's
    token ids, 49406 and 49407, would both round to 49408 and tie)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    from .graph_fixes import FLOAT_ARGMAX

    keep = [n.name for n in model.graph.node if n.name.startswith((*FP32_NODES, FLOAT_ARGMAX))]
    return {"op_block_list": [*DEFAULT_OP_BLOCK_LIST, "ArgMax"], "node_block_list": keep or None}


def _check_contract(model, spec) -> None:
    """The optimized graph must take and return what the plain one does (names and element types)."""
    import onnx

    def types(values):
        return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in values]

    inits = {i.name for i in model.graph.initializer}
    got = (types(i for i in model.graph.input if i.name not in inits), types(model.graph.output))
    want = ([(t.name, t.dtype) for t in spec.inputs], [(t.name, t.dtype) for t in spec.outputs])
    if got != want:
        raise BackendError(f"the optimized {spec.name} has inputs/outputs {got}, not the bundle's {want}")


def optimize_component(bundle: Bundle, name: str, provider: str, precision: str = "fp16", force: bool = False) -> Path:
    """Write component ``name``'s optimized graph into the bundle (unless a valid one is there), atomically:
    built under a temporary name, renamed into place, the record written last, all under the lock."""
    import onnxruntime

    version = onnxruntime.__version__
    model, record = optimized_paths(bundle, version, provider, precision, name)
    src = bundle.component("fp32", name)  # checked: present, of the recorded size and content
    spec = bundle.component(precision, name).spec
    keys = sources(bundle, precision, name)
    model.parent.mkdir(parents=True, exist_ok=True)
    with locked(model, "is optimizing"):
        _, why = check_optimized(bundle, name, version, provider, precision)
        if why is None and not force:
            log.info("the optimized %s is up to date (%s)", name, model)
            return model
        if why != "none was built":
            log.warning("rebuilding the optimized %s: %s", name, "--force" if why is None else why)
        remove_leftovers(model.parent, f".{name}.tmp-*")
        _check_space(bundle, name, provider, precision, model.parent)
        log.info("optimizing %s for %s (onnxruntime %s)", name, provider, version)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{name}.tmp-"), dir=model.parent))
        try:
            with naming_failures(model.parent):  # a full disk mid-write names where it was writing
                start = time.perf_counter()
                scale = bundle.vae_scale_factor
                dims = axis_values(2, 32 * scale, 32 * scale, scale)  # a 32x32 latent for the checks
                fused = optimize_graph(src.onnx, tmp / model.name, name, spec, provider, dims)
                seconds = time.perf_counter() - start
                rec = {
                    "component": name,
                    "precision": precision,
                    "provider": provider,
                    "onnxruntime": version,
                    "sources": keys,
                    "recipe": recipe(name),
                    "fused": fused,
                    "seconds": round(seconds, 2),
                }
                publish_graph(tmp, model, record, rec)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("optimized %s for %s in %.1f s: %s", name, provider, seconds, fused)
    return model


def _check_space(bundle: Bundle, name: str, provider: str, precision: str, folder: Path) -> None:
    """Refuse to start what the free space cannot hold (the UNet's fusion takes minutes): the optimized graph
    (the same weights as the bundle's graph in ``precision``) and a copy of the fp32 graph, which is written
    between the optimizer's stages (and, for the components whose attention we fuse first, export/attention.py,
    to check that fusion on)."""
    out = bundle.component(precision, name).bytes
    copy = bundle.component("fp32", name).bytes
    check_free_space(
        folder,
        out + copy,
        f"optimizing {name} for {provider}",
        f"its optimized graph, about {human_size(out)}, and a copy of its fp32 graph, {human_size(copy)}, "
        "while it is optimized",
        "Free some space, then run the same command again (the graphs optimized so far are kept)",
    )


def optimize_bundle(
    path, components: tuple[str, ...] | None = None, provider: str = "cuda", precision: str = "fp16", force=False
) -> list[Path]:
    """Optimized graphs of ``components`` (default: all the bundle has) for ``provider``."""
    if provider not in PROVIDERS:
        raise InputError(f"--ort-provider {provider!r} is not allowed; use one of {', '.join(PROVIDERS)}")
    if precision != "fp16":
        raise InputError(f"--precision {precision!r} is not allowed for optimized graphs; they are fp16")
    onnxruntime = import_onnxruntime()
    if Version(onnxruntime.__version__) < Version(LOWEST_ORT):
        raise BackendError(
            f"optimizing needs onnxruntime {LOWEST_ORT} or newer (its optimizer takes a graph in memory); this is "
            f"{onnxruntime.__version__}: upgrade the onnxruntime package installed here (pip install -U "
            f"{' '.join(ort_distributions()) or 'onnxruntime'})"
        )
    try:
        import onnx  # noqa: F401
        import onnxruntime.transformers.optimizer
    except ImportError as e:
        raise BackendError(
            f"optimizing needs onnx and onnxruntime's optimizer ({e.name} is missing): pip install 'sdturbo[export]'"
        ) from e
    bundle = Bundle(path)
    return [
        optimize_component(bundle, name, provider, precision, force) for name in bundle.select_components(components)
    ]

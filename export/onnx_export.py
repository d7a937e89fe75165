"""Export one component to a clean, checked ONNX file (one external ``.data`` file when over 2 GB)."""

from __future__ import annotations

import gc
import logging
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from ..engine.bundle import EXTERNAL_DATA_BYTES
from ..engine.files import make_shareable
from ..engine.integrity import file_sha256
from ..engine.spec import DTYPES, ComponentSpec
from .graph_fixes import float_argmax
from .proto_io import save_streamed, value_bytes
from .rss import PeakRss
from .wrappers import build_wrapper

log = logging.getLogger(__name__)

OPSET = 17
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}


def trace_dims(model) -> dict[str, int]:
    """Sample sizes for tracing.

    diffusers' UNet chooses how to upsample with a Python branch on whether the latent size divides
    its total up-factor. Tracing at a size that does not divide it records the general branch
    (upsample to the skip connection's size), so the graph serves every size that is a multiple of 8.
    """
    up = 2 ** (len(model.config("unet").block_out_channels) - 1)
    scale = 2 ** (len(model.config("vae").block_out_channels) - 1)
    lh, lw = up + 1, 2 * up + 1
    return {"batch": 2, "latent_height": lh, "latent_width": lw, "height": lh * scale, "width": lw * scale}


def sample_inputs(spec: ComponentSpec, dims: dict[str, int], vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic inputs that match ``spec`` (already resolved to a precision)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = t.concrete(dims)
        if t.dtype == "int32":
            out.append(torch.randint(0, vocab_size, shape, generator=g, dtype=torch.int32))
        elif t.name == "timestep":
            out.append(torch.full(shape, 999.0, dtype=torch.float32))
        elif t.name == "time_ids":  # SDXL: original size, crop offset, target size
            h, w = dims["height"], dims["width"]
            out.append(torch.tensor([[h, w, 0, 0, h, w]] * shape[0], dtype=TORCH_DTYPES[t.dtype]))
        else:
            out.append(torch.randn(shape, generator=g).to(TORCH_DTYPES[t.dtype]))
    return out


def export_component(model, spec: ComponentSpec, path: Path, dims=None, wrapper=None) -> Path | None:
    """Write ``spec`` (resolved to one precision) of ``model`` to ``path``; returns the data file, if any.

    The model's modules must already be in the spec's float dtype. ``wrapper`` and ``dims``: a module and
    trace sizes given by the caller (the tiny VAE, exported without the model: export/tiny_vae.py).
    """
    dims = dims or trace_dims(model)
    wrapper = (wrapper or build_wrapper(spec.name, model)).eval()
    args = sample_inputs(spec, dims, model.config("text_encoder").vocab_size if model is not None else 1)
    dynamic_axes = {
        t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*spec.inputs, *spec.outputs)
    }
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}-trace-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches: see trace_dims
            torch.onnx.export(
                wrapper,
                tuple(args),
                str(raw),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(raw), load_external_data=False)  # a large graph's weights stay in their files
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            data, weight_bytes = _stream_large(proto, Path(tmp), spec, path)
        else:
            data, weight_bytes = _clean_small(proto, spec, path)
        del proto
    gc.collect()  # the graph sits in a reference cycle: without this, its bytes stay through the next component
    onnx.checker.check_model(str(path), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    log.info("exported %s -> %s (%.1f MB of weights)", spec.name, path, weight_bytes / 1e6)
    return data


def export_record(model, spec: ComponentSpec, folder: Path, precision: str, dims=None, wrapper=None) -> dict:
    """Export ``spec`` (resolved to ``precision``) into ``folder``; its manifest entry: files, sha256, contract."""
    path = folder / f"{spec.name}.onnx"
    start, rss = time.perf_counter(), PeakRss()
    data = export_component(model, spec, path, dims, wrapper)
    seconds, peak = time.perf_counter() - start, rss.peak_mb()
    files = [path] + ([data] if data else [])
    for f in files:
        make_shareable(f)
    log.info("    %s (%s): %.1f s, peak RSS %s MB", spec.name, precision, seconds, peak)
    return {
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


def _clean_small(model: onnx.ModelProto, spec: ComponentSpec, path: Path) -> tuple[Path | None, int]:
    """A graph whose weights are embedded (under 2 GB): stamp the contract on it, save it.

    Edited in place, as the large graphs are: the TorchScript exporter has already folded constants and removed
    dead nodes (an onnx-graphsurgeon cleanup, measured on every component of both families, changed only the
    nodes' order), and a graph library's copies of the weights made SD-Turbo's fp16 UNet (1.7 GB) peak at
    10.8 GB here. Written one weight at a time (export/proto_io.py): onnx.save_model's whole serialization
    peaked at 9.4 GB for it, above the TorchScript export's own 7.0 GB."""
    _stamp_contract(model.graph, spec)
    float_argmax(model.graph, spec)
    weight_bytes = sum(value_bytes(t) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data") if weight_bytes > EXTERNAL_DATA_BYTES else None
    if data is not None:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:  # (not onnx.save_model: serializing the whole graph at once peaks at five times its weights)
        save_streamed(model, path)
    return data, weight_bytes


def _stream_large(model: onnx.ModelProto, raw_dir: Path, spec: ComponentSpec, path: Path) -> tuple[Path, int]:
    """A graph over 2 GB, whose weights the exporter wrote as external files: stamp the contract on the
    weight-less graph and copy the weights, one tensor at a time, into one aligned ``.data`` file.

    Never holding the weights in memory is what lets the SD-Turbo fp32 and SDXL UNets export in 24 GiB
    (a graph library would hold them two to three times over).
    """
    _stamp_contract(model.graph, spec)
    float_argmax(model.graph, spec)
    data = path.with_name(path.name + ".data")
    total = 0
    with open(data, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            src = raw_dir / info["location"]
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else src.stat().st_size - offset
            out.write(b"\0" * (-out.tell() % 4096))  # page-aligned, so the data can be memory-mapped
            start = out.tell()
            with open(src, "rb") as f:
                f.seek(offset)
                remaining = length
                while remaining:
                    chunk = f.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise OSError(f"{src} ends before the {length} bytes the graph says it holds")
                    out.write(chunk)
                    remaining -= len(chunk)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", str(start)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            total += length
    onnx.save_model(model, str(path))
    return data, total


def _stamp_contract(graph: onnx.GraphProto, spec: ComponentSpec) -> None:
    """Names, symbolic axes and sizes of the graph's inputs and outputs, exactly as the spec declares."""
    for declared, values in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
        for t, v in zip(declared, values, strict=True):
            assert v.name == t.name, (v.name, t.name)
            shape = v.type.tensor_type.shape
            del shape.dim[:]
            for d in t.shape:
                dim = shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d

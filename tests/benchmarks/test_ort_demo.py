"""ONNX Runtime's own Stable Diffusion pipeline as a benchmark contender (benchmarks/ort_demo.py): on the CPU,
what can be checked without its CUDA engines. The demo, as the installed onnxruntime ships it, imports on this
stack; its own loaders read exactly our model's weights from the folder laid out for it; a build it left part
way is not reused; its export runs the TorchScript exporter; and the contender refuses what it cannot run with
one line. Its run on a GPU is gpu_check's ort-demo step."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
from sdturbo.benchmarks import ort_demo
from sdturbo.benchmarks.bench import BenchConfig
from sdturbo.benchmarks.timers import StageTimer
from sdturbo.engine.errors import BackendError, InputError


@pytest.fixture(scope="module")
def demo():
    return ort_demo.import_demo()


def test_the_installed_onnxruntime_s_demo_imports_here(demo):
    assert str(ort_demo.demo_folder()) not in sys.path  # its bare module names were reachable for the import only
    assert demo.pipeline.StableDiffusionPipeline.__module__ == "pipeline_stable_diffusion"
    assert demo.engine_builder.EngineType.ORT_CUDA
    assert sys.modules["engine_builder_ort_cuda"].OrtCudaEngineBuilder  # the engine the contender runs: the real one
    tensorrt = sys.modules["engine_builder_tensorrt"]
    if "placeholder" in (tensorrt.__doc__ or ""):  # no tensorrt here: a stand-in that refuses to build engines
        with pytest.raises(RuntimeError, match="engine_builder_tensorrt is a placeholder here: TensorRT's engines"):
            tensorrt.TensorrtEngineBuilder()
    if "placeholder" in (demo.pipeline.nvtx.__doc__ or ""):  # no nvtx here: the demo's stand-in is its own
        assert "nvtx" not in sys.modules  # (a later `import nvtx` in this process fails as it should)


def state(module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_the_demo_s_own_loaders_read_our_model_s_weights(demo, tiny_folder, tmp_path):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    info = demo.models.PipelineInfo(ort_demo.VERSION)
    ort_demo.framework_models(tiny_folder, tmp_path, info.name())
    root = ort_demo.framework_models(tiny_folder, tmp_path, info.name())  # again: links replaced, not nested
    assert sorted(p.name for p in (root / info.name()).iterdir()) == sorted(ort_demo.LAYOUT)
    kw = {"device": torch.device("cpu"), "max_batch_size": 1}
    ours = {
        "text_encoder": CLIPTextModel.from_pretrained(tiny_folder / "text_encoder"),
        "unet": UNet2DConditionModel.from_pretrained(tiny_folder / "unet"),
        "vae": AutoencoderKL.from_pretrained(tiny_folder / "vae"),
    }
    theirs = {
        "text_encoder": demo.models.CLIP(info, None, **kw).load_model(str(root)),
        "unet": demo.models.UNet(info, None, **kw).load_model(str(root)),
        "vae": demo.models.VAE(info, None, **kw).load_model(str(root)),
    }
    for name, module in ours.items():
        mine, its = state(module), state(theirs[name])
        assert mine.keys() == its.keys(), name
        assert all(np.array_equal(mine[k], its[k]) for k in mine), name
    # eager attention: the demo deletes F.scaled_dot_product_attention while it exports, transformers' default
    assert theirs["text_encoder"].config._attn_implementation == "eager"
    assert ours["text_encoder"].config._attn_implementation != "eager"  # the model folder itself is untouched
    prompt = "a photo of a cat, 35mm"
    its_ids = demo.models.get_tokenizer(info, str(root))(prompt).input_ids
    assert its_ids == CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")(prompt).input_ids


def test_a_build_left_part_way_is_removed_and_a_finished_one_kept(tiny_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path))
    work = ort_demo.prepare_work(tiny_folder)
    assert work.is_relative_to(tmp_path / "ort-demo")
    (work / "unet").mkdir()
    (work / "unet" / "model.onnx").write_bytes(b"half an export")
    assert ort_demo.prepare_work(tiny_folder) == work and not (work / "unet").exists()
    (work / "unet").mkdir()
    (work / "complete").write_text("built\n")
    assert ort_demo.prepare_work(tiny_folder) == work and (work / "unet").exists()


def test_the_build_is_keyed_by_the_model_s_files(tiny_folder, monkeypatch, tmp_path):
    import shutil

    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    copy = shutil.copytree(tiny_folder, tmp_path / "model")
    before = ort_demo.work_folder(copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    assert ort_demo.work_folder(copy) != before


@pytest.mark.parametrize("package", ["onnxruntime", "torch", "diffusers", "transformers"])
def test_the_build_is_keyed_by_the_libraries_that_make_it(tiny_folder, monkeypatch, tmp_path, package):
    """A new onnxruntime (its optimizer), torch (its exporter), diffusers or transformers (the modules exported)
    makes other graphs: a build made with the old ones is not reused."""
    import importlib.metadata

    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path))
    before = ort_demo.work_folder(tiny_folder)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == package else real(name))
    assert ort_demo.work_folder(tiny_folder) != before


def test_its_export_runs_the_torchscript_exporter(monkeypatch):
    import torch

    seen = []

    def export(model, args, f, dynamo=True, **kw):
        seen.append(dynamo)

    monkeypatch.setattr(torch.onnx, "export", export)
    with ort_demo.legacy_exporter():
        torch.onnx.export(None, (), "x.onnx", opset_version=17)
        torch.onnx.export(None, (), "x.onnx", dynamo=True)  # asked for by name: left as asked
    torch.onnx.export(None, (), "x.onnx")
    assert seen == [False, True, True] and torch.onnx.export is export


def test_a_failed_build_gives_torch_its_attention_back(demo):
    """Its builder deletes F.scaled_dot_product_attention before exporting and restores it after a build that
    succeeded only; a failed one must not leave the benchmark's later contenders without it."""
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = object.__new__(demo.engine_builder.EngineBuilder)  # (its __init__ needs CUDA)
    backend.torch_sdpa = sdpa
    try:
        with pytest.raises(RuntimeError, match="export failed"), ort_demo.sdpa_restored(backend):
            backend.disable_torch_spda()  # what its build_engines does before it exports
            assert not hasattr(torch.nn.functional, "scaled_dot_product_attention")
            raise RuntimeError("export failed")
        assert torch.nn.functional.scaled_dot_product_attention is sdpa
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def test_what_it_cannot_run_is_refused_in_one_line(tiny_folder, xl_folder):
    with pytest.raises(InputError, match=r"onnxruntime-demo-fp16 runs SD-Turbo models only; .* is sdxl-turbo"):
        ort_demo.OrtDemo(xl_folder, StageTimer()).load()
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="onnxruntime-demo-fp16 needs a CUDA GPU"):
            ort_demo.OrtDemo(tiny_folder, StageTimer()).load()


def test_the_benchmark_takes_it_by_name():
    assert BenchConfig(contenders=("diffusers-fp16", "onnxruntime-demo-fp16")).contenders
    with pytest.raises(InputError, match="onnxruntime-demo-fp16 \\(ONNX Runtime's own pipeline\\)"):
        BenchConfig(contenders=("onnxruntime-demo-fp32",))


class FakeBackend:
    """The demo's builder as far as ``OrtDemo._build`` sees it: sessions that refuse CUDA graphs for ``refusing``."""

    def __init__(self, refusing: set[str], error: str = "This session cannot use the CUDA Graph feature"):
        self.models = {"clip": None, "unet": None, "vae": None}
        self.model_config, self.refusing, self.error, self.calls = {}, refusing, error, 0
        self.sdpa_back = 0

    def build_engines(self, **_):
        self.calls += 1
        for name in self.models:
            self.model_config.setdefault(name, types.SimpleNamespace(use_cuda_graph=True))
        if any(self.model_config[n].use_cuda_graph for n in self.refusing):
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {self.error} as requested by the user")

    def enable_torch_spda(self):
        self.sdpa_back += 1


@pytest.mark.parametrize(
    "refusing, without, calls",
    [(set(), [], 1), ({"clip"}, ["clip"], 2), ({"unet"}, ["clip", "unet", "vae"], 3)],
)
def test_sessions_refused_cuda_graphs_are_opened_again_without(refusing, without, calls):
    backend = FakeBackend(refusing)
    assert ort_demo.OrtDemo._build(types.SimpleNamespace(backend=backend), {}) == without
    assert backend.calls == calls == backend.sdpa_back
    assert [n for n, c in backend.model_config.items() if not c.use_cuda_graph] == without


def test_other_build_failures_are_not_retried():
    backend = FakeBackend({"clip"}, error="out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        ort_demo.OrtDemo._build(types.SimpleNamespace(backend=backend), {})
    assert backend.calls == 1


def test_a_finished_build_replaces_the_older_builds_of_the_same_model(tiny_folder, xl_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path))
    root = tmp_path / "ort-demo"
    older, other_model, unfinished = root / "sd-turbo-old", root / "sd-turbo-xl", root / "sd-turbo-half"
    for folder in (older, other_model, unfinished):
        folder.mkdir(parents=True)
    ort_demo.finish(older, tiny_folder)  # built before the model's files or the libraries changed
    ort_demo.finish(other_model, xl_folder)
    work = ort_demo.prepare_work(tiny_folder)
    ort_demo.finish(work, tiny_folder)
    assert sorted(p.name for p in root.iterdir()) == sorted([work.name, other_model.name, unfinished.name])
    assert json.loads((work / "complete").read_text()) == {"model": str(tiny_folder.resolve())}
    assert ort_demo.prepare_work(tiny_folder) == work and (work / "complete").exists()  # kept: finished

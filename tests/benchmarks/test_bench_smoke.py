"""A CPU smoke run of the benchmark on random:tiny: the output has every field. It asserts structure, never speed."""

from __future__ import annotations

import json

import pytest
from sdturbo.benchmarks import report
from sdturbo.benchmarks.bench import BenchConfig, run

STAGES = {"text_encoder", "unet", "unet_per_step", "vae_decoder", "scheduler", "other"}


@pytest.fixture(scope="module")
def results(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(model="random:tiny", width=64, height=64, steps=2, runs=2, warmup=1, batches=(1, 2), out=str(out))
    res = run(cfg)
    report.write(res, out)
    return res, out


def test_json_has_every_field(results):
    _, out = results
    saved = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert saved["schema"] == 1 and saved["config"]["model"] == "random:tiny"
    assert {"device", "cpu", "cores"} <= saved["machine"].keys()
    assert {"python", "torch", "diffusers", "onnxruntime"} <= saved["versions"].keys()
    assert saved["rates"]["matmul_tflops"] > 0 and saved["rates"]["copy_gbps"] > 0
    assert {"text_encoder", "unet_step", "vae_decoder", "vae_encoder"} == saved["flops"].keys()
    assert all(v["flops"] > 0 and v["params"] > 0 for v in saved["flops"].values())
    names = [c["name"] for c in saved["contenders"]]
    assert names == ["diffusers-fp32", "sdturbo-onnxruntime-fp32"] and saved["reference"] == "diffusers-fp32"
    for c in saved["contenders"]:
        assert c["stages_ms"].keys() >= STAGES
        assert {"median", "p90", "p99", "min", "runs"} <= c["e2e_ms"].keys() and len(c["e2e_ms"]["runs"]) == 2
        assert len(c["warmup_ms"]) == 1 and c["load_s"] >= 0 and c["peak_memory_mb"] > 0
        assert [t["batch"] for t in c["throughput"]] == [1, 2]
        assert all(isinstance(t["images_per_s"], float) for t in c["throughput"])
        assert {"process_s", "import_s", "load_s", "first_image_s"} <= c["cold_start"].keys()
        assert {"text_encoder", "unet_per_step", "vae_decoder", "end_to_end"} <= c["over_floor"].keys()
        assert c["floor_ms"]["end_to_end"] > 0 and c["speedup_vs_reference"] > 0
        assert (out / c["image"]).is_file()
    assert saved["contenders"][0]["psnr_vs_reference_db"] is None  # the reference itself: identical
    ours = saved["contenders"][1]["psnr_vs_reference_db"]
    assert ours is None or ours >= 40  # same weights and latents: the same image (None: identical)


def test_table_and_plot(results):
    res, out = results
    table = report.markdown(res)
    assert res["family"] == "sd-turbo" and table.startswith("SD-Turbo `random:tiny`, 64x64")
    assert "| sdturbo-onnxruntime-fp32 |" in table and "| diffusers-fp32 |" in table
    assert (out / "latency.png").stat().st_size > 1000 and (out / "results.md").is_file()


def test_sdxl_runs_with_the_same_ancestral_noise(xl_folder, tmp_path):
    """SDXL-Turbo, 2 ancestral steps: both contenders add the same per-step noise, so the images agree."""
    cfg = BenchConfig(
        model="random:sdxl-tiny",
        width=64,
        height=64,
        steps=2,
        runs=1,
        warmup=0,
        batches=(1,),
        cold=False,
        out=str(tmp_path),
    )
    res = run(cfg)
    names = [c["name"] for c in res["contenders"]]
    assert names == ["diffusers-fp32", "sdturbo-onnxruntime-fp32"]
    assert res["family"] == "sdxl-turbo" and report.markdown(res).startswith("SDXL-Turbo `random:sdxl-tiny`, 64x64")
    assert res["flops"]["text_encoder"]["params"] > res["flops"]["vae_decoder"]["params"] > 0  # both encoders
    ours = res["contenders"][1]
    assert ours["stages_ms"]["text_encoder"] > 0 and ours["stages_ms"]["unet"] > 0
    assert ours["psnr_vs_reference_db"] is None or ours["psnr_vs_reference_db"] >= 40

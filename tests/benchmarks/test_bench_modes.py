"""`sdturbo bench --modes tiny-vae,prompt-cache` on random:tiny: each mode's contenders against diffusers doing the
same, reported apart from the full-VAE comparison. Structure and same-image checks only, never speed."""

from __future__ import annotations

import pytest
from sdturbo.benchmarks import report
from sdturbo.benchmarks.bench import BenchConfig, run


@pytest.fixture(scope="module")
def results(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-modes")
    cfg = BenchConfig(
        model="random:tiny",
        width=64,
        height=64,
        runs=1,
        warmup=1,
        batches=(),
        contenders=("diffusers-fp32", "sdturbo-onnxruntime-fp32"),
        modes=("tiny-vae", "prompt-cache"),
        paired_runs=1,
        cold=False,
        out=str(out),
    )
    return run(cfg)


def test_each_mode_has_its_own_reference(results):
    by_name = {r["name"]: r for r in results["contenders"]}
    assert list(by_name) == [
        "diffusers-fp32",
        "sdturbo-onnxruntime-fp32",
        "diffusers-fp32-tiny",
        "sdturbo-onnxruntime-tiny-fp32",
        "diffusers-fp32-embeds",
        "sdturbo-onnxruntime-cached-fp32",
    ]
    assert results["reference"] == "diffusers-fp32"
    for name, mode, ref in [
        ("sdturbo-onnxruntime-fp32", "full", "diffusers-fp32"),
        ("sdturbo-onnxruntime-tiny-fp32", "tiny-vae", "diffusers-fp32-tiny"),
        ("sdturbo-onnxruntime-cached-fp32", "prompt-cache", "diffusers-fp32-embeds"),
    ]:
        r = by_name[name]
        assert (r["mode"], r["reference"]) == (mode, ref)
        assert r["speedup_vs_reference"] > 0 and (mode == "full") == ("vs_full_reference" not in r)
        assert r["psnr_vs_reference_db"] is None or r["psnr_vs_reference_db"] >= 40  # the same image as diffusers'
    assert by_name["diffusers-fp32-embeds"]["psnr_vs_reference_db"] is None  # embeds: the same image exactly
    assert by_name["sdturbo-onnxruntime-cached-fp32"]["stages_ms"]["text_encoder"] == 0  # every timed run a hit
    assert by_name["sdturbo-onnxruntime-fp32"]["stages_ms"]["text_encoder"] > 0  # the default: no cache
    assert by_name["sdturbo-onnxruntime-tiny-fp32"]["stages_ms"]["vae_decoder"] > 0  # the tiny decoder, timed
    assert results["flops"]["tiny_vae_decoder"]["flops"] > 0


def test_modes_are_reported_apart(results):
    table = report.markdown(results)
    main, _, rest = table.partition("**")
    assert "| sdturbo-onnxruntime-fp32 |" in main and "-tiny" not in main and "-cached" not in main
    assert "**tiny-vae**" in table and "**prompt-cache**" in table and "| sdturbo-onnxruntime-tiny-fp32 |" in rest
    saved = results["modes"]["prompt-cache"]["saved"]["sdturbo-onnxruntime-cached-fp32"]
    assert saved["vs"] == "sdturbo-onnxruntime-fp32" and saved["text_encoder_ms"] > 0
    assert "run in turn (1 pairs)" in rest and "miss and hit in turn (1 pairs)" in rest


def test_the_targets_are_measured_in_pairs(results):
    tiny, cache = results["paired"]["tiny-vae"], results["paired"]["prompt-cache"]
    assert tiny["ours"] == "sdturbo-onnxruntime-tiny-fp32" and tiny["theirs"] == "diffusers-fp32-tiny"
    assert all(len(v) == 1 for v in tiny["ms"].values()) and tiny["ours_over_theirs_median"] > 0
    assert tiny["full"] == "diffusers-fp32" and tiny["vs_full"]["ours_over_full_median"] > 0
    assert len(cache["ms"]["miss"]) == len(cache["ms"]["hit"]) == 1 and cache["text_encoder_ms_median"] > 0
    assert cache["encode_saved_ms_median"] > 0  # a hit's encode_prompts: the tokenizer and the cache only

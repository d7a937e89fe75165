"""The benchmark's settings are checked before anything loads: a bad value is named with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdturbo.benchmarks.bench import BenchConfig
from sdturbo.engine.cli import main
from sdturbo.engine.errors import InputError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, r"--steps 0 is not allowed; use 1 to 4"),
        ({"batch": 0}, r"--batch 0 is not allowed; give a whole number >= 1"),
        ({"runs": 0}, r"--runs 0 is not allowed"),
        ({"width": 100}, r"--size: width 100 is not allowed; use a positive multiple of 8"),
        ({"height": 0}, r"--size: height 0 is not allowed"),
        ({"warmup": -1}, r"--warmup -1 is not allowed; give a whole number >= 0"),
        ({"batches": (1, 0)}, r"--batches 0 is not allowed"),
        ({"compile_mode": "fast"}, r"--compile-mode 'fast' is not allowed; use one of \('default'"),
        ({"contenders": ("sdturbo-foo-fp16",)}, r"--contenders 'sdturbo-foo-fp16' is not allowed"),
        ({"contenders": ("sdturbo-onnxruntime-cuda-fused-fp16",)}, r"'sdturbo-onnxruntime-cuda-fused-fp16' is not"),
        ({"contenders": ("diffusers-fp8",)}, r"--contenders 'diffusers-fp8' is not allowed"),
        ({"contenders": ("sdturbo-tensorrt-host-fp16",)}, r"'sdturbo-tensorrt-host-fp16' is not allowed"),
        ({"contenders": ("sdturbo-tensorrt-sessiongraphs-fp16",)}, r"'sdturbo-tensorrt-sessiongraphs-fp16' is not"),
        ({"contenders": ("sdturbo-tensorrt-fp32",)}, r"'sdturbo-tensorrt-fp32' is not allowed"),
        ({"contenders": ("sdturbo-onnxruntime-host-fp32",)}, r"'sdturbo-onnxruntime-host-fp32' is not allowed"),
        ({"modes": ("fast",)}, r"--modes fast is not allowed"),
        ({"modes": ("prompt-cache",), "warmup": 0}, r"--warmup 0 is not allowed with prompt-cache contenders; give"),
        ({"contenders": ("sdturbo-onnxruntime-cached-fp32",), "warmup": 0}, r"--warmup 0 is not allowed with prompt"),
        ({"contenders": ("diffusers-fp32-embeds",), "warmup": 0}, r"--warmup 0 is not allowed with prompt-cache"),
        ({"modes": ("prompt-cache",), "warmup": 1}, r"--warmup 1 is not allowed with prompt-cache contenders; give"),
        ({"contenders": ("sdturbo-onnxruntime-cached-fp32",), "warmup": 1}, r"give --warmup 2 or more \(the first"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        BenchConfig(**kwargs)


def test_the_backends_variants_are_the_benchmarks_variants():
    from sdturbo.benchmarks.bench import OUR_CONTENDERS
    from sdturbo.benchmarks.contenders import VARIANTS

    used = {v for variants, _ in OUR_CONTENDERS.values() for v in variants}
    assert used == set(VARIANTS)


def test_every_contender_the_benchmark_knows_is_allowed():
    names = [f"diffusers-{p}{v}" for p in ("fp16", "fp32") for v in ("", "-compile", "-tiny", "-embeds")]
    names += ["sdturbo-tensorrt-fp16", "sdturbo-onnxruntime-fp32", "sdturbo-onnxruntime-tiny-fp32"]
    names += [
        f"sdturbo-onnxruntime-cuda-{v}fp16" for v in ("", "sessiongraphs-", "nhwc-", "unfused-", "host-", "cached-")
    ]
    assert BenchConfig(contenders=tuple(names)).contenders == tuple(names)


@pytest.mark.parametrize("batches", [",", "1,x", "1,,4x"])
def test_bench_batches_that_are_not_numbers_are_named(batches, capsys):
    assert main(["bench", "--model", "random:tiny", "--batches", batches]) == 2
    assert f"--batches {batches!r} is not allowed" in capsys.readouterr().err


def test_no_throughput_sweep_is_an_empty_batches():
    from sdturbo.engine.cli import parse_batches

    assert parse_batches("") == () and parse_batches("1, 4,8") == (1, 4, 8)
    assert BenchConfig(batches=()).batches == ()


@pytest.mark.parametrize(
    "variant, settings",
    [
        ("", {"fused": True, "cuda_graph": True}),
        ("sessiongraphs", {"fused": True, "cuda_graph": "sessions"}),
        ("unfused", {"fused": False, "cuda_graph": True}),
        ("nhwc", {"fused": False, "cuda_graph": True, "nhwc": True}),  # the fused graphs have NhwcConv already
    ],
)
def test_each_onnxruntime_cuda_variant_opens_the_pipeline_it_names(variant, settings, monkeypatch):
    from sdturbo.benchmarks.contenders import Ours
    from sdturbo.benchmarks.timers import StageTimer
    from sdturbo.engine import runtime

    opened = []

    class Opened:
        def load(self):
            return self

    monkeypatch.setattr(runtime, "open_pipeline", lambda *args, **kw: opened.append(kw) or Opened())
    Ours("bundle", "onnxruntime-cuda", "fp16", StageTimer(), variant).load((1, 512, 512), max_batch=4)
    (kw,) = opened
    assert kw == {"shape": (4, 512, 512), "vae": "full", "prompt_cache": 0, **settings}


def test_a_contender_closes_its_pipeline_and_the_sweep_closes_the_latency_one_before_opening(monkeypatch):
    """The pipeline's GPU memory goes back when the contender is done, and TensorRT's latency pipeline goes
    before the sweep's opens (both at once may not fit), not whenever a collection finds it."""
    from sdturbo.benchmarks.contenders import Ours
    from sdturbo.benchmarks.timers import StageTimer
    from sdturbo.engine import runtime

    events = []

    class Opened:  # engines for batch 1 up to ``largest``
        vae, prompt_cache = "full", 0

        def __init__(self, largest: int):
            covers = lambda _, b, h, w: b <= largest  # noqa: E731
            self.profile = type("Profile", (), {"covers": covers, "tag": f"1-{largest}"})()
            events.append(f"open {self.profile.tag}")

        def load(self):
            return self

        def close(self):
            events.append(f"close {self.profile.tag}")

    monkeypatch.setattr(runtime, "open_pipeline", lambda *a, shape, **kw: Opened(shape[0]))
    ours = Ours("bundle", "tensorrt", "fp16", StageTimer())
    ours.load((1, 512, 512))
    assert ours.for_sweep([1, 4], 512, 512) == "1-4"
    ours.close()
    assert events == ["open 1-1", "close 1-1", "open 1-4", "close 1-4"]
    assert ours.pipe is None


def test_a_missing_plotting_library_is_named_before_the_run(monkeypatch, capsys):
    """matplotlib draws the plot after the whole run (many minutes at full size): its absence is named first,
    with the extra that brings it, instead of a traceback once the run is over."""
    import importlib.util

    from sdturbo.benchmarks import bench

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    monkeypatch.setattr(bench, "run", lambda cfg: pytest.fail("the benchmark ran"))
    assert main(["bench", "--model", "random:tiny", "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is missing" in err and "pip install 'sdturbo[export,bench,cpu]'" in err, err


class FakeClock:
    """time.perf_counter under test: it moves only when a fake contender says it has worked."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_measure_counts_the_timed_runs_only_and_throughput_per_image(monkeypatch):
    """Warm-up runs stay out of the statistics; the median, min and percentiles are those of the timed runs; the
    UNet's stage is per step over ``steps``; "other" is the rest of each run; throughput is images (not batches)
    per second, from the median of the 3 timed calls after each batch's warm-up."""
    import time

    import numpy as np
    from sdturbo.benchmarks import bench
    from sdturbo.benchmarks.timers import StageTimer

    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    cfg = BenchConfig(model="random:tiny", width=64, height=64, steps=2, runs=5, warmup=2, batches=(1, 3))
    latency_s = iter([1.0, 0.9, 0.030, 0.010, 0.020, 0.050, 0.040])  # 2 slow warm-ups, then the timed runs
    sweep = [9.0, 1.0, 1.3, 0.9]  # per batch: a slow warm-up, then 3 timed calls (x the batch's own time)
    per_image_s, unet_share = 0.007, 0.4
    timer = StageTimer()
    sweep_calls = []

    class Fake:
        name = "fake"

        def load(self, shape, max_batch=1):
            pass

        def __call__(self, prompts, latents, steps, height, width, step_noise=None):
            seconds = next(latency_s, None)
            if seconds is None:  # the throughput sweep
                seconds = len(prompts) * per_image_s * sweep[len(sweep_calls) % len(sweep)]
                sweep_calls.append((len(prompts), seconds))
            timer.start("unet")
            clock.now += unet_share * seconds
            timer.stop("unet")
            clock.now += (1 - unet_share) * seconds
            return np.zeros((len(prompts), height, width, 3), np.uint8)

    prompts = [cfg.prompt] * cfg.batch
    res = bench.measure(Fake(), cfg, prompts, np.zeros((1, 4, 8, 8), np.float32), timer, "cpu")

    warm, timed = [1e3, 900.0], [30.0, 10.0, 20.0, 50.0, 40.0]
    e = res["e2e_ms"]
    assert res["warmup_ms"] == pytest.approx(warm) and e["runs"] == pytest.approx(timed)
    assert e["median"] == pytest.approx(np.median(timed)) and e["min"] == pytest.approx(min(timed))
    assert e["p90"] == pytest.approx(np.percentile(timed, 90)) and e["p99"] == pytest.approx(np.percentile(timed, 99))
    st = res["stages_ms"]
    assert st["unet"] == pytest.approx(np.median([unet_share * t for t in timed]))
    assert st["unet_per_step"] == pytest.approx(st["unet"] / cfg.steps)
    assert st["other"] == pytest.approx(np.median([(1 - unet_share) * t for t in timed]))
    assert [t["batch"] for t in res["throughput"]] == [1, 3]
    for t in res["throughput"]:
        timed_calls = [s for b, s in sweep_calls if b == t["batch"]][1:]  # the warm-up call left out
        assert len(timed_calls) == 3
        assert t["images_per_s"] == pytest.approx(t["batch"] / np.median(timed_calls))


def fake_bench(monkeypatch, tmp_path, images: dict, medians: dict) -> None:
    """bench.run with every contender faked: ``images``/``medians`` by name; no model, bundle or timing."""
    from sdturbo.benchmarks import bench, floors
    from sdturbo.engine import cache
    from sdturbo.export import models

    class Fake:
        def __init__(self, name):
            self.name = name

        def close(self):
            pass

    def measure(contender, cfg, *args, **kw):
        n = contender.name
        stages = {"text_encoder": 1.0, "unet_per_step": 1.0, "vae_decoder": 1.0}
        return {"name": n, "stages_ms": stages, "e2e_ms": {"median": medians[n]}, "image": images[n]}

    monkeypatch.setattr(cache, "ensure_bundle", lambda *a, **kw: tmp_path / "bundle")
    monkeypatch.setattr(models, "resolve_model_folder", lambda model: tmp_path / "model")
    monkeypatch.setattr(floors, "machine_rates", lambda dev: {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    stage = {"flops": 1e9, "params": 1e6}
    flops = {s: stage for s in ("text_encoder", "unet_step", "vae_decoder", "vae_encoder")}
    monkeypatch.setattr(floors, "stage_flops", lambda *a: dict(flops))
    monkeypatch.setattr(bench, "device", lambda: "cpu")
    monkeypatch.setattr(bench, "make", lambda name, *a, **kw: Fake(name))
    monkeypatch.setattr(bench, "measure", measure)


def test_each_contender_s_psnr_is_against_its_mode_s_first_contender(monkeypatch, tmp_path):
    """The reference of each mode is its first contender: PSNR is that image against the reference's (null for
    the reference itself), never a contender against itself or against the one before it."""
    import numpy as np
    from sdturbo.benchmarks import bench
    from sdturbo.engine.images import psnr

    names = ("diffusers-fp32", "sdturbo-onnxruntime-fp32", "sdturbo-onnxruntime-unfused-fp32")
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    images = {names[0]: reference}
    for name, noise in zip(names[1:], (3, 9), strict=True):
        images[name] = np.clip(reference.astype(int) + rng.integers(-noise, noise + 1, reference.shape), 0, 255)
        images[name] = images[name].astype(np.uint8)
    medians = {names[0]: 100.0, names[1]: 40.0, names[2]: 50.0}
    fake_bench(monkeypatch, tmp_path, images, medians)
    cfg = BenchConfig(model="random:tiny", width=64, height=64, contenders=names, cold=False, out=str(tmp_path / "o"))
    res = bench.run(cfg)

    by_name = {r["name"]: r for r in res["contenders"]}
    assert res["reference"] == names[0] and by_name[names[0]]["psnr_vs_reference_db"] is None
    for name in names[1:]:
        r = by_name[name]
        assert r["psnr_vs_reference_db"] == pytest.approx(psnr(images[name], reference))
        assert r["speedup_vs_reference"] == pytest.approx(medians[names[0]] / medians[name])


def test_a_cache_hit_s_text_encoder_has_no_floor_to_be_over(monkeypatch, tmp_path):
    """The prompt-cache contenders' text encoder floor is 0 (a hit runs none): a text encoder stage timed there
    anyway is left out of ``over_floor`` instead of dividing by zero after every run."""
    import numpy as np
    from sdturbo.benchmarks import bench

    names = ["diffusers-fp32", "sdturbo-onnxruntime-fp32"]
    names += ["diffusers-fp32-embeds", "sdturbo-onnxruntime-cached-fp32"]
    image = np.zeros((1, 64, 64, 3), np.uint8)
    fake_bench(monkeypatch, tmp_path, dict.fromkeys(names, image), dict.fromkeys(names, 10.0))
    cfg = BenchConfig(
        model="random:tiny",
        contenders=tuple(names[:2]),
        modes=("prompt-cache",),
        cold=False,
        paired_runs=0,
        out=str(tmp_path / "o"),
    )
    res = bench.run(cfg)
    by_name = {r["name"]: r for r in res["contenders"]}
    assert sorted(by_name) == sorted(names)
    for name in names[2:]:
        assert by_name[name]["floor_ms"]["text_encoder"] == 0 and "text_encoder" not in by_name[name]["over_floor"]
        assert by_name[name]["over_floor"]["unet_per_step"] == pytest.approx(
            1.0 / by_name[name]["floor_ms"]["unet_step"]
        )
    assert by_name[names[0]]["over_floor"]["text_encoder"] > 0


def test_a_run_without_out_writes_a_folder_of_its_own(monkeypatch, tmp_path, capsys):
    """``sdturbo bench`` without ``--out``: each run gets a new ``benchmarks/results/run-<UTC time>`` under the
    working directory (``-2`` for a second one in the same second), and an earlier run's files are left as they
    were, never overwritten or mixed with the new images."""
    import json
    import time

    import numpy as np
    from sdturbo.benchmarks import report
    from sdturbo.export import models

    names = ("diffusers-fp32", "sdturbo-onnxruntime-fp32")
    image = np.zeros((1, 64, 64, 3), np.uint8)
    fake_bench(monkeypatch, tmp_path, dict.fromkeys(names, image), dict.fromkeys(names, 10.0))
    monkeypatch.setattr(report, "markdown", lambda results: "table")  # the fakes' records are not whole
    monkeypatch.setattr(report, "plot", lambda results, path: path.write_bytes(b"plot"))
    monkeypatch.setattr(time, "gmtime", lambda *a: time.struct_time((2026, 11, 24, 2, 3, 4, 1, 328, 0)))
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--model", "random:tiny", "--size", "64x64", "--contenders", ",".join(names), "--no-cold"]
    results = tmp_path / "benchmarks" / "results"
    earlier = results / "run-20261124-020304"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text("earlier")
    main(argv)
    main(argv)
    assert (earlier / "results.json").read_text() == "earlier" and sorted(p.name for p in earlier.iterdir()) == [
        "results.json"
    ]
    for name in ("run-20261124-020304-2", "run-20261124-020304-3"):
        saved = json.loads((results / name / "results.json").read_text())
        assert saved["config"]["out"] == str(Path("benchmarks/results") / name)
        assert {"results.md", "latency.png", f"{names[1]}.png"} <= {p.name for p in (results / name).iterdir()}
    assert sorted(p.name for p in results.iterdir()) == [earlier.name, *(f"{earlier.name}-{n}" for n in (2, 3))]

    def missing(model):
        raise InputError(f"model folder {model} does not exist")

    monkeypatch.setattr(models, "resolve_model_folder", missing)  # a run that fails before writing anything
    assert main(argv) == 2
    assert sorted(p.name for p in results.iterdir()) == [earlier.name, *(f"{earlier.name}-{n}" for n in (2, 3))]


def test_cold_start_times_each_phase_from_the_process_start(monkeypatch, capsys):
    """benchmarks/cold.py on a fake clock: import, load and first image each measured from where the one before
    ended, the whole from the process start; the size is WIDTHxHEIGHT, as everywhere else; the pipeline is
    loaded for, and makes its first images at, the benchmark's batch and size."""
    import json
    import types

    from sdturbo.benchmarks import cold, contenders

    calls = []

    class Fake:
        def __init__(self, path, backend, precision, timer):
            calls.append(("made", path, backend, precision))

        def load(self, shape=None):
            calls.append(("load", shape))

        def __call__(self, prompts, latents, steps, height, width):
            calls.append((prompts, latents.shape, steps, height, width))

    clock = iter([3.0, 5.0, 9.5])  # after the import (the contender made), after load, after the first image
    monkeypatch.setattr(cold, "T0", 0.0)
    monkeypatch.setattr(cold, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(contenders, "Ours", Fake)
    cold.main(["ours", "bundle", "onnxruntime", "fp32", "64x32", "2", "3"])
    assert json.loads(capsys.readouterr().out) == {
        "import_s": 3.0,
        "load_s": 2.0,
        "first_image_s": 4.5,
        "in_process_s": 9.5,
    }
    assert calls == [
        ("made", "bundle", "onnxruntime", "fp32"),
        ("load", (3, 32, 64)),
        (["a photo of a cat"] * 3, (3, 4, 4, 8), 2, 32, 64),
    ]


def test_a_stage_s_floor_is_its_slower_bound():
    """max(FLOPs / matmul rate, weight bytes / copy bandwidth), in ms (benchmarks/floors.py's doc)."""
    from sdturbo.benchmarks.floors import floor_ms

    rates = {"matmul_tflops": 2.0, "copy_gbps": 100.0}
    assert floor_ms(4e12, 1e9, rates) == pytest.approx(2000.0)  # compute-bound: 4 TFLOP at 2 TFLOP/s
    assert floor_ms(1e9, 50e9, rates) == pytest.approx(500.0)  # memory-bound: 50 GB at 100 GB/s


def test_machine_rates_count_two_flops_per_multiply_add_and_a_copy_s_read_and_write(monkeypatch):
    """On a fake clock (every timed call 0.5 s): an n x n matmul is 2 n^3 FLOPs; a copy of B bytes moves 2 B."""
    from sdturbo.benchmarks import floors

    monkeypatch.setattr(floors, "_best", lambda fn, cuda, repeats: 0.5)
    rates = floors.machine_rates("cpu")
    assert rates["matmul_tflops"] == pytest.approx(2 * 2048**3 / 0.5 / 1e12) and rates["matmul_dtype"] == "float32"
    assert rates["copy_gbps"] == pytest.approx(2 * 256 * 2**20 / 0.5 / 1e9)


def test_stage_flops_are_the_model_s_own_at_the_benchmark_s_size(tiny_folder):
    """What stage_flops counts on the meta device is what the model's own modules do at that size: the VAE works
    on latents of an eighth of each side; its decoder stage reads the decoder's weights, its encoder's the
    encoder's."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor
    from sdturbo.benchmarks.floors import stage_flops
    from torch.utils.flop_counter import FlopCounterMode

    got = stage_flops(tiny_folder, 2, 64, 96)
    vae = AutoencoderKL.from_pretrained(tiny_folder / "vae").eval()
    vae.set_attn_processor(AttnProcessor())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(torch.zeros(2, 4, 64 // 8, 96 // 8))
    assert got["vae_decoder"]["flops"] == counter.get_total_flops() > 0
    decoder = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters())
    assert got["vae_decoder"]["params"] == decoder
    assert got["vae_decoder"]["params"] + got["vae_encoder"]["params"] == sum(p.numel() for p in vae.parameters())


def test_a_results_folder_that_cannot_be_made_is_named_before_the_run(monkeypatch, tmp_path, capsys):
    """--out naming a file, or a working directory where the default folder cannot be made (read-only): one line
    naming it and what to give, exit 2, before any model loads or contender runs."""
    import errno

    import numpy as np
    from sdturbo.benchmarks import bench, report

    names = ("diffusers-fp32", "sdturbo-onnxruntime-fp32")
    fake_bench(monkeypatch, tmp_path, dict.fromkeys(names, np.zeros((1, 8, 8, 3), np.uint8)), dict.fromkeys(names, 1.0))
    monkeypatch.setattr(bench, "make", lambda *a, **kw: pytest.fail("a contender ran"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(b"png")
    argv = ["bench", "--model", "random:tiny", "--size", "64x64", "--contenders", ",".join(names), "--no-cold"]
    assert main([*argv, "--out", "cat.png"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sdturbo: error: cat.png is a file, not a folder; give --out a folder for the results"
    )
    assert (tmp_path / "cat.png").read_bytes() == b"png"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if not self.is_absolute():  # (the working directory's: read-only)
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "sdturbo: error: benchmarks/results cannot be written (without --out: under the working directory) "
        "(Read-only file system); give --out a folder you can write"
    )
    assert main([*argv, "--out", "r"]) == 2
    assert "r cannot be written (Read-only file system); give --out a folder you can write" in capsys.readouterr().err
    monkeypatch.undo()
    (tmp_path / "ro").mkdir()
    real_temporary_file = report.tempfile.TemporaryFile

    def read_only_folder(*args, dir=None, **kwargs):  # an existing folder that cannot be written
        if dir is not None and Path(dir).name == "ro":
            raise OSError(errno.EACCES, "Permission denied")
        return real_temporary_file(*args, dir=dir, **kwargs)

    fake_bench(monkeypatch, tmp_path, {}, {})
    monkeypatch.setattr(bench, "make", lambda *a, **kw: pytest.fail("a contender ran"))
    monkeypatch.setattr(report.tempfile, "TemporaryFile", read_only_folder)
    assert main([*argv, "--out", str(tmp_path / "ro")]) == 2
    assert "ro cannot be written (Permission denied); give --out" in capsys.readouterr().err


def test_the_other_benchmarks_name_an_out_that_is_a_file_before_they_start(tmp_path, monkeypatch, capsys):
    """gpu_check and serve_load check --out as bench does: a file is one line, before anything runs."""
    from sdturbo.benchmarks import gpu_check, serve_load
    from sdturbo.engine import cache

    file = tmp_path / "cat.png"
    file.write_bytes(b"png")
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **kw: pytest.fail("a step ran"))
    assert gpu_check.main(["--out", str(file), "--skip", "device,probe"]) == 2
    err = capsys.readouterr().err.strip()
    want = f"{file} is a file, not a folder; give --out a folder for the results"
    assert err == f"python -m sdturbo.benchmarks.gpu_check: error: {want}"
    monkeypatch.setattr(cache, "ensure_bundle", lambda *a, **kw: pytest.fail("the model was exported"))
    with pytest.raises(InputError, match=f"^{file} is a file, not a folder"):
        serve_load.run(serve_load.LoadConfig(model="random:tiny", out=str(file)))
    assert file.read_bytes() == b"png"


def test_the_reference_is_diffusers_wherever_it_is_listed(monkeypatch, tmp_path):
    """``--contenders ours,diffusers``: diffusers still runs first and is the reference (README: speedups are
    against diffusers), each mode's contenders together."""
    import numpy as np
    from sdturbo.benchmarks import bench

    names = ("sdturbo-onnxruntime-fp32", "sdturbo-onnxruntime-unfused-fp32", "diffusers-fp32")
    image = np.zeros((1, 64, 64, 3), np.uint8)
    medians = {names[0]: 40.0, names[1]: 50.0, names[2]: 100.0}
    fake_bench(monkeypatch, tmp_path, dict.fromkeys(names, image), medians)
    cfg = BenchConfig(model="random:tiny", width=64, height=64, contenders=names, cold=False, out=str(tmp_path / "o"))
    res = bench.run(cfg)
    assert [r["name"] for r in res["contenders"]] == [names[2], names[0], names[1]]
    assert res["reference"] == "diffusers-fp32"
    by_name = {r["name"]: r for r in res["contenders"]}
    assert by_name[names[0]]["speedup_vs_reference"] == pytest.approx(100.0 / 40.0)


def test_stages_are_the_median_runs_and_memory_is_read_before_the_sweep(monkeypatch):
    """The stage columns are one run's, the median one's, so they add up to its time (separate medians of each
    stage did not); the peak memory covers load and the latency runs, not the throughput sweep's larger batches;
    a prompt-cache contender's sweep warms up twice per batch (a miss, then a hit) before its 3 timed calls."""
    import time

    import numpy as np
    from sdturbo.benchmarks import bench
    from sdturbo.benchmarks.timers import StageTimer

    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    sweep_calls = []

    class Mem:
        start_mb = 7.0

        def __init__(self, dev):
            pass

        def peak_mb(self):
            return 100.0 + len(sweep_calls)  # grows with every sweep call

    monkeypatch.setattr(bench, "Memory", Mem)
    cfg = BenchConfig(model="random:tiny", width=64, height=64, steps=1, runs=5, warmup=2, batches=(1, 2))
    # (unet ms, vae ms) per run: 2 warm-ups, then 5 timed runs whose stage medians come from different runs
    runs = iter([(9, 9), (9, 9), (10, 50), (30, 10), (20, 20), (50, 5), (5, 40)])
    timer = StageTimer()

    class Fake:
        name = "sdturbo-onnxruntime-cached-fp32"

        def load(self, shape, max_batch=1):
            pass

        def __call__(self, prompts, latents, steps, height, width, step_noise=None):
            unet, vae = next(runs, (1, 1))
            for name, ms in (("unet", unet), ("vae_decoder", vae)):
                timer.start(name)
                clock.now += ms / 1e3
                timer.stop(name)
            clock.now += 0.002  # 2 ms of the rest
            return np.zeros((len(prompts), height, width, 3), np.uint8)

    fake = Fake()
    calls = []
    original = Fake.__call__

    def counting(self, prompts, *a, **kw):
        calls.append(len(prompts))
        if len(calls) > cfg.warmup + cfg.runs:
            sweep_calls.append(len(prompts))
        return original(self, prompts, *a, **kw)

    monkeypatch.setattr(Fake, "__call__", counting)
    res = bench.measure(fake, cfg, [cfg.prompt], np.zeros((1, 4, 8, 8), np.float32), timer, "cpu")
    e2e, st = res["e2e_ms"]["runs"], res["stages_ms"]
    assert e2e == pytest.approx([62.0, 42.0, 42.0, 57.0, 47.0]) and res["e2e_ms"]["median"] == pytest.approx(47.0)
    # the median run is the last (5 + 40 + 2 ms): its stages, which add up to its 47 ms
    assert (st["unet"], st["vae_decoder"], st["other"]) == pytest.approx((5.0, 40.0, 2.0))
    assert st["unet"] + st["vae_decoder"] + st["other"] + st["text_encoder"] + st["scheduler"] == pytest.approx(47.0)
    assert res["peak_memory_mb"] == 100.0 and res["memory_at_start_mb"] == 7.0
    assert sweep_calls == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]  # per batch: 2 warm-ups, 3 timed


def test_median_run_takes_the_faster_of_the_two_middle_runs():
    from sdturbo.benchmarks.bench import median_run

    assert median_run([30.0, 10.0, 20.0]) == 2
    assert median_run([40.0, 10.0, 30.0, 20.0]) == 3
    assert median_run([5.0]) == 0


@pytest.mark.parametrize(
    "name, encode", [("sdturbo-onnxruntime-cuda-fp16", True), ("sdturbo-onnxruntime-cuda-cached-fp16", False)]
)
def test_a_device_pipeline_s_stages_are_its_median_eager_run_s_without_text_encoders_for_a_hit(name, encode):
    """A device pipeline's stages come from eager runs: the median one's (they add up to its total); a
    prompt-cache contender's timed runs are hits (no text encoders), and so are its eager runs."""
    import types

    import numpy as np
    from sdturbo.benchmarks.bench import device_stage_times

    asked = []
    runs = iter([(3.0, 9.0, 1.0), (3.0, 2.0, 9.0), (3.0, 4.0, 2.0)])  # totals 13.5, 14.5, 9.5: the first is the median

    class Pipe:
        def request(self, prompts, **kw):
            return "req"

        def stage_times(self, req, encode=True):
            asked.append(encode)
            text, unet, vae = next(runs)
            return {"text_encoder": text if encode else 0.0, "unet": unet, "vae_decoder": vae, "other": 0.5}

    contender = types.SimpleNamespace(name=name, pipe=Pipe())
    cfg = BenchConfig(model="random:tiny", runs=3)
    st = device_stage_times(contender, ["x"], np.zeros((1, 4, 8, 8), np.float32), cfg)
    assert asked == [encode] * 3
    assert (st["text_encoder"], st["unet"], st["vae_decoder"]) == (3.0 if encode else 0.0, 9.0, 1.0)
    assert st["eager_total"] == pytest.approx(st["text_encoder"] + 9.0 + 1.0 + 0.5)


def test_the_table_names_what_failed_with_as_many_cells_as_its_header():
    from sdturbo.benchmarks import report

    ok = {
        "name": "sdturbo-onnxruntime-fp32",
        "e2e_ms": {"median": 10.0, "p90": 11.0, "p99": 12.0},
        "speedup_vs_reference": 2.0,
        "stages_ms": {"text_encoder": 1.0, "unet_per_step": 5.0, "vae_decoder": 3.0, "scheduler": 0.0, "other": 1.0},
        "over_floor": {"end_to_end": 3.0},
        "load_s": 1.0,
        "cold_start": {"error": "BundleError: larger than this pipeline's buffers"},
        "peak_memory_mb": 900.0,
        "memory_at_start_mb": 450.0,
        "psnr_vs_reference_db": None,
        "floor_ms": {"end_to_end": 1.0},
        "throughput": [{"batch": 1, "images_per_s": 2.0}, {"batch": 8, "images_per_s": None, "error": "OOM: no"}],
    }
    results = {
        "config": {"model": "random:tiny", "width": 64, "height": 64, "steps": 1, "batch": 1, "runs": 5, "warmup": 2},
        "machine": {"device": "cpu", "cpu": "x86_64", "cores": 2},
        "rates": {"matmul_tflops": 1.0, "matmul_dtype": "float32", "copy_gbps": 1.0},
        "reference": "diffusers-fp32",
        "contenders": [ok],
        "failed": [{"name": "diffusers-fp32", "error": "RuntimeError: no"}],
    }
    table = report.markdown(results).splitlines()
    header = next(line for line in table if line.startswith("| contender | e2e"))
    row = next(line for line in table if line.startswith("| sdturbo-onnxruntime-fp32 |"))
    failed = next(line for line in table if line.startswith("| diffusers-fp32 |"))
    assert header.count("|") == row.count("|") == failed.count("|")
    assert "| failed | 900 (450) |" in row
    assert "cold start failed: sdturbo-onnxruntime-fp32: BundleError: larger than this pipeline's buffers" in table
    assert "| sdturbo-onnxruntime-fp32 | 8 | failed: OOM: no |" in table

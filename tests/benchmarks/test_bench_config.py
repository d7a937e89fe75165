"""The benchmark's settings are checked before anything loads: a bad value is named with what is allowed."""

from __future__ import annotations

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

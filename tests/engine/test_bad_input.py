"""Bad requests get an InputError that names the value, before any stage runs; the CLI exits 2 without a traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import InputError
from sdturbo.engine.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline(tiny_bundle, OnnxRuntimeBackend())


CASES = [
    (dict(prompts=["x"], width=100), r"width 100 .*multiple of 8"),
    (dict(prompts=["x"], height=0), r"height 0"),
    (dict(prompts=["x"], steps=0), r"steps=0 .*1 to 4"),
    (dict(prompts=["x"], steps=5), r"steps=5 .*1 to 4"),
    (dict(prompts=["x"], steps=1, strength=0.5, image=np.zeros((64, 64, 3), np.uint8)), r"1 \* 0.5 .*at least 1"),
    (dict(prompts=["x"], steps=2, strength=1.5, image=np.zeros((64, 64, 3), np.uint8)), r"strength=1.5"),
    (  # 0 is out of range, not "runs no step" (no step count would make it run one)
        dict(prompts=["x"], steps=4, strength=0.0, image=np.zeros((64, 64, 3), np.uint8)),
        r"^strength=0.0 is not allowed; use a number in \(0, 1\]$",
    ),
    (dict(prompts=[]), r"prompt list is empty"),
    (dict(prompts=[None]), r"prompts must be strings"),
    (
        dict(prompts=["x"], latents=np.zeros((1, 4, 8, 9), np.float32)),
        r"latents has shape \(1, 4, 8, 9\).*\(1, 4, 8, 8\)",
    ),
    (dict(prompts=["x", "y"], latents=np.zeros((1, 4, 8, 8), np.float32)), r"latents has shape"),
    (dict(prompts=["x"], latents=np.full((1, 4, 8, 8), np.nan, np.float32)), r"NaN"),
    (dict(prompts=["x"] * 5), r"batch 5 .*max_batch 4"),
    (dict(prompts=["x"], width=512), r"width 512 .*range 32-256"),
    (dict(prompts=["x"], image=np.zeros((32, 32, 3), np.uint8)), r"image has shape \(1, 32, 32, 3\).*\(1, 64, 64, 3\)"),
    (dict(prompts=["x"], seed=-1), r"seed -1"),
    (dict(prompts=["x"], strength=0.3), r"strength=0.3 is for img2img; give an image too"),  # txt2img ignored it
    (dict(prompts=["x"], image_noise=np.zeros((1, 4, 8, 8), np.float32)), r"^image_noise is only used with an image"),
    (dict(prompts=["x"], seed=True), r"seed True is not allowed"),  # (a bool is an int to Python)
    (dict(prompts=["x", "y"], seed=[1, False]), r"seed False is not allowed"),
    (dict(prompts=b"a cat"), r"prompts must be strings; got bytes b'a cat': decode them first"),
    (dict(prompts=None), r"prompts must be a string or a list of strings; got NoneType None"),
    (dict(prompts=5), r"prompts must be a string or a list of strings; got int 5"),
    (dict(prompts={"a cat": 1}), r"prompts must be a string or a list of strings; got dict"),  # (not its keys)
    (dict(prompts={"a cat"}), r"prompts must be a string or a list of strings; got set"),  # (no order)
    (  # shown with every digit, not as the 0.25 it is told to reach
        dict(prompts=["x"], steps=4, strength=0.2499999999, image=np.zeros((64, 64, 3), np.uint8)),
        r"4 \* 0.2499999999 = 0.9999999996 runs no step",
    ),
]


@pytest.mark.parametrize("kwargs,match", CASES, ids=[c[1][:24] for c in CASES])
def test_request_errors_name_the_value(pipe, kwargs, match):
    kwargs = {"height": 64, "width": 64, **kwargs}
    with pytest.raises(InputError, match=match):
        pipe.request(kwargs.pop("prompts"), **kwargs)


def test_numpy_numbers_are_taken_as_python_numbers(pipe):
    """A strength or seed read from an array is a numpy scalar: taken as the same Python number."""
    image = np.zeros((64, 64, 3), np.uint8)
    for strength in (np.int64(1), np.float32(0.5), np.float64(0.5)):
        req = pipe.request("x", steps=2, strength=strength, image=image, seed=np.int64(3))
        assert req.strength == strength and req.seed == 3


def test_pipeline_stays_usable_after_bad_requests(pipe):
    with pytest.raises(InputError):
        pipe(["x"], height=64, width=63)
    assert pipe(["x"], height=64, width=64).shape == (1, 64, 64, 3)


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sdturbo.engine.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize(
    "args,match",
    [
        (["--size", "100x64"], "width 100"),
        (["--steps", "9"], "steps=9"),
        (["--size", "64x64", "--latents", "missing.npy"], "cannot read --latents"),
        (["--size", "64x64", "--strength", "0.5"], "--strength is for img2img"),
        (["--size", "sixty"], "is not WIDTHxHEIGHT"),
    ],
)
def test_cli_errors_are_one_line(tiny_bundle, args, match):
    r = run_cli("generate", "a cat", "--bundle", str(tiny_bundle), *args)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_bundle(tmp_path, tiny_bundle):
    r = run_cli("generate", "a cat", "--bundle", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("info", str(tiny_bundle / "onnx"))  # a folder of a bundle, not the bundle: not "export it again"
    assert r.returncode == 2 and f"is a folder inside the bundle {tiny_bundle.resolve()};" in r.stderr, r.stderr
    (tmp_path / "file.png").write_bytes(b"not a bundle")
    r = run_cli("info", str(tmp_path / "file.png"))
    assert r.returncode == 2 and "is a file, not a bundle folder" in r.stderr and "Traceback" not in r.stderr


def test_cli_error_leaves_cache_intact(tiny_bundle, tmp_path):
    """A bad request against a cached model fails cleanly; the cached bundle still opens and works."""
    import os

    from sdturbo.engine.cache import bundle_dir_for

    good = ("generate", "a cat", "--model", "random:tiny", "--size", "64x64", "--out")
    assert run_cli(*good, str(tmp_path / "first.png"), env=dict(os.environ)).returncode == 0  # cached now
    r = run_cli("generate", "a cat", "--model", "random:tiny", "--size", "64x60", env=dict(os.environ))
    assert r.returncode == 2 and "height 60" in r.stderr
    cached = bundle_dir_for("random:tiny")
    assert Bundle(cached).precisions == ("fp32",)
    out = tmp_path / "ok.png"
    r = run_cli(*good, str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file()


def test_a_model_folder_and_a_bundle_given_the_other_s_way_name_the_right_flag(tiny_folder, tiny_bundle, capsys):
    """--bundle with a diffusers model folder, --model with a bundle: the error says which flag takes it."""
    from sdturbo.engine.cli import main

    assert main(["generate", "a cat", "--bundle", str(tiny_folder), "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_folder} is a diffusers model folder, not a bundle: give it with --model" in err, err
    assert main(["generate", "a cat", "--model", str(tiny_bundle), "--size", "64x64"]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_bundle} is an sdturbo bundle (exported already), not a model folder: run it with" in err, err
    assert f"`sdturbo generate --bundle {tiny_bundle}`" in err


def test_a_precision_the_bundle_lacks_names_the_one_it_has(tiny_bundle, tmp_path, capsys):
    """generate with a bundle exported in fp16 only, run in fp32 (the CPU's default): export fp32, or run the fp16
    it has. Where the precision is not the user's choice (sdturbo check, build) only the first is said."""
    import json
    import shutil

    from sdturbo.engine.bundle import MANIFEST
    from sdturbo.engine.cli import main
    from sdturbo.engine.errors import BundleError

    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["components"] = {"fp16": manifest["components"]["fp16"]}
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert main(["generate", "a cat", "--bundle", str(path), "--size", "64x64", "--backend", "onnxruntime"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sdturbo: error: bundle {path} has no fp32 ONNX (it has: fp16); export it with --precision fp32, or run it "
        f"with --precision fp16 (fp16 is slow on a CPU)"
    )
    with pytest.raises(BundleError, match=r"has no fp32 ONNX \(it has: fp16\); export it with --precision fp32$"):
        Bundle(path).component("fp32", "unet")


@pytest.mark.parametrize(
    "seed", [np.uint64(3), np.uint32(3), np.int64(3), np.array(3), np.array(3, np.uint64)], ids=lambda s: repr(s)
)
def test_numpy_seeds_are_their_integers(pipe, seed):
    """A numpy integer, unsigned included (numpy 1 makes ``uint64 + int`` a float, which no generator takes), or
    a 0-d array, is the seed it holds; a batch's seeds as numpy unsigned integers too."""
    want = pipe(["x"], height=64, width=64, seed=3)
    np.testing.assert_array_equal(pipe(["x"], height=64, width=64, seed=seed), want)
    batch = pipe(["x", "x"], height=64, width=64, seed=np.array([5, 3], np.uint64))
    np.testing.assert_array_equal(batch[1], want[0])


def test_img2img_without_a_size_takes_the_image_s(pipe):
    """pipe(prompt, image=...) with no height/width: the image's size, as `generate --image` and serve take it
    (it was 512x512, and the 64x64 image was refused as not 512x512)."""
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    got = pipe("x", image=image, seed=2)
    assert got.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(got, pipe("x", image=image, seed=2, height=64, width=64))
    with pytest.raises(InputError, match=r"image has shape \(1, 64, 64, 3\).*\(1, 64, 128, 3\)"):
        pipe("x", image=image, width=128)  # a size given is still the request's, and checked against the image


def test_open_pipeline_names_a_precision_that_is_not_one(tiny_bundle):
    """precision='bf16' is not "missing from the bundle" (export it with --precision bf16, no such option)."""
    from sdturbo.engine.runtime import open_pipeline

    with pytest.raises(InputError, match=r"^precision 'bf16' is not allowed; use 'fp32' or 'fp16'"):
        open_pipeline(tiny_bundle, "onnxruntime", precision="bf16")


def test_a_component_named_twice_is_done_once(tiny_bundle):
    assert Bundle(tiny_bundle).select_components(("unet", "text_encoder", "unet")) == ("unet", "text_encoder")

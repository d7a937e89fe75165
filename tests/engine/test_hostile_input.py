"""Hostile input: every case gets one line naming the value and what is allowed (exit 2 from the CLI), before
any generation work; nothing is silently accepted or silently changed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sdturbo.engine import cli, images
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import BundleError, InputError
from sdturbo.engine.images import load_image
from sdturbo.engine.pipeline import Pipeline
from sdturbo.engine.request import Request


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline(tiny_bundle, OnnxRuntimeBackend())


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if the CLI gets as far as opening a pipeline: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("generation started before the input was checked")

    monkeypatch.setattr("sdturbo.engine.runtime.open_pipeline", refuse)


def generate(capsys, tiny_bundle, *args) -> tuple[int, str]:
    """``sdturbo generate`` in this process: (exit status, stderr)."""
    rc = cli.main(["generate", "a cat", "--bundle", str(tiny_bundle), *args])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sdturbo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def unprivileged(cmd: list) -> list:
    """``cmd`` run so that file permissions apply to it: as is for a user, without root's override for root."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]


def run_cli(*args, env=None, as_user=False):
    cmd = [sys.executable, "-m", "sdturbo.engine.cli", *args]
    return subprocess.run(
        unprivileged(cmd) if as_user else cmd, capture_output=True, env=env, timeout=300, text=True, errors="replace"
    )


# -- prompts ---------------------------------------------------------------------------------------------


def test_invalid_utf8_prompt_on_the_command_line(tiny_bundle):
    """argv bytes that are not UTF-8 reach Python as surrogate escapes; tokenizers raised a TypeError on them."""
    r = run_cli("generate", "ok", os.fsencode("a \udcffcat"), "--bundle", str(tiny_bundle), "--size", "64x64")
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert "prompt 1" in line and "UTF-8" in line and r"\xff" in line, line


@pytest.mark.parametrize("prompt", ["a \udcffcat", "lone \ud800 surrogate"])
def test_invalid_utf8_prompt_in_python(pipe, prompt):
    with pytest.raises(InputError, match=r"prompt 0 .*not valid UTF-8"):
        pipe.request([prompt], height=64, width=64)


# -- sizes and batch --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,match", [("0x0", "width 0"), ("0x64", "width 0"), ("64x0", "height 0"), ("-64x64", "width -64")]
)
@pytest.mark.parametrize("attached", [True, False], ids=["--size=S", "--size S"])
def test_size_zero_or_negative_is_refused(capsys, tiny_bundle, no_generation, size, match, attached):
    """0 was taken as 'not given': 0x0 gave 512x512 and 0x64 gave 512x64. A size starting with a dash, given
    apart (``--size -64x64``), got argparse's "expected one argument" instead of what is wrong with it."""
    rc, err = generate(capsys, tiny_bundle, *([f"--size={size}"] if attached else ["--size", size]))
    line = one_line(err)
    assert rc == 2 and f"--size {size!r}" in line and match in line and "positive" in line, line


@pytest.mark.parametrize("batch", ["0", "-2"])
def test_batch_below_one_is_named(capsys, tiny_bundle, no_generation, batch):
    rc, err = generate(capsys, tiny_bundle, "--size", "64x64", "--batch", batch)
    line = one_line(err)
    assert rc == 2 and f"--batch {batch}" in line and "1 or more" in line, line


# -- latents and noise ------------------------------------------------------------------------------------

LATENT = (1, 4, 8, 8)  # a 64x64 request


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(LATENT, np.int64),
        np.zeros(LATENT, np.uint8),
        np.zeros(LATENT, np.complex64),
        np.zeros(LATENT, "datetime64[s]"),
        np.zeros(LATENT, bool),
        np.full(LATENT, "a"),
        np.zeros(LATENT, object),
    ],
    ids=lambda a: str(a.dtype),
)
@pytest.mark.parametrize("name", ["latents", "image_noise"])
def test_noise_of_a_non_float_dtype_is_refused(pipe, name, array):
    kwargs = {name: array}
    if name == "image_noise":
        kwargs.update(image=np.zeros((64, 64, 3), np.uint8), steps=2)
    with pytest.raises(InputError, match=rf"{name} has dtype {re.escape(str(array.dtype))}; .*float"):
        pipe.request(["x"], height=64, width=64, **kwargs)


def test_step_noise_is_checked_like_latents(xl_bundle):
    xl = Pipeline(xl_bundle, OnnxRuntimeBackend())
    for bad, match in [
        (np.zeros((2, *LATENT), np.int32), "step_noise has dtype int32"),
        (np.full((2, *LATENT), np.inf, np.float32), "step_noise holds NaN or infinite"),
        (np.full((2, *LATENT), 1e30, np.float32), "step_noise holds a value of 1e\\+30"),
    ]:
        with pytest.raises(InputError, match=match):
            xl.request(["x"], height=64, width=64, steps=2, step_noise=bad)


def test_noise_magnitude_bound(pipe):
    """Unit-variance noise never reaches the bound; at it is allowed, just past it and 1e30 are refused."""
    bound = np.float32(100)  # engine/request.py MAX_NOISE, documented in the README
    pipe.request(["x"], height=64, width=64, latents=np.full(LATENT, -bound, np.float32))
    for value in (np.nextafter(bound, np.float32(np.inf)), 1e30, -1e30):
        latents = np.zeros(LATENT, np.float32)
        latents[0, 1, 2, 3] = value
        with pytest.raises(InputError, match=r"latents holds a value of -?1\S* .*\|x\| <= 100"):
            pipe.request(["x"], height=64, width=64, latents=latents)


@pytest.mark.parametrize(
    "array,match",
    [
        (np.full(LATENT, "abc"), "latents has dtype <U3"),
        (np.zeros(LATENT, np.int64), "latents has dtype int64"),
        (np.full(LATENT, 1e30, np.float32), "latents holds a value of 1e+30; noise is unit-variance, so |x| <= 100"),
    ],
    ids=["strings", "int", "1e30"],
)
def test_cli_latents_file(capsys, tiny_bundle, tmp_path, array, match):
    np.save(tmp_path / "noise.npy", array)
    rc, err = generate(capsys, tiny_bundle, "--size", "64x64", "--latents", str(tmp_path / "noise.npy"))
    assert rc == 2 and match in one_line(err), err


def test_cli_latents_that_are_not_an_array_file(capsys, tiny_bundle, tmp_path):
    """An image given as --latents: named as not a .npy file, not numpy's advice to load it with pickle."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "noise.png")
    rc, err = generate(capsys, tiny_bundle, "--size", "64x64", "--latents", str(tmp_path / "noise.png"))
    line = one_line(err)
    assert rc == 2 and "is not a .npy array file (write one with numpy.save)" in line and "pickle" not in line, line


# -- the image input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        np.full((64, 64, 3), 0.5, np.float32),
        np.full((1, 64, 64, 3), 0.5, np.float64),
        np.full((64, 64, 3), 128, np.int64),
        np.full((64, 64, 3), 30000, np.uint16),
    ],
    ids=lambda a: f"{a.dtype}{a.ndim}d",
)
def test_python_image_of_another_dtype_is_refused(pipe, image):
    with pytest.raises(InputError, match=rf"image has dtype {image.dtype}; img2img needs uint8"):
        pipe.request(["x"], height=64, width=64, image=image)


def test_unchecked_request_with_a_float_image_is_refused(pipe):
    """A Request made directly (not through ``request``) with a float image in [0, 1] became a nearly
    flat image; the conversion to the model's input refuses it."""
    req = Request(("x",), 64, 64, steps=2, image=np.full((1, 64, 64, 3), 0.5, np.float32))
    with pytest.raises(InputError, match="image has dtype float32"):
        pipe.run(req)


def save_png(path, array, mode=None):
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path, monkeypatch):
    """Pillow's convert('RGB') clips 16-bit values to 255 (nearly all white); they are scaled 65535 -> 255."""
    values = np.array([0, 128, 129, 257, 385, 386, 32767, 32768, 65279, 65535], np.uint16)
    grid = np.resize(values, (8, 8)).astype(np.uint16)
    path = save_png(tmp_path / "g16.png", grid)
    assert Image.open(path).mode.startswith("I")
    got = load_image(path)
    want = ((grid.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)
    assert got.dtype == np.uint8 and got.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)
    # Pillow before 10.3 opens it in mode "I", and its exif_transpose returns a copy without the file's format
    # (it was then refused as 32-bit integer pixels): the same image all the same
    from PIL import ImageOps

    monkeypatch.setattr(ImageOps, "exif_transpose", lambda img: img.convert("I"))
    assert ImageOps.exif_transpose(Image.open(path)).format is None
    np.testing.assert_array_equal(load_image(path), got)


@pytest.mark.parametrize(
    "array,mode", [(np.full((8, 8), 70000, np.int32), "32-bit integer"), (np.full((8, 8), 0.5, np.float32), "float")]
)
def test_images_that_cannot_convert_faithfully_are_refused(tmp_path, array, mode):
    path = tmp_path / "image.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(InputError, match=rf"image {path} has {mode} pixels .*8- or 16-bit"):
        load_image(path)


def test_exif_orientation_is_applied(tmp_path):
    """A 64x32 photo tagged 'rotate 90 clockwise' (orientation 6) is 32 wide and 64 tall, as diffusers loads it."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=100)
    got = load_image(path)
    assert got.shape == (64, 32, 3)
    assert got[:16, :, 0].mean() > 200 and got[-16:, :, 0].mean() < 50  # red on top after the turn


def test_resize_is_diffusers_resize_width_then_height(tmp_path):
    """``--size WxH`` on img2img's image: (width, height), resized as diffusers' ``VaeImageProcessor.resize``
    (Lanczos), from a source of another shape; not square, so swapped sides would show."""
    from diffusers.image_processor import VaeImageProcessor

    pixels = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    path = save_png(tmp_path / "photo.png", pixels)
    got = load_image(path, (64, 32))
    assert got.shape == (32, 64, 3)
    want = np.asarray(VaeImageProcessor().resize(Image.fromarray(pixels), height=32, width=64))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(load_image(path, (40, 24)), pixels)  # its own size: untouched


@pytest.mark.parametrize("limit,kind", [(1000, "error"), (3000, "warning")])
def test_decompression_bomb_is_one_line(capsys, tiny_bundle, tmp_path, monkeypatch, no_generation, limit, kind):
    """Pillow refuses (over twice its limit) or warns (over it); both are refused. The limit is lowered so a
    64x64 image is over it."""
    path = save_png(tmp_path / "big.png", np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    rc, err = generate(capsys, tiny_bundle, "--image", str(path))
    line = one_line(err)
    assert rc == 2 and str(path) in line and "4096 pixels" in line and "too large" in line, (kind, line)


def test_an_image_whose_size_is_not_a_multiple_of_8_is_named(capsys, tiny_bundle, tmp_path, no_generation):
    """It said 'height 100 is not allowed', naming no image and no way out; the image and --size are named."""
    path = save_png(tmp_path / "odd.png", np.zeros((100, 120, 3), np.uint8))
    rc, err = generate(capsys, tiny_bundle, "--image", str(path), "--steps", "2")
    line = one_line(err)
    assert rc == 2 and f"--image {path} is 120x100" in line and "--size 120x96" in line, line


def test_an_image_outside_the_bundle_s_sizes_is_named_as_the_image(capsys, tiny_bundle, tmp_path):
    """The size came from the image: it said "height 264 is outside this bundle's range", a height never given.
    The CLI names the image and --size; the Python API the image; given sizes are named as before."""
    from sdturbo.engine.runtime import open_pipeline

    image = np.zeros((264, 32, 3), np.uint8)
    path = save_png(tmp_path / "tall.png", image)
    rc, err = generate(capsys, tiny_bundle, "--image", str(path), "--steps", "2")
    assert rc == 2 and one_line(err) == (
        f"sdturbo: error: --image {path} is 32x264, and that size is not allowed: height 264 is outside this "
        "bundle's range 32-256; give --size WxH to resize it"
    )
    pipe = open_pipeline(tiny_bundle, "onnxruntime", "fp32")
    with pytest.raises(
        InputError, match=r"^the image is 32x264, and that size is not allowed: height 264 .* resize it"
    ):
        pipe.request("a cat", image=image)
    with pytest.raises(
        InputError, match=r"^the image is 32x264, and that size is not allowed: height 264 .* resize it"
    ):
        pipe.request("a cat", image=image, width=32)  # the height is still the image's
    with pytest.raises(InputError, match=r"^height 264 is outside this bundle's range 32-256$"):
        pipe.request("a cat", image=image, height=264, width=32)


def test_img2img_with_the_default_settings_makes_an_image(capsys, tiny_bundle, tmp_path):
    """`generate PROMPT --image IMG` and nothing else: strength 0.5 and the fewest steps that run one (2), the
    same image as `--steps 2`; it used to stop at "1 * 0.5 = 0.5 runs no step", a newcomer's first try."""
    from PIL import Image

    path = save_png(tmp_path / "in.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    outs = [tmp_path / "default.png", tmp_path / "two.png"]
    assert generate(capsys, tiny_bundle, "--image", str(path), "--out", str(outs[0]))[0] == 0
    assert generate(capsys, tiny_bundle, "--image", str(path), "--steps", "2", "--out", str(outs[1]))[0] == 0
    default, two = (np.asarray(Image.open(p)) for p in outs)
    np.testing.assert_array_equal(default, two)


# -- the output path --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,match",
    [
        ("folder", "is a folder"),
        ("x.foo", "extension '.foo'"),
        ("x", "has no extension"),
        ("afile/x.png", "is not a folder"),
    ],
)
def test_bad_out_is_refused_before_generating(capsys, tiny_bundle, tmp_path, no_generation, name, match):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("")
    out = tmp_path / name
    rc, err = generate(capsys, tiny_bundle, "--size", "64x64", "--out", str(out))
    line = one_line(err)
    assert rc == 2 and match in line, line
    if "extension" in match:
        assert ".png" in line


def test_several_images_whose_name_is_a_folder(tmp_path):
    (tmp_path / "x-1.png").mkdir()
    with pytest.raises(InputError, match=r"x-1.png: it is a folder"):
        images.check_out_path(tmp_path / "x.png", 2)
    assert images.check_out_path(tmp_path / "new" / "x.PNG", 2) == [
        tmp_path / "new" / "x-0.PNG",
        tmp_path / "new" / "x-1.PNG",
    ]


@pytest.mark.parametrize("what", ["folder", "file"])
def test_out_that_is_read_only(tiny_bundle, tmp_path, what):
    """A read-only folder to write in, or a read-only file to replace: refused before generating (it failed
    with a traceback after the image was made)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if what == "file":
        (ro / "x.png").write_bytes(b"")
        (ro / "x.png").chmod(0o444)
    else:
        ro.chmod(0o555)
    out = str(ro / "x.png")
    r = run_cli("generate", "a cat", "--bundle", str(tiny_bundle), "--size", "64x64", "--out", out, as_user=True)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert f"cannot write {out}" in line and "read-only" in line and "generated" not in r.stderr, r.stderr


def test_out_where_no_file_can_be_made_is_refused_before_generating(capsys, tiny_bundle, no_generation):
    """/proc: access() lets root write there, so the image was made and then failed to save (exit 1)."""
    rc, err = generate(capsys, tiny_bundle, "--size", "64x64", "--out", "/proc/sdturbo-x.png")
    line = one_line(err)
    assert rc == 2 and "cannot write /proc/sdturbo-x.png" in line, line


def test_an_image_that_fails_to_save_leaves_the_one_there_whole(tmp_path, monkeypatch):
    """Saved through a temporary file and a rename: a save cut short (a full disk, an interrupt) keeps the old
    image as it was and leaves no partial file behind."""
    out = tmp_path / "x.png"
    old = np.full((1, 8, 8, 3), 7, np.uint8)
    images.save_images(old, out)
    before = out.read_bytes()

    def cut_short(self, fp, *args, **kwargs):  # Pillow's save, stopped part way
        with contextlib.ExitStack() as files:
            if isinstance(fp, (str, os.PathLike)):
                fp = files.enter_context(open(fp, "wb"))  # (as Pillow opens a path)
            fp.write(b"\x89PNG half")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.Image.Image, "save", cut_short)
    with pytest.raises(OSError, match="No space left"):
        images.save_images(np.zeros((1, 8, 8, 3), np.uint8), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_an_image_that_is_not_finite_is_not_saved(capsys, tiny_bundle, tmp_path, monkeypatch):
    """A batch of 2 whose decoder gives image 1 a NaN (what an fp16 overflow leaves; uint8 would make it black):
    image 0 is saved and printed, the file where image 1 would go keeps what it held, and the command fails
    naming image 1."""
    from sdturbo.engine.pipeline import Pipeline

    stage = Pipeline.stage

    def spoilt(self, name):
        run = stage(self, name)
        if name != self.decoder:
            return run

        def call(**inputs):
            out = run(**inputs).copy()
            out[1, 0, 0, 0] = np.nan
            return out

        return call

    monkeypatch.setattr(Pipeline, "stage", spoilt)
    out, kept = tmp_path / "cat.png", tmp_path / "cat-1.png"
    kept.write_bytes(b"an image from before")
    args = ["generate", "a cat", "--bundle", str(tiny_bundle), "--batch", "2", "--size", "64x64", "--out", str(out)]
    assert cli.main(args) == 2
    printed = capsys.readouterr()
    assert one_line(printed.err) == (
        "sdturbo: error: image 1 of 2 came out of the VAE decoder with NaN or infinite values (with fp32 graphs): "
        "its pixels are no image"
    )
    assert printed.out == f"{tmp_path / 'cat-0.png'}\n"
    assert kept.read_bytes() == b"an image from before"
    assert images.load_image(tmp_path / "cat-0.png").shape == (64, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-0.png", "cat-1.png"]


# -- bundles, model folders, the cache --------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0, -8, 12])
def test_vae_scale_factor_must_be_a_power_of_two(tiny_bundle, tmp_path, factor):
    shutil.copy(tiny_bundle / "manifest.json", tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["vae"]["scale_factor"] = factor
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"vae.scale_factor {factor} .*positive power of two"):
        Bundle(tmp_path)


def test_truncated_safetensors_in_a_model_folder(capsys, tiny_folder, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    rc = cli.main(["export", str(folder), "--out", str(tmp_path / "bundle"), "--precision", "fp32"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "unet" in line and str(weights) in line and "truncated or corrupt" in line, line


@pytest.mark.parametrize("damaged", ["unet/config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"])
def test_a_damaged_file_in_a_model_folder_is_a_users_error_in_one_line(capsys, tiny_folder, tmp_path, damaged):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / damaged).write_text("{not json")
    rc = cli.main(["export", str(folder), "--out", str(tmp_path / "bundle"), "--precision", "fp32"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and f"cannot load the model {folder} from" in line and "save the model again" in line, line


def test_cache_that_is_a_file(capsys, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    rc = cli.main(["generate", "a cat", "--model", "random:tiny", "--size", "64x64"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "SDTURBO_CACHE" in line and str(tmp_path / "cache") in line, line


def test_cache_that_is_a_read_only_empty_folder(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    env = {**os.environ, "SDTURBO_CACHE": str(cache)}
    r = run_cli("generate", "a cat", "--model", "random:tiny", "--size", "64x64", env=env, as_user=True)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert "SDTURBO_CACHE" in line and str(cache) in line and "writable" in line, line


# -- the safety net ---------------------------------------------------------------------------------------


def test_an_unexpected_os_error_is_one_line(capsys, monkeypatch):
    def disk_full(args):
        raise OSError(28, "No space left on device", "/somewhere/out.png")

    monkeypatch.setattr(cli, "cmd_info", disk_full)
    assert cli.main(["info", "x"]) == 1
    assert "No space left on device" in one_line(capsys.readouterr().err)
    with pytest.raises(OSError):
        cli.main(["-v", "info", "x"])
    with pytest.raises(OSError):  # -v after the command too, as users type it
        cli.main(["info", "x", "-v"])


def test_numbers_a_manifest_may_hold_and_a_null_second_tokenizer_are_taken(tiny_bundle, tmp_path):
    """Whole floats (8.0) are whole numbers, and ``"tokenizer_2": null`` is no second tokenizer, as before."""
    shutil.copy(tiny_bundle / "manifest.json", tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["limits"]["max_batch"], manifest["tokenizer_2"] = 8.0, None
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    b = Bundle(tmp_path)
    assert b.limits.max_batch == 8 and isinstance(b.limits.max_batch, int) and len(b.tokenizers) == 1


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("limits.max_batch", "x", "limits.max_batch is 'x'; it must be a whole number"),
        ("limits.max_batch", 2.5, "limits.max_batch is 2.5; it must be a whole number"),
        ("limits.max_batch", True, "limits.max_batch is True; it must be a whole number"),
        ("limits.max_batch", 0, "limits are {'max_batch': 0, "),
        ("limits.min_size", 2048, "8 <= min_size <= max_size"),
        ("tokenizer.max_length", None, "tokenizer.max_length is None; it must be a whole number"),
        ("vae.latent_channels", [4], "vae.latent_channels is [4]; it must be a whole number"),
        ("limits.max_size", 10**400, "min_size <= max_size <= 4096"),  # past a float's range: still one line
        ("limits.max_size", ..., "field 'limits.max_size' is missing"),
        ("limits", ..., "field 'limits.max_batch' is missing"),
        ("model.id", ..., "field 'id' is missing"),
    ],
)
def test_a_malformed_manifest_names_the_field(tiny_bundle, tmp_path, field, value, message):
    """A manifest edited by hand, or written by something else: one line naming the field and its value (it was
    "missing or bad field invalid literal for int() with base 10: 'x'")."""
    shutil.copy(tiny_bundle / "manifest.json", tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    *outer, last = field.split(".")
    section = manifest
    for key in outer:
        section = section[key]
    if value is ...:
        del section[last]
    else:
        section[last] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as e:
        Bundle(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'manifest.json'} is malformed: ")
    again = f"; export it again: `sdturbo export MODEL --out {tmp_path} --force`"  # (it was "export the bundle again")
    assert message in str(e.value) and str(e.value).endswith(again), str(e.value)


@pytest.mark.parametrize(
    "limits", [{"max_batch": 1}, {"max_batch": 256}, {"min_size": 8}, {"max_size": 4096}, {"min_size": 256}]
)
def test_limits_at_the_widest_a_bundle_may_hold_are_taken(tiny_bundle, tmp_path, limits):
    """The ends of the allowed limits (max_batch 1 to 256, 8 <= min_size <= max_size <= 4096) are limits a
    bundle may hold: ``export --max-batch 1`` makes one, and it must open."""
    shutil.copy(tiny_bundle / "manifest.json", tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["limits"].update(limits)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    got = Bundle(tmp_path).limits
    assert {k: getattr(got, k) for k in limits} == limits


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.0"])
def test_a_tiny_vae_scaling_factor_that_is_not_a_number_is_named(tiny_vae_bundle, tmp_path, value):
    shutil.copy(tiny_vae_bundle / "manifest.json", tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["tiny_vae"]["scaling_factor"] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # NaN and Infinity, as Python's json writes them
    with pytest.raises(BundleError, match=rf"tiny_vae.scaling_factor is {value!r}; it must be a number"):
        Bundle(tmp_path)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--steps", "5"], "steps=5 is not allowed"),
        (["--size", "100x64"], "width 100 is not allowed"),
        (["--size", "100x100"], "width 100 and height 100 are not allowed; use a positive multiple of 8 for each"),
        (["--seed", "9223372036854775807", "--batch", "2"], "seed 9223372036854775807 is not allowed for a batch of 2"),
        (["--image", "{image}", "--strength", "0.1"], "at 4 steps, strength must be at least 0.25"),
        (["--image", "{image}", "--strength", "0.2", "--steps", "2"], "at least 0.5, or more steps (up to 4)"),
    ],
)
def test_generate_names_a_bad_setting_before_exporting_or_loading_anything(capsys, tmp_path, monkeypatch, args, named):
    """A typo in a setting that needs no model is named at once, not after the model's download and export
    (minutes, for the real one) or its load."""
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in.png")
    args = [a.format(image=tmp_path / "in.png") for a in args]
    monkeypatch.setattr("sdturbo.engine.cache.ensure_bundle", lambda *a, **k: pytest.fail("a bundle was asked for"))
    monkeypatch.setattr("sdturbo.engine.runtime.open_pipeline", lambda *a, **k: pytest.fail("a pipeline was opened"))
    rc = cli.main(["generate", "a cat", "--model", "random:tiny", "--out", str(tmp_path / "x.png"), *args])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and named in line, line


def test_a_batchs_last_seed_must_be_a_seed_too(pipe):
    """Image i of a batch uses seed + i, so the last image's seed must be in range as a batch-1 call's is."""
    top = 2**63 - 1
    with pytest.raises(InputError, match="not allowed for a batch of 2"):
        pipe.request(["a", "b"], height=64, width=64, seed=np.int64(top))
    assert pipe.request(["a", "b"], height=64, width=64, seed=top - 1).seed == top - 1
    assert pipe.request(["a", "b"], height=64, width=64, seed=(top, top)).seed == (top, top)  # one per image


@pytest.mark.parametrize("where", ["read-only folder", "file in the way"])
def test_export_names_an_unwritable_destination_before_loading_the_model(tmp_path, monkeypatch, capsys, where):
    """A bundle goes into a temporary folder beside --out: one that cannot be made there is named before the
    model loads (minutes for a real one), in one line, not as an errno after it with a temporary name."""
    folder = tmp_path / "dest"
    out = folder / "b"
    if where == "file in the way":
        folder.write_text("")
        named = f"{folder} is a file, not a folder"
        monkeypatch.setattr("sdturbo.export.bundle_writer.load_model", lambda *a, **k: pytest.fail("model loaded"))
        rc, err = cli.main(["export", "random:tiny", "--out", str(out)]), capsys.readouterr().err
    else:
        folder.mkdir()
        folder.chmod(0o555)
        named = f"no folder can be made in {folder} (Permission denied)"
        r = run_cli("export", "random:tiny", "--out", str(out), "-v", as_user=True)
        rc, err = r.returncode, r.stderr
        assert "loading" not in err.lower(), err  # the model was not loaded first
    line = one_line(err)
    assert rc == 2 and named in line and str(out) in line, line


def test_cli_image_noise_is_the_apis_image_noise(capsys, tiny_bundle, tmp_path):
    """`--image-noise` (with `--latents`) reaches img2img as the API's ``image_noise``: the CLI's image is the
    API's with both noises given (what reproduces a diffusers img2img image), not the seed's posterior draw."""
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "in.png")
    latents, noise = (rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(2))
    np.save(tmp_path / "latents.npy", latents)
    np.save(tmp_path / "noise.npy", noise)
    args = ["--image", str(tmp_path / "in.png"), "--latents", str(tmp_path / "latents.npy"), "--out"]
    rc, err = generate(
        capsys, tiny_bundle, *args, str(tmp_path / "a.png"), "--image-noise", str(tmp_path / "noise.npy")
    )
    assert rc == 0, err
    pipe = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp32"))
    want = pipe(["a cat"], height=64, width=64, image=picture, latents=latents, image_noise=noise)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), want[0])
    seeded = pipe(["a cat"], height=64, width=64, image=picture, latents=latents)
    assert not np.array_equal(seeded, want)  # the posterior noise matters: the flag is not a no-op here


def test_cli_image_noise_needs_an_image(capsys, tiny_bundle, tmp_path, no_generation):
    np.save(tmp_path / "noise.npy", np.zeros((1, 4, 8, 8), np.float32))
    rc, err = generate(capsys, tiny_bundle, "--size", "64x64", "--image-noise", str(tmp_path / "noise.npy"))
    assert rc == 2 and "--image-noise samples the VAE posterior of img2img; give --image too" in one_line(err)

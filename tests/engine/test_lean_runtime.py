"""The runtime never imports torch, diffusers or transformers, through the API or the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

SCRIPT = """
import sys
from sdturbo.engine.cli import main
rc = main(sys.argv[1:])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'})
print('HEAVY=' + ','.join(heavy))
sys.exit(rc)
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    """``sdturbo ARGS`` in a fresh interpreter that then reports which heavy packages it imported."""
    r = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HEAVY=\n" in r.stdout, r.stdout
    return r


def test_generate_imports_no_torch(tiny_bundle, tmp_path):
    out = tmp_path / "img.png"
    cli("generate", "a cat", "--bundle", str(tiny_bundle), "--size", "64x96", "--steps", "2", "--out", str(out))
    img = np.asarray(Image.open(out))
    assert img.shape == (96, 64, 3) and img.std() > 0  # --size is WIDTHxHEIGHT


def test_img2img_and_batch_through_the_cli(tiny_bundle, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out.png"
    cli(
        "generate",
        "a cat",
        "--bundle",
        str(tiny_bundle),
        "--image",
        str(src),
        "--strength",
        "0.5",
        "--steps",
        "2",
        "--batch",
        "2",
        "--out",
        str(out),
    )
    assert [p.name for p in sorted(tmp_path.glob("out-*.png"))] == ["out-0.png", "out-1.png"]


def test_info_imports_no_torch(tiny_bundle):
    r = cli("info", str(tiny_bundle))
    assert "unet" in r.stdout and "[ok]" in r.stdout


def test_latents_file_reproduces_the_api(tiny_bundle, tmp_path):
    from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
    from sdturbo.engine.pipeline import Pipeline

    lat = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.save(tmp_path / "lat.npy", lat)
    out = tmp_path / "o.png"
    cli(
        "generate",
        "a cat",
        "--bundle",
        str(tiny_bundle),
        "--size",
        "64x64",
        "--latents",
        str(tmp_path / "lat.npy"),
        "--out",
        str(out),
    )
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend())(["a cat"], height=64, width=64, latents=lat)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), want)


WITHOUT_EXPORT = """
import sys
for name in ("onnx", "torch", "diffusers", "transformers"):  # as where the export extra is not installed
    sys.modules[name] = None
from sdturbo.engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_exporting_without_the_export_extra_is_one_line_naming_it(tiny_bundle, tiny_folder, tmp_path):
    """`sdturbo export` and `build --ort-optimize` on a runtime-only install printed a traceback ending in
    "No module named 'onnx'" (a helper's check on Python 3.13); `generate --model` gave one line. Now each does."""
    for args in (
        ["export", "random:tiny", "--out", str(tmp_path / "b")],
        ["build", str(tiny_bundle), "--ort-optimize", "--ort-provider", "cpu"],
        [
            "generate",
            "a cat",
            "--model",
            str(shutil.copytree(tiny_folder, tmp_path / "m")),
            "--out",
            str(tmp_path / "x.png"),
        ],
    ):
        r = subprocess.run([sys.executable, "-c", WITHOUT_EXPORT, *args], capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("sdturbo: error: ") and "is missing): pip install 'sdturbo[export]'" in lines[0]
    assert not (tmp_path / "b").exists()


def test_version_is_the_installed_package_s(capsys):
    from importlib.metadata import version

    import pytest
    from sdturbo.engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"sdturbo {version('sdturbo')}\n"


def test_an_export_package_that_does_not_import_is_not_called_missing():
    """Installed at a version that does not fit ("cannot import name ..."): it said the package was missing."""
    from sdturbo.engine.errors import export_extra_missing

    e = ImportError("cannot import name 'X' from 'numpy' (/site/numpy/__init__.py)", name="numpy")
    assert "(numpy is installed but does not import: cannot import name 'X'" in str(export_extra_missing("export", e))
    e = ModuleNotFoundError("No module named 'onnx_not_here'", name="onnx_not_here")
    assert "(onnx_not_here is missing)" in str(export_extra_missing("export", e))

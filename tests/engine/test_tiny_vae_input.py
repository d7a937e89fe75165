"""The two switches at the edges: `generate --vae`, `--no-prompt-cache`, `export --tiny-vae`, and the Python API;
bad values and bundles without a tiny VAE get one line naming the fix, exit status 2, no traceback."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sdturbo.engine import cli
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import BundleError, InputError
from sdturbo.engine.runtime import open_pipeline


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("sdturbo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_generate_with_the_tiny_vae(tiny_vae_bundle, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["generate", "a cat", "--bundle", str(tiny_vae_bundle), "--size", "64x64", "--vae", "tiny"]
    assert cli.main([*args, "--no-prompt-cache", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).std() > 0


def test_a_bundle_without_one_says_how_to_add_it(tiny_bundle, tmp_path, capsys):
    args = ["generate", "a cat", "--bundle", str(tiny_bundle), "--vae", "tiny", "--out", str(tmp_path / "x.png")]
    assert cli.main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert "has no tiny VAE" in line and f"sdturbo export random:tiny --out {tiny_bundle} --tiny-vae" in line, line
    assert not (tmp_path / "x.png").exists()


def test_an_unknown_vae_is_refused(tiny_vae_bundle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "a cat", "--bundle", str(tiny_vae_bundle), "--vae", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(InputError, match="vae 'huge' is not allowed; use one of full, tiny"):
        open_pipeline(tiny_vae_bundle, "onnxruntime", vae="huge")


def test_the_python_api(tiny_bundle, tiny_vae_bundle):
    with pytest.raises(BundleError, match="--tiny-vae"):
        open_pipeline(tiny_bundle, "onnxruntime", vae="tiny")
    pipe = open_pipeline(tiny_vae_bundle, "onnxruntime", vae="tiny", prompt_cache=0)
    assert pipe.decoder == "tiny_vae_decoder" and not pipe.prompt_cache.enabled
    image = np.zeros((64, 64, 3), np.uint8)
    noise = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(InputError, match=r"image_noise \(--image-noise\) samples the full VAE's posterior"):
        pipe.request(["x"], height=64, width=64, image=image, image_noise=noise, steps=2)


def test_export_refuses_a_bad_source(tiny_bundle, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    assert cli.main(["export", "random:tiny", "--out", str(copy), "--tiny-vae", "random:nope"]) == 2
    assert "unknown random tiny VAE 'random:nope'" in one_line(capsys.readouterr().err)
    assert Bundle(copy).tiny_vae is None


def test_a_bad_source_is_named_as_bad_before_it_is_compared_with_the_bundles_own(tiny_vae_bundle, capsys):
    """A bundle that has a tiny VAE, asked for a source that cannot be one: that is the error, not "it already
    has one from ...; use --force" (which would only reach the same error after exporting again)."""
    assert cli.main(["export", "random:tiny", "--out", str(tiny_vae_bundle), "--tiny-vae", "nonsense"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--tiny-vae 'nonsense' is neither an existing folder nor a hub id" in line, line


@pytest.mark.parametrize("flags", [[], ["--no-prompt-cache"], ["--no-cuda-graph"]])
def test_generates_switches_reach_the_pipeline(tiny_bundle, tmp_path, monkeypatch, flags):
    """`--no-prompt-cache` and `--no-cuda-graph` reach the pipeline `generate` opens, each off only when given."""
    from sdturbo.engine import runtime

    opened, real = [], runtime.open_pipeline

    def recording(*args, **kwargs):
        opened.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "open_pipeline", recording)
    args = ["generate", "a cat", "--bundle", str(tiny_bundle), "--size", "64x64", "--out", str(tmp_path / "a.png")]
    assert cli.main([*args, *flags]) == 0
    (kwargs,) = opened
    assert (kwargs["prompt_cache"] == 0) == ("--no-prompt-cache" in flags), kwargs
    assert (kwargs["cuda_graph"] is False) == ("--no-cuda-graph" in flags), kwargs


def test_generate_with_the_tiny_vae_adds_it_to_a_cached_bundle_that_lacks_it(tmp_path, monkeypatch):
    """`generate --vae tiny` on a model cached without a tiny VAE: the model's own is added to the cached bundle
    (the model is not exported again), not refused and not ignored."""
    from sdturbo.engine.cache import ensure_bundle

    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    plain = Bundle(ensure_bundle("random:tiny", "fp32"))
    assert plain.tiny_vae is None
    unet = plain.components["fp32"]["unet"].sha256
    with_tiny = Bundle(ensure_bundle("random:tiny", "fp32", tiny_vae=True))
    assert with_tiny.root == plain.root and with_tiny.tiny_vae is not None
    assert with_tiny.tiny_vae.source == "random:taesd" and with_tiny.components["fp32"]["unet"].sha256 == unet
    assert Bundle(ensure_bundle("random:tiny", "fp32", tiny_vae=True)).tiny_vae.source == "random:taesd"

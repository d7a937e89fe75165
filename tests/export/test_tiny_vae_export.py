"""`export --tiny-vae`: the tiny VAE's graphs against their PyTorch modules, their manifest contracts and
checksums, adding one to an existing bundle, and the errors for sources and bundles that do not fit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import MANIFEST, TINY_VAE, Bundle
from sdturbo.engine.errors import BundleError, InputError, IntegrityError
from sdturbo.engine.pipeline import Pipeline
from sdturbo.export import onnx_export
from sdturbo.export.bundle_writer import export_bundle
from sdturbo.export.onnx_export import sample_inputs
from sdturbo.export.tiny_vae import RANDOM_TINY_VAES, build_random_tiny_vae, resolve_tiny_vae_folder
from sdturbo.export.wrappers import TinyVaeDecoder, TinyVaeEncoder

from tests.conftest import TINY_VAE as SOURCE
from tests.export.test_components import DIMS, check_manifest_io, onnx_rel_error


@pytest.fixture(scope="module")
def taesd(taesd_folder):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(taesd_folder).eval()


@pytest.mark.parametrize("dims", DIMS, ids=["b3-64x96", "b1-40x56"])
@pytest.mark.parametrize("name", TINY_VAE)
def test_fp32_component_matches_torch(name, dims, tiny_vae_bundle, taesd, record_property):
    comp = Bundle(tiny_vae_bundle).component("fp32", name)
    args = sample_inputs(comp.spec, dims, vocab_size=1, seed=5)
    wrapper = {"tiny_vae_decoder": TinyVaeDecoder, "tiny_vae_encoder": TinyVaeEncoder}[name](taesd)
    with torch.inference_mode():
        want = wrapper(*args).numpy()
    assert want.std() > 0.1  # a spread image / latents, not a constant (build_random_tiny_vae)
    assert onnx_rel_error(comp, args, want, dims, record_property) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_declare_the_manifest_io(precision, tiny_vae_bundle):
    b = Bundle(tiny_vae_bundle)
    want = {"fp32": "float32", "fp16": "float16"}[precision]
    for name in TINY_VAE:
        comp = b.component(precision, name)
        check_manifest_io(comp)
        assert {np.dtype(t.dtype) for t in (*comp.spec.inputs, *comp.spec.outputs)} == {np.dtype(want)}


def test_manifest_records_the_tiny_vae(tiny_vae_bundle, taesd):
    m = json.loads((tiny_vae_bundle / MANIFEST).read_text())
    entry = m["tiny_vae"]
    assert entry["source"] == SOURCE and entry["class"] == "AutoencoderTiny"
    assert entry["scaling_factor"] == taesd.config.scaling_factor and entry["latent_channels"] == 4
    assert entry["scale_factor"] == m["vae"]["scale_factor"] == 8
    b = Bundle(tiny_vae_bundle)
    assert b.tiny_vae.source == SOURCE and b.vae_components("tiny") == TINY_VAE
    assert set(TINY_VAE) <= set(b.component_names)


def test_a_damaged_tiny_vae_file_is_refused(tiny_vae_bundle, tmp_path):
    """The tiny VAE's files go through the same sha256 checks as the other components."""
    copy = shutil.copytree(tiny_vae_bundle, tmp_path / "b")
    path = Bundle(copy).components["fp32"]["tiny_vae_decoder"].onnx
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        Pipeline(copy, OnnxRuntimeBackend("fp32"), vae="tiny")
    Pipeline(copy, OnnxRuntimeBackend("fp16"), vae="tiny")  # the other precision's files are intact


def test_adding_to_a_bundle_keeps_what_is_there(tiny_bundle, tmp_path):
    """A tiny VAE added to an existing bundle writes new files only, into every precision; the others are not
    touched; adding it again is a no-op; another source is refused."""
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copy.rglob("*.onnx")}
    export_bundle("random:tiny", copy, ("fp32",), tiny_vae=SOURCE)
    b = Bundle(copy)
    assert b.precisions == ("fp32", "fp16") and b.tiny_vae.source == SOURCE
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in before.items())
    for precision in b.precisions:
        assert sorted(b.components[precision]) == sorted(b.component_names)
    manifest = (copy / MANIFEST).read_text()
    export_bundle("random:tiny", copy, ("fp32",), tiny_vae=SOURCE)
    assert (copy / MANIFEST).read_text() == manifest
    with pytest.raises(BundleError, match="already has a tiny VAE from random:taesd-tiny"):
        export_bundle("random:tiny", copy, ("fp32",), tiny_vae="random:taesd")


def test_a_precision_added_later_gets_the_tiny_vae(tiny_vae_bundle, tmp_path):
    copy = shutil.copytree(tiny_vae_bundle, tmp_path / "b")
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["components"]["fp16"]  # an fp32-only bundle with a tiny VAE
    (copy / MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(copy / "onnx" / "fp16")
    export_bundle("random:tiny", copy, ("fp16",))
    b = Bundle(copy)
    for name in TINY_VAE:
        b.component("fp16", name)
    assert Pipeline(copy, OnnxRuntimeBackend("fp16"), vae="tiny")(["a cat"], height=64, width=64).std() > 0


def test_adding_needs_the_bundles_model(tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    with pytest.raises(BundleError, match="exported from random:tiny, not random:sdxl-tiny"):
        export_bundle("random:sdxl-tiny", copy, ("fp32",), tiny_vae=SOURCE)


@pytest.mark.parametrize(
    "source,match",
    [
        ("random:nope", "unknown random tiny VAE 'random:nope'; allowed: random:taesd"),
        ("no-such-folder", "neither an existing folder nor a hub id"),
    ],
)
def test_bad_sources_are_named(source, match):
    with pytest.raises(InputError, match=match):
        resolve_tiny_vae_folder(source)


def test_bad_folders_are_named(tmp_path, tiny_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"lacks config\.json, diffusion_pytorch_model\.safetensors"):
        resolve_tiny_vae_folder(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        resolve_tiny_vae_folder(str(tiny_folder / "vae"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        resolve_tiny_vae_folder(str(tmp_path / "file"))


def test_a_tiny_vae_that_cannot_be_downloaded_fails_before_the_model_is_exported(tmp_path, tiny_folder, monkeypatch):
    """Offline, `export MODEL --tiny-vae madebyollin/taesd` exported every component first (minutes at full size),
    then failed on the tiny VAE's download and threw the work away: the tiny VAE is fetched first."""
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("cannot reach the Hub (offline)")

    exported = []

    def spy(*args, **kwargs):
        exported.append(args)
        raise RuntimeError("a component was exported before the tiny VAE was fetched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(onnx_export, "export_component", spy)
    with pytest.raises(InputError, match=r"could not download the tiny VAE 'madebyollin/taesd' .*offline"):
        export_bundle("random:tiny", tmp_path / "b", ("fp32",), tiny_vae="madebyollin/taesd")
    assert exported == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(latent_channels=8), "has 8 latent channels at 8x; this model's latents have 4 at 8x"),
        (dict(encoder_block_out_channels=(16,) * 3, num_encoder_blocks=(1,) * 3), "decodes 8x but encodes 4x"),
    ],
)
def test_a_tiny_vae_that_does_not_fit_is_refused(change, match, tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(RANDOM_TINY_VAES, "taesd-misfit", {**RANDOM_TINY_VAES["taesd-tiny"], **change})
    folder = tmp_path / "misfit"
    build_random_tiny_vae("taesd-misfit").save_pretrained(folder)
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    with pytest.raises(InputError, match=match):
        export_bundle("random:tiny", copy, ("fp32",), tiny_vae=str(folder))
    assert Bundle(copy).tiny_vae is None


def test_the_cli_adds_a_tiny_vae_into_the_precisions_the_bundle_has(tiny_bundle, tmp_path):
    """`sdturbo export MODEL --out BUNDLE --tiny-vae SOURCE` (the command the "no tiny VAE" error suggests) on an
    fp32-only bundle exports the tiny VAE only, not the whole model in fp16 too; --precision all still adds fp16."""
    from sdturbo.engine.cli import main

    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["components"]["fp16"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(copy / "onnx" / "fp16")
    assert main(["export", "random:tiny", "--out", str(copy), "--tiny-vae", SOURCE]) == 0
    b = Bundle(copy)
    assert b.precisions == ("fp32",) and b.tiny_vae.source == SOURCE and not (copy / "onnx" / "fp16").exists()
    assert main(["export", "random:tiny", "--out", str(copy), "--tiny-vae", SOURCE, "--precision", "all"]) == 0
    assert Bundle(copy).precisions == ("fp32", "fp16")

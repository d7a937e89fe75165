"""Bundles are written atomically and checked on open; broken ones give clear errors."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import numpy as np
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import MANIFEST, Bundle
from sdturbo.engine.cli import main
from sdturbo.engine.errors import BundleError, InputError
from sdturbo.engine.pipeline import Pipeline
from sdturbo.export import bundle_writer, onnx_export
from sdturbo.export.bundle_writer import export_bundle


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


def generate(path, precision="fp32"):
    return Pipeline(path, OnnxRuntimeBackend(precision))(["a cat"], height=64, width=64)


class Boom(RuntimeError):
    pass


def interrupt_after(monkeypatch, n: int):
    real, calls = onnx_export.export_component, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise Boom("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_component", flaky)


def test_interrupted_export_leaves_nothing(tmp_path, tiny_folder, monkeypatch):
    interrupt_after(monkeypatch, 2)
    out = tmp_path / "b"
    with pytest.raises(Boom):
        export_bundle("random:tiny", out, ("fp32",))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_interrupted_precision_add_keeps_the_bundle(tmp_path, tiny_folder, monkeypatch):
    out = export_bundle("random:tiny", tmp_path / "b", ("fp32",))
    before = (out / MANIFEST).read_text()
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Boom):
        export_bundle("random:tiny", out, ("fp16",))
    assert (out / MANIFEST).read_text() == before
    assert Bundle(out).precisions == ("fp32",)
    assert generate(out).shape == (1, 64, 64, 3)
    monkeypatch.undo()
    export_bundle("random:tiny", out, ("fp16",))  # completes what was missing
    assert set(Bundle(out).precisions) == {"fp32", "fp16"}
    assert generate(out, "fp16").shape == (1, 64, 64, 3)


def test_a_precision_add_killed_before_its_commit_is_completed_next_time(tmp_path, tiny_folder, monkeypatch):
    """Killed after moving onnx/fp16 in, before the manifest lists it: the folder is not in use, and the next
    run replaces it and commits."""
    out = export_bundle("random:tiny", tmp_path / "b", ("fp32",))

    def killed(path, data):
        raise Boom("killed before the commit")

    monkeypatch.setattr(bundle_writer, "atomic_write", killed)
    with pytest.raises(Boom):
        export_bundle("random:tiny", out, ("fp16",))
    assert (out / "onnx" / "fp16").is_dir() and Bundle(out).precisions == ("fp32",)
    monkeypatch.undo()
    export_bundle("random:tiny", out, ("fp16",))
    assert set(Bundle(out).precisions) == {"fp32", "fp16"}
    assert generate(out, "fp16").shape == (1, 64, 64, 3)


def test_concurrent_export_keeps_the_first_bundle(tmp_path, tiny_folder, monkeypatch):
    """Another process publishes the same bundle while this one exports: theirs stays, ours is dropped."""
    out = tmp_path / "b"
    real = bundle_writer._write_onnx

    def racing(lm, root, precisions):
        result = real(lm, root, precisions)
        shutil.copytree(root.parent / "winner", out)  # the other process finishes first
        return result

    export_bundle("random:tiny", tmp_path / "winner", ("fp32",))
    winner = (tmp_path / "winner" / MANIFEST).read_text()
    monkeypatch.setattr(bundle_writer, "_write_onnx", racing)
    assert export_bundle("random:tiny", out, ("fp32",)) == out
    assert (out / MANIFEST).read_text() == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "winner"]  # no temporary folder left


def test_refuses_to_overwrite_a_non_bundle(tmp_path, tiny_folder):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        export_bundle("random:tiny", tmp_path / "x", ("fp32",))
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_a_complete_bundle_of_another_model_is_not_reported_done(bundle_copy, tiny_folder):
    """Nothing to export is success only for the bundle's own model (by name or folder), never another's."""
    manifest = (bundle_copy / MANIFEST).read_bytes()
    with pytest.raises(BundleError, match="exported from random:tiny, not random:sdxl-tiny; nothing was exported"):
        export_bundle("random:sdxl-tiny", bundle_copy, ("fp32", "fp16"))
    assert (bundle_copy / MANIFEST).read_bytes() == manifest
    assert export_bundle("random:tiny", bundle_copy, ("fp32",)) == bundle_copy
    assert export_bundle(str(tiny_folder), bundle_copy, ("fp16",)) == bundle_copy  # the same model, by its folder


def test_a_bundle_with_other_limits_is_not_reported_done(bundle_copy):
    """`export --max-batch 4` onto a bundle of max_batch 16 said "already has fp32, fp16" and kept 16; limits
    given are the bundle's own, or refused, naming both (a precision added keeps the bundle's limits too)."""
    limits = Bundle(bundle_copy).limits
    manifest = (bundle_copy / MANIFEST).read_bytes()
    for name in ("max_batch", "min_size", "max_size"):
        have = getattr(limits, name)
        other = have // 2 if name == "max_batch" else have + 8
        flag = name.replace("_", "-")
        with pytest.raises(BundleError, match=rf"exported with {name} {have}, not {other} \(--{flag}\)"):
            export_bundle("random:tiny", bundle_copy, ("fp32",), **{name: other})
        assert (bundle_copy / MANIFEST).read_bytes() == manifest
    with pytest.raises(BundleError, match=rf"exported with max_size {limits.max_size}, not 48 \(--max-size\)"):
        export_bundle("random:tiny", bundle_copy, ("fp32",), max_size=48)  # (not the defaults' "size range 64-48")
    assert export_bundle("random:tiny", bundle_copy, ("fp32",), max_size=limits.max_size) == bundle_copy
    same = dict(max_batch=limits.max_batch, min_size=limits.min_size, max_size=limits.max_size)
    assert export_bundle("random:tiny", bundle_copy, ("fp32",), **same) == bundle_copy


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(precisions=("fp8",)), "precision"),
        (dict(max_batch=0), "max_batch"),
        (dict(min_size=60), "min_size=60 is not allowed; use a multiple of 8"),
        (dict(min_size=512, max_size=256), "size range 512-256 is not allowed"),
        (dict(max_size=48), "size range 64-48 is not allowed"),  # (with the default smallest side, for a new one)
    ],
)
def test_bad_export_arguments(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        export_bundle("random:tiny", tmp_path / "b", **kwargs)


def test_missing_bundle_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no manifest.json"):
        Bundle(tmp_path / "empty")


def test_unknown_schema_version(bundle_copy):
    m = json.loads((bundle_copy / MANIFEST).read_text())
    m["schema_version"] = 99
    (bundle_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema_version 99"):
        Bundle(bundle_copy)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"num_train_timesteps": 0}, "num_train_timesteps=0 is not allowed"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start=0.02, beta_end=0.01 are not allowed"),
    ],
)
def test_a_scheduler_that_cannot_work_is_named(bundle_copy, fields, match):
    """An edited manifest's scheduler: named with what is allowed (0 timesteps raised ZeroDivisionError)."""
    m = json.loads((bundle_copy / MANIFEST).read_text())
    m["scheduler"].update(fields)
    (bundle_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        Bundle(bundle_copy)


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / MANIFEST).write_text('{"schema_version": 1, "model": ')
    with pytest.raises(BundleError, match="corrupt"):
        Bundle(bundle_copy)


def said_to_run(message: str) -> list[str]:
    """The `sdturbo ...` command a message says to run, as arguments for ``main``."""
    return shlex.split(re.search(r"`sdturbo (export [^`]+)`", message).group(1))


def test_export_onto_a_damaged_bundle_names_the_file_and_the_command_that_repairs_it(bundle_copy, capsys):
    """info said "missing .../vae_encoder.onnx; export it again", but `sdturbo export` answered "already has fp32,
    fp16" and exit 0, restoring nothing. Export checks that the files the manifest lists are there at their
    sizes (the tokenizer too), and refuses a damaged bundle naming them and the command that repairs it, which does."""
    limits = Bundle(bundle_copy).limits
    (bundle_copy / "onnx" / "fp16" / "vae_encoder.onnx").unlink()
    unet = bundle_copy / "onnx" / "fp32" / "unet.onnx"
    unet.write_bytes(unet.read_bytes()[:1000])
    tokenizer = Bundle(bundle_copy).tokenizer_file
    tokenizer.unlink()
    assert main(["info", str(bundle_copy)]) == 1
    repair = said_to_run(capsys.readouterr().out)
    assert "--force" in repair
    assert main(["export", "random:tiny", "--out", str(bundle_copy)]) == 2
    err = capsys.readouterr().err
    assert "onnx/fp16/vae_encoder.onnx is missing" in err and "onnx/fp32/unet.onnx is 1000 bytes" in err, err
    assert f"{tokenizer.relative_to(bundle_copy)} is missing" in err, err
    assert said_to_run(err) == repair
    assert main(repair) == 0
    assert main(["info", str(bundle_copy)]) == 0
    assert Bundle(bundle_copy).limits == limits  # the command exports it as it was


def test_a_corrupt_manifest_says_a_command_that_exports_the_bundle_again(bundle_copy, capsys):
    """A corrupt manifest said "export the bundle again", which `export` refused with the same words: the command
    it gives names --force, and works."""
    (bundle_copy / MANIFEST).write_text('{"schema_version": 1, "model": ')
    assert main(["export", "random:tiny", "--out", str(bundle_copy)]) == 2
    command = said_to_run(capsys.readouterr().err)
    assert "--force" in command and "MODEL" in command
    command[command.index("MODEL")] = "random:tiny"
    assert main(command) == 0
    assert Bundle(bundle_copy).precisions == ("fp32", "fp16")


def test_truncated_onnx(bundle_copy):
    path = bundle_copy / "onnx" / "fp32" / "unet.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated"):
        generate(bundle_copy)


def test_garbage_onnx_of_the_right_size(bundle_copy):
    path = bundle_copy / "onnx" / "fp32" / "vae_decoder.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())
    with pytest.raises(BundleError, match=r"vae_decoder.onnx"):
        generate(bundle_copy)


def test_missing_onnx_and_tokenizer(bundle_copy):
    (bundle_copy / "onnx" / "fp32" / "text_encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing .*text_encoder.onnx"):
        generate(bundle_copy)
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer.json"):
        generate(bundle_copy)


def test_missing_precision(tmp_path, tiny_folder):
    out = export_bundle("random:tiny", tmp_path / "b", ("fp32",))
    with pytest.raises(BundleError, match="no fp16 ONNX"):
        generate(out, "fp16")


def test_an_export_the_disk_cannot_hold_is_refused_before_it_writes(
    tmp_path, tiny_folder, bundle_copy, disk_free, monkeypatch
):
    """Every graph plus the largest once more (its temporary trace) must fit in the free space under --out:
    refused otherwise, naming what it needs and what is free, before any file is written, and how to put the
    bundle elsewhere (--out; SDTURBO_CACHE for the cache's, where `generate --model` exports, which has no such
    --out); an existing bundle being completed is left as it was."""
    import re

    lm = bundle_writer.load_model("random:tiny")
    sizes = [*bundle_writer.weight_bytes(lm, "fp32").values(), *bundle_writer.weight_bytes(lm, "fp16").values()]
    need = sum(sizes) + max(sizes)
    disk_free(need - 1)
    said = rf"needs about [\d.]+ MB free in {re.escape(str(tmp_path))}: [\d.]+ MB of graphs, .*unet \(fp32\), twice"
    with pytest.raises(InputError, match=said + r"; [\d.]+ MB is free.*give --out on another disk$"):
        export_bundle("random:tiny", tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no bundle, no temporary folder
    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match=r"is free.*or set SDTURBO_CACHE to a folder on another disk \("):
        bundle_writer._check_disk(lm, tmp_path / "cache" / "bundles" / "random-tiny", ["fp32", "fp16"])
    disk_free(need)
    bundle_writer._check_disk(lm, tmp_path / "b", ["fp32", "fp16"])  # exactly enough: no error
    disk_free(0, total=0)
    bundle_writer._check_disk(lm, tmp_path / "b", ["fp32", "fp16"])  # a file system that reports no size


@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_the_disk_estimate_is_the_weights_the_graphs_hold(tiny_bundle, xl_bundle, model):
    """The estimate behind the free-space check is each component's weights in its precision (SDXL's VAE in
    fp32 in every precision): at least what the exported ONNX holds as initializers (within 5%), and not far
    above it (SDXL's encoders leave their last layer out, as the penultimate hidden states need it not: a
    seventh of the tiny models' weights, a twelfth of the released ones')."""
    import onnx

    path = tiny_bundle if model == "tiny" else xl_bundle
    bundle = Bundle(path)
    lm = bundle_writer.load_model("random:tiny" if model == "tiny" else "random:sdxl-tiny")
    for precision in ("fp32", "fp16"):
        estimate = bundle_writer.weight_bytes(lm, precision)
        assert sorted(estimate) == sorted(bundle.component_names)
        for name, n in estimate.items():
            graph = onnx.load(str(bundle.component(precision, name).onnx))
            held = sum(len(t.raw_data) for t in graph.graph.initializer)
            assert 0.8 * n <= held <= 1.05 * n, (precision, name, held, n)


def test_an_export_holds_one_module_at_a_time(tmp_path, xl_folder, monkeypatch):
    """Measured on full-size SDXL-Turbo fp16: the second text encoder's export beside the loaded UNet (and the rest)
    made the peak, 14.2 GB; with each module loaded for its own components and let go after, 8.9 GB. Each
    component is exported with its own module loaded and no other, in every precision, and the bundle is the one
    that loading everything at once made (the same sha256 per component, checked when this changed). SDXL's
    modules are SD's and one more."""
    from sdturbo.export.bundle_writer import COMPONENT_MODULES

    real, held = bundle_writer.export_record, []

    def spy(lm, spec, folder, precision, *args, **kwargs):
        before = sorted(lm.loaded)
        record = real(lm, spec, folder, precision, *args, **kwargs)  # a module first used here loads here
        held.append((spec.name, precision, sorted({*before, *lm.loaded})))
        return record

    monkeypatch.setattr(bundle_writer, "export_record", spy)
    out = export_bundle("random:sdxl-tiny", tmp_path / "b", ("fp32", "fp16"))
    names = Bundle(out).component_names
    assert sorted((n, p) for n, p, _ in held) == sorted((n, p) for n in names for p in ("fp32", "fp16"))
    for name, precision, loaded in held:
        assert loaded == [COMPONENT_MODULES[name][0]], (name, precision, loaded)


def test_a_module_that_fails_to_load_mid_export_is_named_and_leaves_nothing(tmp_path, tiny_folder, monkeypatch):
    """Modules load when their components are exported: a weights file that only its loader refuses is found
    after the text encoder is written, and is still one line naming the model, with nothing left behind."""
    from diffusers import UNet2DConditionModel

    def refuse(*args, **kwargs):
        raise OSError("Error no file named diffusion_pytorch_model.safetensors found")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", refuse)
    out = tmp_path / "b"
    with pytest.raises(InputError, match=r"cannot load the model random:tiny from .*no file named.*save the model"):
        export_bundle("random:tiny", out, ("fp32",))
    assert list(tmp_path.iterdir()) == []

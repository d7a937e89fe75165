"""Nothing lost: --force replaces bundles only, and atomically; the --model cache follows the model's content
and heals; concurrent first runs all succeed; killed runs' temporary folders are cleaned up."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file
from sdturbo.engine import files
from sdturbo.engine.bundle import MANIFEST, Bundle
from sdturbo.engine.cache import bundle_dir_for, cache_root, ensure_bundle
from sdturbo.engine.cli import main
from sdturbo.engine.errors import BundleError
from sdturbo.export import bundle_writer
from sdturbo.export.bundle_writer import export_bundle


def test_force_never_deletes_a_folder_that_is_not_a_bundle(tmp_path, tiny_folder, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    for force in ([], ["--force"]):
        code = main(["export", "random:tiny", "--out", str(out), "--precision", "fp32", *force])
        err = capsys.readouterr().err
        assert code == 2 and "is a folder that is not a bundle" in err and "left as it is" in err
        assert "pass --force" not in err
    assert (out / "holiday.jpg").read_bytes() == b"precious" and sorted(os.listdir(out)) == ["holiday.jpg"]


@pytest.mark.parametrize(
    "manifest,inner",
    [
        ('{"name": "My PWA", "start_url": "/"}', "src"),
        ("[1, 2]", "src"),
        ("not json", "src"),
        ('{"schema_version": 1, "model": {"config_hash": "x"}}', "src"),
        ('{"schema_version": 1, "model": {}, "components": {}}', "src"),
        ('{"name": "model zoo"}', "onnx/models"),  # an onnx/ folder, but not of a bundle's precisions
    ],
    ids=["web-app", "json-list", "not-json", "no-components", "no-model-hash", "onnx-not-precisions"],
)
def test_force_never_deletes_a_folder_whose_manifest_is_not_a_bundle_s(tmp_path, tiny_folder, capsys, manifest, inner):
    """A web app's or an extension's folder has a manifest.json too: with or without --force it is refused as
    not a bundle, and every file in it is kept."""
    out = tmp_path / "webapp"
    (out / inner).mkdir(parents=True)
    (out / MANIFEST).write_text(manifest)
    (out / inner / "app.js").write_text("code")
    before = sorted(out.rglob("*"))
    for force in ([], ["--force"]):
        code = main(["export", "random:tiny", "--out", str(out), "--precision", "fp32", *force])
        err = capsys.readouterr().err
        assert code == 2 and "is a folder that is not a bundle" in err and "left as it is" in err, err
    assert (out / MANIFEST).read_text() == manifest and (out / inner / "app.js").read_text() == "code"
    assert sorted(out.rglob("*")) == before  # nothing added, nothing taken


def test_force_replaces_a_bundle_of_another_schema_version(tmp_path, tiny_bundle):
    """A bundle this sdturbo cannot read (an older or newer schema) is still a bundle: --force replaces it."""
    out = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99"):
        export_bundle("random:tiny", out, ("fp32",))
    export_bundle("random:tiny", out, ("fp32",), force=True)
    assert Bundle(out).precisions == ("fp32",)


def test_force_replaces_a_bundle_and_readers_always_see_one(tmp_path, tiny_bundle, monkeypatch):
    out = shutil.copytree(tiny_bundle, tmp_path / "b")
    (tmp_path / ".b.tmp-abc123" / "onnx").mkdir(parents=True)  # as a kill -9 during an export leaves them
    (tmp_path / ".b.old-4242").mkdir()
    (tmp_path / ".other.tmp-xyz").mkdir()  # another bundle's: not ours to remove
    seen = []

    def watched(real):
        def call(*args, **kwargs):
            seen.append((out / MANIFEST).is_file())
            result = real(*args, **kwargs)
            seen.append((out / MANIFEST).is_file())
            return result

        return call

    # every rename and removal the swap makes is watched: a bundle must be at `out` before and after each
    monkeypatch.setattr(files.os, "replace", watched(os.replace))
    monkeypatch.setattr(files.shutil, "rmtree", watched(shutil.rmtree))
    export_bundle("random:tiny", out, ("fp16",), force=True)
    monkeypatch.undo()
    assert seen and all(seen)
    assert Bundle(out).precisions == ("fp16",)
    # the old bundle is gone, and so are the leftovers of killed runs of this bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-xyz", "b"]


def test_force_keeps_the_engines_and_optimized_graphs_built_from_the_bundle(tmp_path, tiny_bundle, caplog):
    """`export --force` deleted engines/ and ort-optimized/ with the old bundle, without a word (hours of builds
    at full size), and ort/ (ONNX Runtime's CPU session graphs: a minute at full size). Each is keyed by the
    sha256 of the ONNX it was made from, so they are kept: valid where the new ONNX is the same, found stale by
    their own checks where it is not."""
    from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
    from sdturbo.engine.backends.ort_cache import list_cached
    from sdturbo.engine.backends.ort_optimized import list_optimized
    from sdturbo.export.ort_optimize import optimize_bundle

    out = shutil.copytree(tiny_bundle, tmp_path / "b")
    optimize_bundle(out, ("text_encoder",), provider="cpu")
    plan = out / "engines" / "tensorrt-rtx-1.7-sm89" / "b1_64x64" / "unet.plan"  # (as `build` writes them)
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"an engine")
    plan.with_suffix(".json").write_text("{}")
    shutil.rmtree(out / "ort", ignore_errors=True)
    OnnxRuntimeBackend().session(Bundle(out), "unet")  # the CPU session cache, as a load writes it
    limits = dict(max_batch=4, min_size=32, max_size=256)
    with caplog.at_level("INFO"):
        export_bundle("random:tiny", out, ("fp32", "fp16"), force=True, **limits)
    assert plan.read_bytes() == b"an engine" and plan.with_suffix(".json").read_text() == "{}"
    assert [r["state"] for r in list_optimized(Bundle(out))] == ["valid"]  # the same ONNX: still in use
    assert [r["state"] for r in list_cached(Bundle(out))] == ["valid"]
    assert all(f"{c} (" in caplog.text for c in ("keeping engines", "ort-optimized", "ort"))
    export_bundle("random:tiny", out, ("fp32",), force=True, **limits)  # no fp16 ONNX now: stale, refused
    assert plan.is_file()
    assert [r["state"][:6] for r in list_optimized(Bundle(out))] == ["STALE:"]
    assert [r["state"] for r in list_cached(Bundle(out))] == ["valid"]  # the same fp32 ONNX
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not files._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here: replace_dir uses two renames")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_atomic_write_readers_see_old_or_new_and_a_failed_write_keeps_the_old(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    seen, real_fsync = [], os.fsync

    def fsync(fd):  # the moment a reader (or a kill -9) would catch the write half done
        seen.append(path.read_text())
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    files.atomic_write(path, "new")
    assert seen == ["old"] and path.read_text() == "new"

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space") as e:
        files.atomic_write(path, "newer")
    assert e.value.filename == str(path)  # named: a failed write() says only "[Errno 28] No space left on device"
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_disk_that_fills_during_an_export_is_named_and_nothing_is_left(tmp_path, monkeypatch, capsys):
    """The free-space check passed, then another writer filled the disk: the write fails with an OSError that
    names no file. The one line says where the export was writing (the disk to free), exit 1, and neither the
    bundle nor its temporary folder is left."""
    real = bundle_writer._write_onnx

    def disk_fills(lm, root, precisions):
        real(lm, root, precisions[:1])  # one precision written, then the next write fails
        (root / "onnx" / "partial.onnx").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_writer, "_write_onnx", disk_fills)
    out = tmp_path / "disk" / "b"
    out.parent.mkdir()
    assert main(["export", "random:tiny", "--out", str(out), "--precision", "all"]) == 1
    line = " ".join(capsys.readouterr().err.split("sdturbo: error: ")[-1].split())
    assert line == f"[Errno 28] No space left on device: '{out.parent}'", line
    assert os.listdir(out.parent) == []


def test_atomic_write_gives_the_usual_modes_not_the_temporary_file_s(tmp_path):
    """A manifest or cache file is written through a private temporary file (0600); the file in place gets the
    mode any file gets under the umask, so that other users (a server's) can read a shared bundle or cache."""
    umask = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_a_folder_however_spelled_has_one_lock(tmp_path, monkeypatch):
    """Writers of one bundle given as ``b``, ``./b``, its absolute path or a link to it wait for each other."""
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    spellings = [Path("b"), Path("./b"), tmp_path / "b", tmp_path / "link", Path("sub/../b")]
    assert len({files._lock_file(p) for p in spellings}) == 1


def test_replace_dir_without_an_atomic_exchange_leaves_only_the_new_folder(tmp_path, monkeypatch):
    """Where renameat2 is not available: two renames, and the old folder is removed, not left beside it."""
    new, dest = tmp_path / ".b.tmp-1", tmp_path / "b"
    for folder, text in ((new, "new"), (dest, "old")):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    files.replace_dir(new, dest)
    assert (dest / "manifest.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_the_model_cache_follows_changes_and_heals(tmp_path, tiny_folder, caplog):
    model = shutil.copytree(tiny_folder, tmp_path / "model")
    first = Bundle(ensure_bundle(str(model), "fp32"))
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1.01 for k, v in tensors.items()}, weights)  # new weights, same names and sizes
    with caplog.at_level("WARNING"):
        second = Bundle(ensure_bundle(str(model), "fp32"))
    assert "changed since its cached bundle was exported" in caplog.text
    assert second.root == first.root == bundle_dir_for(str(model))
    assert second.components["fp32"]["vae_decoder"].sha256 != first.components["fp32"]["vae_decoder"].sha256
    assert second.components["fp32"]["unet"].sha256 == first.components["fp32"]["unet"].sha256

    caplog.clear()
    comp = second.components["fp32"]["text_encoder"]
    target = comp.data or comp.onnx
    with open(target, "r+b") as f:  # damaged in the cache: the next run exports it again
        f.seek(target.stat().st_size // 2)
        f.write(b"\xff" * 64)
    with caplog.at_level("WARNING"):
        assert ensure_bundle(str(model), "fp32") == second.root
    assert "is damaged" in caplog.text and "exporting it again" in caplog.text
    Bundle(second.root).component("fp32", "text_encoder")  # intact again

    for damage in (b'{"schema_version": 1, "mod', b'{"schema_version": 1}'):  # cut short; keys lost
        caplog.clear()
        (second.root / MANIFEST).write_bytes(damage)  # (the cached bundle is still one: its onnx/ folder says so)
        with caplog.at_level("WARNING"):
            assert ensure_bundle(str(model), "fp32") == second.root
        assert "is damaged" in caplog.text and "exporting it again" in caplog.text
        Bundle(second.root).component("fp32", "text_encoder")


def test_a_model_folder_however_spelled_is_one_cached_bundle(tmp_path, tiny_folder, monkeypatch):
    """``mdl``, ``./mdl``, ``mdl/`` and its absolute path are one model: exported once, one bundle."""
    import sdturbo.export.bundle_writer as writer

    model = shutil.copytree(tiny_folder, tmp_path / "mdl")
    monkeypatch.chdir(tmp_path)
    loads = []
    load_model = writer.load_model
    monkeypatch.setattr(writer, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    roots = {ensure_bundle(spelling, "fp32") for spelling in ("mdl", "./mdl", "mdl/", str(model))}
    assert len(roots) == 1 and len(loads) == 1, (roots, len(loads))
    assert sorted(p.name for p in (cache_root() / "bundles").iterdir() if "mdl" in p.name) == [roots.pop().name]


def test_adding_a_precision_from_a_changed_model_is_refused(tmp_path, tiny_folder):
    model = shutil.copytree(tiny_folder, tmp_path / "model")
    out = export_bundle(str(model), tmp_path / "b", ("fp32",))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    with pytest.raises(BundleError, match="before its files changed"):
        export_bundle(str(model), out, ("fp16",))
    assert Bundle(out).precisions == ("fp32",)


def run_generate(cache: Path, precision: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "SDTURBO_CACHE": str(cache)}
    args = ["generate", "a cat", "--model", "random:tiny", "--size", "64x64", "--precision", precision]
    code = "import sys; from sdturbo.engine.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_first_runs_all_succeed(tmp_path):
    """Two first-time runs with a fresh cache, fp32 and fp16, started together: one builds the random model
    and the bundle, the other waits, then adds its precision. Both make their image."""
    cache = tmp_path / "cache"
    procs = [run_generate(cache, p, tmp_path / f"{p}.png") for p in ("fp32", "fp16")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert (tmp_path / "fp32.png").is_file() and (tmp_path / "fp16.png").is_file()
    bundles = list((cache / "bundles").iterdir())
    assert [b.name for b in bundles if not b.name.startswith(".")] == [bundle_dir_for("random:tiny").name]
    assert set(Bundle(cache / "bundles" / bundle_dir_for("random:tiny").name).precisions) == {"fp32", "fp16"}
    leftovers = [p.name for p in (cache / "bundles").iterdir()] + [p.name for p in (cache / "models").iterdir()]
    assert not [n for n in leftovers if ".tmp-" in n or ".old-" in n or n.startswith(".random-")]


def test_precision_adds_wait_for_each_other(tmp_path, tiny_bundle, monkeypatch):
    """While another process holds a bundle (here: a child that takes its lock as an export does), an export
    into it waits, instead of changing files under the other one."""
    out = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["components"]["fp16"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    marker = tmp_path / "holder-done"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from sdturbo.engine.files import locked\n"
            "with locked(Path(sys.argv[1]), 'test'):\n"
            "    print('held', flush=True); time.sleep(2); Path(sys.argv[2]).write_text('done')",
            str(out),
            str(marker),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert child.stdout.readline().strip() == "held"
    waited = []
    real = bundle_writer._existing
    monkeypatch.setattr(bundle_writer, "_existing", lambda *a: waited.append(marker.exists()) or real(*a))
    export_bundle("random:tiny", out, ("fp16",))
    child.wait(timeout=30)
    assert waited == [True]  # it looked at the bundle only once the other process was done with it
    assert set(Bundle(out).precisions) == {"fp32", "fp16"}
    assert json.loads((out / MANIFEST).read_text())["components"]["fp32"]


def test_a_model_file_rewritten_in_place_changes_the_folder_stamp(tmp_path):
    """The cache re-exports a local model whose files changed: a file rewritten with the same size (new
    weights of the same shapes) must change the stamp, by its modification time."""
    from sdturbo.engine.cache import folder_stamp

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "w.safetensors"
    weights.write_bytes(b"1" * 64)
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    before = folder_stamp(folder)
    weights.write_bytes(b"2" * 64)
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))
    assert folder_stamp(folder) != before


def test_a_mount_point_is_refused_before_the_export_naming_what_to_give(tmp_path, tiny_bundle, monkeypatch, capsys):
    """A new bundle is written beside --out and renamed into its place, which a mount point (a Docker volume, say)
    cannot take (EBUSY): an empty one, or one holding a bundle to replace with --force, is refused before
    the model loads, with a folder inside it to give instead; what is there is kept."""
    empty, full = tmp_path / "vol", tmp_path / "vol2"
    empty.mkdir()
    shutil.copytree(tiny_bundle, full)
    before = sorted(p.name for p in full.rglob("*"))
    monkeypatch.setattr(bundle_writer.os.path, "ismount", lambda p: Path(p) in (empty, full))
    monkeypatch.setattr(bundle_writer, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    for out, force in ((empty, []), (full, ["--force"])):
        code = main(["export", "random:tiny", "--out", str(out), "--precision", "fp32", *force])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {out} is a mount point" in err and f"--out {out / 'bundle'}" in err, err
    assert not any(empty.iterdir()) and sorted(p.name for p in full.rglob("*")) == before


@pytest.mark.parametrize(
    "error, message",
    [
        (errno.ENOTEMPTY, "appeared during the export and is not a bundle"),
        (errno.EBUSY, "the new bundle cannot be renamed to --out"),
    ],
)
def test_a_rename_that_fails_at_the_end_says_why(tmp_path, monkeypatch, error, message):
    """The last rename of a new bundle fails: a folder of other files put there meanwhile is named as such,
    anything else (EBUSY: a mount point made meanwhile) with the system's reason, never as the other."""
    out = tmp_path / "b"
    tmp = tmp_path / ".b.tmp-1"
    tmp.mkdir()

    def refuse(src, dst):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(bundle_writer.os, "replace", refuse)
    with pytest.raises(BundleError, match=message) as e:
        bundle_writer._publish(tmp, out)
    if error == errno.EBUSY:
        assert os.strerror(errno.EBUSY) in str(e.value)


def _hub(monkeypatch, tmp_path, tiny_folder) -> Path:
    """A Hub snapshot stand-in: ``user/model`` resolves to a copy of the tiny model (no network)."""
    from sdturbo.export import models

    snapshot = shutil.copytree(tiny_folder, tmp_path / "snapshot")
    monkeypatch.setattr(models, "_download", lambda repo_id: snapshot)
    return snapshot


def test_a_hub_model_s_cached_bundle_takes_a_precision_after_diffusers_added_the_fp16_variant(
    tmp_path, tiny_folder, monkeypatch, caplog
):
    """The model card's `from_pretrained(..., variant="fp16")` adds the fp16 weights to the Hub snapshot we export
    from. The bundle's stamp covered every file there, so `generate` on a GPU (fp16) after a CPU run (fp32)
    failed: "exported ... before its files changed; use --force", an option generate does not have. Files the
    export does not read no longer count; the fp32 graphs are kept, not exported again."""
    snapshot = _hub(monkeypatch, tmp_path, tiny_folder)
    first = Bundle(ensure_bundle("user/variant-added", "fp32"))  # (the session's cache: a name of its own)
    for sub, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        shutil.copy(snapshot / sub / f"{name}.safetensors", snapshot / sub / f"{name}.fp16.safetensors")
    (snapshot / "README.md").write_text("a model card")
    with caplog.at_level("WARNING"):
        both = Bundle(ensure_bundle("user/variant-added", "fp16"))
    assert caplog.records == [], caplog.text
    assert set(both.precisions) == {"fp32", "fp16"}
    assert both.components["fp32"]["unet"].sha256 == first.components["fp32"]["unet"].sha256


def test_a_hub_model_whose_weights_changed_is_exported_again_by_the_cache_not_refused(
    tmp_path, tiny_folder, monkeypatch, caplog
):
    """A new revision of the weights: the cache's bundle is replaced, with a warning (a local folder's is, too);
    `export --out` still refuses (test_adding_a_precision_from_a_changed_model_is_refused)."""
    snapshot = _hub(monkeypatch, tmp_path, tiny_folder)
    ensure_bundle("user/new-revision", "fp32")
    weights = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    with caplog.at_level("WARNING"):
        again = Bundle(ensure_bundle("user/new-revision", "fp16"))
    assert (
        "user/new-revision changed since its cached bundle was exported; exporting it again in fp16 (its fp32 graphs "
        "are exported again when next asked for)" in caplog.text
    )
    assert again.precisions == ("fp16",)


def test_the_stamp_covers_the_files_an_export_reads(tmp_path, tiny_folder):
    from sdturbo.export.models import model_files, model_stamp

    model = shutil.copytree(tiny_folder, tmp_path / "model")
    names = {p.relative_to(model).as_posix() for p in model_files(model)}
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    } <= names
    assert any(n.startswith("tokenizer/") for n in names)
    before = model_stamp(model)
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not read")
    (model / "notes.txt").write_text("not read")
    assert model_stamp(model) == before
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    assert model_stamp(model) != before
    # a folder with the fp16 variant alone: those are the weights read
    (model / "vae" / "diffusion_pytorch_model.safetensors").rename(
        model / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    )
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in {
        p.relative_to(model).as_posix() for p in model_files(model)
    }


def test_a_model_folder_copied_or_restored_keeps_its_cached_bundle(tmp_path, tiny_folder, monkeypatch, caplog):
    """A local model folder (or a whole cache, random models and all) copied or restored with ``cp -r`` has new
    mtimes and the same bytes: its cached bundle was exported again, a warning said the model changed, and where
    the export extra is not installed (a runtime-only deployment) the run failed. The bundle records the files'
    sha256 too: where the stamp differs, the content decides (hashed once). With SDTURBO_VERIFY=size nothing is
    hashed, and the stamp alone decides, as before."""
    model = shutil.copytree(tiny_folder, tmp_path / "model")
    root = ensure_bundle(str(model), "fp32")
    manifest = (root / MANIFEST).read_text()
    assert len(json.loads(manifest)["model"]["source_sha256"]) == 64
    for f in (p for p in model.rglob("*") if p.is_file()):  # as `cp -r` leaves them: the same bytes, new mtimes
        data = f.read_bytes()
        f.unlink()
        f.write_bytes(data)
        os.utime(f, ns=(7_000_000_000, 7_000_000_000))
    exports = []
    monkeypatch.setattr(bundle_writer, "load_model", lambda *a, **k: exports.append(a))
    with caplog.at_level("WARNING"):
        assert ensure_bundle(str(model), "fp32") == root
    assert exports == [] and "changed since" not in caplog.text and (root / MANIFEST).read_text() == manifest
    monkeypatch.undo()
    assert Bundle(export_bundle(str(model), root, ("fp16",))).precisions == ("fp32", "fp16")  # a precision added

    manifest = json.loads((root / MANIFEST).read_text())
    os.utime(model / "model_index.json", ns=(8_000_000_000, 8_000_000_000))
    monkeypatch.setenv("SDTURBO_VERIFY", "size")
    assert not models_unchanged(manifest, model)
    monkeypatch.delenv("SDTURBO_VERIFY")
    assert models_unchanged(manifest, model)
    config = model / "tokenizer" / "tokenizer_config.json"  # the content hash counts names and sizes too: a file
    config.rename(config.with_name(config.name + ".orig"))  # renamed where it sorts (the pad token changes), an
    assert not models_unchanged(manifest, model)  # empty file added, bytes moved between files (a helper's review)
    config.with_name(config.name + ".orig").rename(config)
    assert models_unchanged(manifest, model)
    (model / "tokenizer" / "added.txt").write_bytes(b"")
    assert not models_unchanged(manifest, model)
    (model / "tokenizer" / "added.txt").unlink()
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1.01 for k, v in tensors.items()}, weights)  # changed at the same size: exported again
    assert not models_unchanged(manifest, model)


def test_a_model_changed_while_its_export_reads_it_is_refused(tmp_path, tiny_folder, monkeypatch):
    """Files replaced while they are hashed, or during the export that follows: the manifest would name files the
    ONNX was not made from (and a stamp taken after the hash would vouch for the new ones). Refused, nothing kept."""
    from sdturbo.engine.errors import InputError
    from sdturbo.export import models

    model = shutil.copytree(tiny_folder, tmp_path / "model")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    real = models.content_sha256

    def replaced_after_reading(folder, *paths):
        sha = real(folder, *paths)
        weights.write_bytes(weights.read_bytes())  # a new file at the same size, read by nobody
        return sha

    monkeypatch.setattr(models, "content_sha256", replaced_after_reading)
    with pytest.raises(InputError, match="changed while they were read"):
        export_bundle(str(model), tmp_path / "b", ("fp32",))
    monkeypatch.undo()
    real_write = bundle_writer._write_onnx

    def replaced_during_export(*args):
        out = real_write(*args)
        os.utime(weights, ns=(9_000_000_000, 9_000_000_000))
        return out

    monkeypatch.setattr(bundle_writer, "_write_onnx", replaced_during_export)
    with pytest.raises(InputError, match="changed during the export"):
        export_bundle(str(model), tmp_path / "b", ("fp32",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def models_unchanged(manifest: dict, model: Path) -> bool:
    from sdturbo.export.models import unchanged_since

    return unchanged_since(manifest["model"]["source_stamp"], model, manifest["model"]["source_sha256"])


def test_a_bundle_stamped_before_keeps_matching_its_unchanged_model(tmp_path, tiny_folder, monkeypatch):
    """Bundles exported before the stamp covered only the files read recorded every file's: an unchanged model
    still matches them (the cache does not export it again), a changed one does not."""
    from sdturbo.engine.cache import folder_stamp
    from sdturbo.export import models

    model = shutil.copytree(tiny_folder, tmp_path / "model")
    root = ensure_bundle(str(model), "fp32")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["model"]["source_stamp"] = folder_stamp(model)  # as earlier versions wrote it
    (root / MANIFEST).write_text(json.dumps(manifest))
    exports = []
    monkeypatch.setattr(bundle_writer, "load_model", lambda *a, **k: exports.append(a))
    assert ensure_bundle(str(model), "fp32") == root and exports == []
    assert models.unchanged_since(manifest["model"]["source_stamp"], model)
    (model / "notes.txt").write_text("any file counted then")
    assert not models.unchanged_since(manifest["model"]["source_stamp"], model)


def test_a_hub_snapshot_s_stamp_follows_its_blobs_content_names_not_their_mtimes(tmp_path, tiny_folder):
    """A Hugging Face cache copied or restored (new mtimes, the same blobs) exported the bundle again and dropped
    its other precision (a helper's audit). A snapshot's files link to blobs named after their content: those
    names count, not the mtimes. A link elsewhere (a local folder's) still counts its target's mtime."""
    import hashlib

    from sdturbo.export.models import model_stamp

    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / ("0" * 40)
    for src in sorted(p for p in tiny_folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(tiny_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    before = model_stamp(snapshot)
    for blob in (repo / "blobs").iterdir():
        os.utime(blob, ns=(7_000_000_000, 7_000_000_000))
    assert model_stamp(snapshot) == before
    weights = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    target = weights.resolve()
    new_blob = target.with_name("f" * 64)  # a new revision's weights: another blob
    shutil.copyfile(target, new_blob)
    weights.unlink()
    weights.symlink_to(new_blob)
    assert model_stamp(snapshot) != before

    local = shutil.copytree(tiny_folder, tmp_path / "local")
    kept = tmp_path / "kept.safetensors"
    (local / "unet" / "diffusion_pytorch_model.safetensors").rename(kept)
    (local / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(kept)
    before = model_stamp(local)
    os.utime(kept, ns=(7_000_000_000, 7_000_000_000))  # rewritten where it lives
    assert model_stamp(local) != before

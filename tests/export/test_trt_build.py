"""Real TensorRT-RTX engines, built ahead of time on a CPU for a set compute capability."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'sdturbo[tensorrt-rtx]')")

from sdturbo.engine.bundle import COMPONENTS, MANIFEST, Bundle
from sdturbo.engine.engine_store import Profile, find_engine
from sdturbo.engine.errors import BackendError, BundleError, EngineCorrupt, InputError
from sdturbo.export.trt_build import build_engines

CC = 86
PROFILE = Profile.parse("1-2", "64-128")


@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "b"
    shutil.copytree(tiny_bundle, path)
    plans = build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0)
    return path, plans


def records(plans):
    return {p.stem: json.loads(p.with_suffix(".json").read_text()) for p in plans}


def test_every_engine_is_built_and_recorded(built):
    _, plans = built
    assert [p.stem for p in plans] == list(COMPONENTS)
    for p in plans:
        assert p.stat().st_size > 10_000
    assert not (plans[0].parent.parent / "timing.cache").exists()  # TensorRT-RTX has no build-time tuning


def test_engine_io_and_profiles_match_the_manifest(built):
    """Names and dtypes as TensorRT's parsed network has them, and the profile's min/opt/max shapes."""
    path, plans = built
    bundle = Bundle(path)
    for name, rec in records(plans).items():
        spec = bundle.component("fp16", name).spec
        declared = [(t.name, t.dtype, True) for t in spec.inputs] + [(t.name, t.dtype, False) for t in spec.outputs]
        assert [(t["name"], t["dtype"], t["is_input"]) for t in rec["io"]] == declared
        for t, io in zip(spec.inputs, rec["io"], strict=False):
            assert io["shape"] == [-1 if isinstance(d, str) else d for d in t.shape]
            want = [list(t.concrete(PROFILE.dims(w, bundle.vae_scale_factor))) for w in range(3)]
            assert rec["profile_shapes"][t.name] == want
        assert rec["key"]["onnx_sha256"] == bundle.components["fp16"][name].sha256


def test_unchanged_engines_are_kept(built):
    path, plans = built
    before = {p: p.stat().st_mtime_ns for p in plans}
    again = build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0)
    assert {p: p.stat().st_mtime_ns for p in again} == before


def test_a_changed_onnx_is_rebuilt_never_loaded(built):
    """Change unet.onnx as a re-export would (new bytes, new hash in the manifest)."""
    import onnx
    from sdturbo.engine.integrity import file_sha256

    path, plans = built
    bundle = Bundle(path)
    onnx_path = bundle.component("fp16", "unet").onnx
    model = onnx.load(str(onnx_path))
    model.doc_string = "re-exported"
    onnx.save(model, str(onnx_path))
    manifest = json.loads((path / MANIFEST).read_text())
    entry = manifest["components"]["fp16"]["unet"]
    entry["sha256"], entry["bytes"] = file_sha256(onnx_path), onnx_path.stat().st_size
    (path / MANIFEST).write_text(json.dumps(manifest))

    device, version = f"sm{CC}", records(plans)["unet"]["key"]["library_version"]
    with pytest.raises(BundleError, match="stale: the ONNX changed"):
        find_engine(Bundle(path), "unet", "tensorrt-rtx", version, device, PROFILE)
    unet_plan = plans[COMPONENTS.index("unet")]
    old = unet_plan.stat().st_mtime_ns
    build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0, components=("unet",))
    assert unet_plan.stat().st_mtime_ns != old
    assert find_engine(Bundle(path), "unet", "tensorrt-rtx", version, device, PROFILE) == unet_plan


def test_another_version_or_device_or_profile_is_not_loaded(built):
    path, plans = built
    bundle = Bundle(path)
    version = records(plans)["unet"]["key"]["library_version"]
    for flavour, ver, device, profile, match in [
        ("tensorrt-rtx", "9.9.9", f"sm{CC}", PROFILE, "no tensorrt-rtx 9.9.9 engine"),
        ("tensorrt-rtx", version, "sm89", PROFILE, "on sm89"),
        ("tensorrt-rtx", version, f"sm{CC}", Profile.parse("1", "64x64"), "profile b1_64x64"),
    ]:
        with pytest.raises(BundleError, match=match):
            find_engine(bundle, "unet", flavour, ver, device, profile)


def test_another_library_version_rebuilds(built, monkeypatch):
    """The version is part of the folder: a newer library builds its own engines beside the old ones."""
    import tensorrt_rtx

    path, plans = built
    monkeypatch.setattr(tensorrt_rtx, "__version__", "99.0.0")
    new = build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0, components=("text_encoder",))
    assert "tensorrt-rtx-99.0.0-sm86" in str(new[0]) and new[0] != plans[0]
    assert plans[0].is_file()


def test_another_compute_capability_builds_apart(built):
    path, _ = built
    new = build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=89, opt_level=0, components=("vae_encoder",))
    assert "-sm89" in str(new[0]) and new[0].is_file()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(compute_capability=90), BackendError, "compute capability 90 is not a target"),
        (dict(profile=Profile.parse("1", "100x64")), InputError, "width range 100-100"),
        (dict(profile=Profile.parse("1-8", "64x64")), InputError, "batch range 1-8"),
        (dict(components=("unet", "clip")), InputError, "component 'clip'"),
        (dict(opt_level=7), InputError, "--opt-level 7"),
        (dict(workspace_gb=-1.0), InputError, r"--workspace-gb -1.0 is not allowed; give a number of GiB above 0"),
        (dict(workspace_gb=0.0), InputError, r"--workspace-gb 0.0 is not allowed"),
        (dict(workspace_gb=float("nan")), InputError, r"--workspace-gb nan is not allowed"),
        (dict(workspace_gb=1e30), InputError, r"--workspace-gb 1e\+30 is not allowed; .* at most 1024"),
    ],
)
def test_bad_build_arguments(built, kwargs, error, match):
    path, _ = built
    kwargs = {"flavour": "tensorrt-rtx", "compute_capability": CC, "profile": PROFILE, **kwargs}
    with pytest.raises(error, match=match):
        build_engines(path, **kwargs)


def test_profile_parsing():
    assert Profile.parse("1", "512x512") == Profile((1, 1, 1), (512, 512, 512), (512, 512, 512))
    assert Profile.parse("1-4", "256-1024").height == (256, 256, 1024)
    assert Profile.parse("2", "768x512").width == (768, 768, 768)
    with pytest.raises(InputError, match="--batch '0'"):
        Profile.parse("0")
    with pytest.raises(InputError, match="--size '9-3'"):
        Profile.parse("1", "9-3")


def test_info_lists_engines(built):
    from sdturbo.engine.info import describe

    path, _ = built
    text = describe(path)
    assert "tensorrt-rtx" in text and "unet" in text and "not for here" in text


def test_build_record_corruption_is_a_clear_error(built, tmp_path):
    path, plans = built
    copy = shutil.copytree(path, tmp_path / "c")
    rec = next((copy / "engines").glob("tensorrt-rtx-*-sm86/*/unet.json"))
    rec.write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        find_engine(
            Bundle(copy), "unet", "tensorrt-rtx", records(plans)["unet"]["key"]["library_version"], f"sm{CC}", PROFILE
        )


def test_missing_trt_is_a_clear_error(monkeypatch, built):
    import importlib

    path, _ = built
    real = importlib.import_module

    def no_trt(name, *a, **k):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_trt)
    with pytest.raises(BackendError, match="no usable TensorRT"):
        build_engines(path)


def test_engines_built_without_the_capture_flag_are_rebuilt(built, tmp_path):
    """TensorRT-RTX needs REQUIRE_USER_ALLOCATION for CUDA-graph capture; the flags are part of the key, so an
    engine recorded without them (built before the flag was set) is stale, never loaded, and gets rebuilt."""
    path, _ = built
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    plans = build_engines(copy, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0, components=("unet",))
    record_path = plans[0].with_suffix(".json")
    rec = json.loads(record_path.read_text())
    assert rec["key"]["builder_flags"] == ["REQUIRE_USER_ALLOCATION"]
    del rec["key"]["builder_flags"]
    record_path.write_text(json.dumps(rec))
    version = rec["key"]["library_version"]
    with pytest.raises(BundleError, match="stale: other builder flags"):
        find_engine(Bundle(copy), "unet", "tensorrt-rtx", version, f"sm{CC}", PROFILE)
    before = plans[0].stat().st_mtime_ns
    build_engines(copy, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0, components=("unet",))
    assert plans[0].stat().st_mtime_ns != before
    assert json.loads(record_path.read_text())["key"]["builder_flags"] == ["REQUIRE_USER_ALLOCATION"]


def test_a_damaged_plan_is_rebuilt_never_loaded(built, tmp_path, caplog):
    """A plan changed in place (same size, mtime set back) fails its recorded sha256: EngineCorrupt, which the
    runtime and `sdturbo build` treat as missing (rebuilt with a warning), never loaded."""
    path, _ = built
    copy = shutil.copytree(path, tmp_path / "b")
    plan = next((copy / "engines").glob(f"tensorrt-rtx-*-sm{CC}/*/vae_decoder.plan"))
    version = json.loads(plan.with_suffix(".json").read_text())["key"]["library_version"]
    find_engine(Bundle(copy), "vae_decoder", "tensorrt-rtx", version, f"sm{CC}", PROFILE)  # fine, and stamped
    st = plan.stat()
    with open(plan, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(bytes(255 - b for b in f.read(256)[:256]))
    os.utime(plan, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(EngineCorrupt, match="does not match its recorded sha256"):
        find_engine(Bundle(copy), "vae_decoder", "tensorrt-rtx", version, f"sm{CC}", PROFILE)
    with caplog.at_level("WARNING"):
        build_engines(copy, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0, components=("vae_decoder",))
    assert "vae_decoder" in caplog.text and "rebuilding it" in caplog.text
    find_engine(Bundle(copy), "vae_decoder", "tensorrt-rtx", version, f"sm{CC}", PROFILE)


def test_force_rebuilds_every_engine_even_when_up_to_date_at_any_allowed_level(built, monkeypatch):
    """--force builds again engines whose key still matches (a suspect plan); every level 0 to 5 is allowed."""
    from sdturbo.export import trt_build

    path, plans = built
    rebuilt = []

    def build_one(trt, bundle, name, key, profile, target, opt_level, workspace_gb, folder, cancel):
        rebuilt.append((name, opt_level))
        return folder / f"{name}.plan"

    monkeypatch.setattr(trt_build, "_build_one", build_one)
    assert build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0) == plans
    assert rebuilt == []  # up to date: kept
    for level in (0, 5):
        again = build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=level, force=True)
        assert again == plans and rebuilt == [(p.stem, level) for p in plans]
        rebuilt.clear()


def test_a_setting_given_that_differs_from_the_engine_s_rebuilds_it_and_defaults_keep_it(built, tmp_path, caplog):
    """--opt-level and --workspace-gb given on the command line rebuild an engine built with other values (one line
    says which, old and new); left out (generate's builds, `build` without them) any engine is kept."""
    from sdturbo.engine.cli import main

    path, _ = built
    copy = shutil.copytree(path, tmp_path / "b")
    args = ["build", str(copy), "--trt", "tensorrt-rtx", "--compute-capability", str(CC), "--components", "unet"]
    args += ["--batch", "1-2", "--size", "64-128"]
    plan = next((copy / "engines").glob(f"tensorrt-rtx-*-sm{CC}/*/unet.plan"))

    def built_with():
        return json.loads(plan.with_suffix(".json").read_text())["builder"], plan.stat().st_mtime_ns

    (level0, before) = built_with()
    assert level0["optimization_level"] == 0 and level0["workspace_gb"] is None
    for same in ([], ["--opt-level", "0"]):  # left out, or the same: kept
        with caplog.at_level("INFO"):
            assert main([*args, *same]) == 0
        assert built_with() == (level0, before) and "engine up to date" in caplog.text
        caplog.clear()
    with caplog.at_level("INFO"):
        assert main([*args, "--opt-level", "1"]) == 0
    assert "unet: rebuilding: --opt-level 1 given, the engine was built with 0" in caplog.text
    (level1, after) = built_with()
    assert level1["optimization_level"] == 1 and after != before
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main([*args, "--opt-level", "1", "--workspace-gb", "2"]) == 0
    assert "unet: rebuilding: --workspace-gb 2.0 given, the engine was built with the default" in caplog.text
    assert built_with()[0]["workspace_gb"] == 2.0
    again = built_with()
    assert main(args) == 0 and built_with() == again  # the defaults rebuild nothing
    build_engines(copy, "tensorrt-rtx", PROFILE, compute_capability=CC, components=("unet",))
    assert built_with() == again


CTRL_C_IN_THE_BUILD = """
import logging, os, signal, sys
from sdturbo.engine.cli import main

class CtrlC(logging.Handler):  # Ctrl-C as TensorRT's build starts: from inside its progress monitor's callback
    def emit(self, record):
        if "Building engine" in record.getMessage():
            os.kill(os.getpid(), signal.SIGINT)

logging.getLogger("sdturbo.export.trt_build").addHandler(CtrlC())
rc = main(sys.argv[1:])
print("handler restored:", signal.getsignal(signal.SIGINT) is signal.default_int_handler, file=sys.stderr)
sys.exit(rc)
"""


def test_ctrl_c_during_a_build_cancels_it_exit_130_and_nothing_is_written(tiny_bundle, tmp_path):
    """TensorRT calls Python back (logger, progress monitor) from inside the build and catches what they raise:
    Python's KeyboardInterrupt raised there was swallowed, the build finished and exited 0. Ctrl-C now cancels the
    build through the progress monitor: exit 130, "interrupted", no engine written, the usual handler back."""
    import subprocess
    import sys

    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    args = ["build", str(path), "--trt", "tensorrt-rtx", "--compute-capability", str(CC), "--components", "unet"]
    r = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_THE_BUILD, *args, "--size", "64-128"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 130, r.stderr
    assert "sdturbo: interrupted" in r.stderr and "handler restored: True" in r.stderr
    assert "Determining refit engines" not in r.stderr  # cancelled at its start, not run to its end
    assert [p.name for p in (path / "engines").rglob("*") if p.is_file()] == []


def test_an_engine_the_disk_cannot_hold_is_refused_before_it_is_built(built, tmp_path, monkeypatch, disk_free):
    """Each engine to build checks the free space first (a full-size build takes minutes, and a plan is written
    only at its end): the component's fp16 weights and room for its kernels (the tiny engines hold 2-10 MB of them
    beside 0.15-2 MB of weights). Short of that: one line, nothing built, the engines before it kept; with that
    much: built."""
    import re

    from sdturbo.export import trt_build

    path, plans = built
    copy = shutil.copytree(path, tmp_path / "b")
    need = Bundle(copy).component("fp16", "unet").bytes + trt_build.KERNELS_BYTES
    for p in plans:  # what is asked for holds what was built (with the weights alone it did not: 2 MB for 9 MB)
        assert Bundle(copy).component("fp16", p.stem).bytes + trt_build.KERNELS_BYTES > p.stat().st_size
    built_now, real = [], trt_build._build_one
    monkeypatch.setattr(
        trt_build, "_build_one", lambda trt, b, name, *a: built_now.append(name) or real(trt, b, name, *a)
    )
    plan = next((copy / "engines").glob(f"tensorrt-rtx-*-sm{CC}/*/unet.plan"))
    before = {p: p.stat().st_mtime_ns for p in plan.parent.iterdir()}
    disk_free(need - 1)
    said = rf"building the unet engine needs about [\d.]+ MB free in {re.escape(str(plan.parent))}: an engine holds "
    weights = r"its fp16 weights, [\d.]+ MB, and its kernels, 32.0 MB allowed; [\d.]+ MB is free there"
    with pytest.raises(InputError, match=said + weights):
        build_engines(copy, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0, force=True)
    assert built_now == ["text_encoder"]  # built before the UNet, kept; the UNet's engine untouched
    assert {p: p.stat().st_mtime_ns for p in plan.parent.iterdir() if p.stem != "text_encoder"} == {
        p: t for p, t in before.items() if p.stem != "text_encoder"
    }
    disk_free(need)
    build_engines(copy, "tensorrt-rtx", PROFILE, compute_capability=CC, opt_level=0, components=("unet",), force=True)
    assert built_now == ["text_encoder", "unet"]


def test_a_build_onto_a_disk_too_small_for_its_plan_is_one_line_before_it_starts(tiny_bundle, tmp_path, capsys):
    """A real full disk: a 12 MB tmpfs holding the bundle, 9.5 MB free. The weights alone (2 MB for the UNet) let
    the build start, then writing its 9 MB plan failed ("[Errno 28] No space left on device: ...unet.plan", exit 1).
    Now the check counts the kernels too: one line before anything is built, exit 2, nothing written."""
    import subprocess

    from sdturbo.engine.cli import main

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here (root only): {mount.stderr.decode().strip()}")
    try:
        path = disk / "b"
        shutil.copytree(tiny_bundle, path, ignore=shutil.ignore_patterns("fp32"))
        args = ["build", str(path), "--trt", "tensorrt-rtx", "--compute-capability", str(CC), "--size", "64x64"]
        assert main(args) == 2
        line = " ".join(capsys.readouterr().err.split("sdturbo: error: ")[-1].split())
        assert line.startswith("building the text_encoder engine needs about "), line
        assert "its kernels, 32.0 MB allowed" in line and "Free some space" in line, line
        assert [p.name for p in (path / "engines").rglob("*") if p.is_file()] == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_disk_that_fills_while_an_engine_is_written_is_named_and_nothing_is_left(
    tiny_bundle, tmp_path, monkeypatch, capsys
):
    """The check passed, then the disk filled: writing the build record fails after the plan was written. One line
    naming where, exit 1 (as export's and --ort-optimize's), and no plan is left without its record."""
    from sdturbo.engine.cli import main
    from sdturbo.export import trt_build

    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    real = trt_build.atomic_write

    def disk_fills(target, data):
        if target.suffix == ".json":
            raise OSError(28, "No space left on device", str(target))
        real(target, data)

    monkeypatch.setattr(trt_build, "atomic_write", disk_fills)
    args = ["build", str(path), "--trt", "tensorrt-rtx", "--compute-capability", str(CC), "--size", "64x64"]
    assert main([*args, "--components", "text_encoder"]) == 1
    folder = next((path / "engines").glob(f"tensorrt-rtx-*-sm{CC}/b1_64x64"))
    line = " ".join(capsys.readouterr().err.split("sdturbo: error: ")[-1].split())
    assert line == f"[Errno 28] No space left on device: '{folder / 'text_encoder.json'}'", line
    assert [p.name for p in folder.iterdir()] == []

"""Nothing silently wrong: a bundle or cache file changed in place is found (sha256, hashed once per change),
a damaged cache is rebuilt, never used, and a manifest cannot point outside its bundle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from sdturbo.engine import integrity
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.backends.ort_cache import cache_paths, cached_model
from sdturbo.engine.bundle import DEFAULT_LIMITS, MANIFEST, Bundle
from sdturbo.engine.cache import cache_root
from sdturbo.engine.cli import build_parser, main
from sdturbo.engine.errors import BundleError, InputError, IntegrityError
from sdturbo.engine.info import describe
from sdturbo.engine.pipeline import Pipeline

from tests.export.test_bundle_writer import said_to_run  # the `sdturbo ...` command a message gives


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "copy")


def generate(path, precision="fp32"):
    return Pipeline(path, OnnxRuntimeBackend(precision, cache_optimized=False))(["a cat"], height=64, width=64)


def damage(path, offset_fraction=0.5, n=4096, keep_mtime=True):
    """Overwrite ``n`` bytes in the middle of ``path`` in place: same size, same inode, mtime restored."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(int(st.st_size * offset_fraction))
        f.write(os.urandom(min(n, st.st_size // 4)))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def count_hashes(monkeypatch):
    calls = []
    real = integrity.file_sha256

    def counting(*paths):
        calls.append(paths)
        return real(*paths)

    monkeypatch.setattr(integrity, "file_sha256", counting)
    return calls


def test_a_component_changed_in_place_is_refused(bundle_copy, tmp_path, capsys):
    generate(bundle_copy)  # verified and stamped
    unet = Bundle(bundle_copy).components["fp32"]["unet"]
    damage(unet.data or unet.onnx)  # same size, mtime set back: only the content (and ctime) differ
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        generate(bundle_copy)
    code = main(
        ["generate", "a cat", "--bundle", str(bundle_copy), "--size", "64x64", "--out", str(tmp_path / "x.png")]
    )
    assert code == 2 and not (tmp_path / "x.png").exists()
    err = capsys.readouterr().err  # what was damaged, and the command that mends it (README: "names the command")
    assert "sha256" in err and err.rstrip().endswith(f"{Bundle(bundle_copy).export_hint}"), err
    assert "export it again: `sdturbo export random:tiny " in err, err
    report = describe(bundle_copy)
    assert "fp32  unet" in report and "BROKEN" in report.split("fp32  unet")[1].splitlines()[0]


@pytest.mark.parametrize("precisions", [("fp32", "fp16"), ("fp32",), ("fp16",)], ids="+".join)
def test_export_hint_is_the_command_that_exports_the_bundle_as_it_was(bundle_copy, precisions):
    """ "export it again" gives the command that makes this bundle again: its model, precisions and limits (batch
    <= 4, sides 32-256, not the defaults). A two-precision bundle's names no --precision: one naming fp32, followed
    with --force, would lose fp16."""
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["components"] = {p: manifest["components"][p] for p in precisions}
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    bundle = Bundle(bundle_copy)
    assert bundle.precisions == precisions
    args = build_parser().parse_args(said_to_run(bundle.export_hint))  # (its wording: test_a_component_changed...)
    assert (args.func.__name__, args.model, args.out, args.force) == (
        "cmd_export",
        "random:tiny",
        str(bundle_copy),
        True,
    )
    assert (("fp32", "fp16") if args.precision in (None, "all") else (args.precision,)) == precisions
    limits = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in DEFAULT_LIMITS.items()
    }
    assert limits == {"max_batch": 4, "min_size": 32, "max_size": 256} == {n: getattr(bundle.limits, n) for n in limits}


def test_a_changed_recorded_sha256_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    sha = manifest["components"]["fp32"]["vae_decoder"]["sha256"]
    manifest["components"]["fp32"]["vae_decoder"]["sha256"] = sha[:-1] + ("0" if sha[-1] != "0" else "1")
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="vae_decoder"):
        Bundle(bundle_copy).component("fp32", "vae_decoder")


def test_files_are_hashed_once_then_only_after_a_change(bundle_copy, monkeypatch):
    calls = count_hashes(monkeypatch)
    b = Bundle(bundle_copy)
    b.component("fp32", "unet")
    assert len(calls) == 1
    b.component("fp32", "unet")
    Bundle(bundle_copy).component("fp32", "unet")
    assert len(calls) == 1  # the stamp stands for the hash
    b.component("fp32", "unet", rehash=True)  # info --verify
    assert len(calls) == 2
    comp = b.components["fp32"]["unet"]
    path = comp.data or comp.onnx
    path.write_bytes(path.read_bytes())  # rewritten, same bytes: hashed again, and still fine
    b.component("fp32", "unet")
    assert len(calls) == 3


def test_a_grown_component_is_refused_as_a_shrunk_one(bundle_copy):
    comp = Bundle(bundle_copy).components["fp32"]["text_encoder"]
    with open(comp.data or comp.onnx, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="bytes but the manifest says"):
        Bundle(bundle_copy).component("fp32", "text_encoder")


def test_export_stamps_what_it_wrote(tiny_bundle, monkeypatch):
    calls = count_hashes(monkeypatch)
    b = Bundle(tiny_bundle)
    for name in b.component_names:
        b.component("fp16", name)
    b.prompt_tokenizers()
    assert calls == []  # the first load after an export hashes nothing


@pytest.mark.parametrize("rel", ["../../../../etc/hostname", "/etc/hostname", "onnx/../../x.onnx"])
def test_manifest_paths_stay_inside_the_bundle(bundle_copy, rel):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["components"]["fp32"]["unet"]["onnx"] = rel
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="must stay inside the bundle"):
        Bundle(bundle_copy)


def test_tokenizer_damage_is_found_and_reported(bundle_copy):
    tok = bundle_copy / "tokenizer.json"
    text = tok.read_text()
    tok.write_text(text.replace('"model"', '"modle"', 1))
    with pytest.raises(IntegrityError, match=r"tokenizer.*export it again: `sdturbo export random:tiny"):
        Bundle(bundle_copy).prompt_tokenizers()
    assert "tokenizer.json              [BROKEN" in describe(bundle_copy)
    tok.unlink()
    with pytest.raises(BundleError, match=r"missing tokenizer\.json"):
        generate(bundle_copy)
    assert "tokenizer.json              [BROKEN: tokenizer.json is missing]" in describe(bundle_copy)


def test_info_says_ok_only_for_intact_files(bundle_copy):
    report = describe(bundle_copy, verify=True)
    assert "BROKEN" not in report and report.count("[ok]") == 8 + 1  # 4 components x 2 precisions, 1 tokenizer
    comp = Bundle(bundle_copy).components["fp16"]["vae_encoder"]
    path = comp.data or comp.onnx
    path.write_bytes(os.urandom(path.stat().st_size))  # random bytes of the same size
    line = next(x for x in describe(bundle_copy).splitlines() if "fp16  vae_encoder" in x)
    assert "BROKEN" in line and "sha256" in line


def test_info_exits_1_when_a_file_is_broken(bundle_copy, capsys):
    """`sdturbo info` as a health check: 0 for an intact bundle, 1 (with the report) when a file is broken."""
    assert main(["info", str(bundle_copy)]) == 0
    comp = Bundle(bundle_copy).components["fp32"]["unet"]
    damage(comp.data or comp.onnx)
    capsys.readouterr()
    assert main(["info", str(bundle_copy), "--verify"]) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_info_lists_stray_and_incomplete_engines_and_the_session_cache(bundle_copy, capsys):
    """A tiny_vae_decoder engine (copied from another bundle) in a bundle without a tiny VAE made `info` crash
    (KeyError: 'tiny_vae_decoder', exit 1); a .plan without its build record was not listed, nor was the ort/
    CPU session cache and its size."""
    folder = bundle_copy / "engines" / "tensorrt-rtx-1.7.1-sm89" / "b1_64x64"
    folder.mkdir(parents=True)
    key = {
        "component": "tiny_vae_decoder",
        "onnx_sha256": "0" * 64,
        "library": "tensorrt-rtx",
        "library_version": "1.7.1",
        "device": "sm89",
        "profile": {"batch": [1, 1, 1], "height": [64, 64, 64], "width": [64, 64, 64]},
        "builder_flags": ["REQUIRE_USER_ALLOCATION"],
    }
    (folder / "tiny_vae_decoder.plan").write_bytes(b"an engine")
    (folder / "tiny_vae_decoder.json").write_text(json.dumps({"key": key, "plan_bytes": 9, "plan_sha256": "0" * 64}))
    (folder / "unet.plan").write_bytes(b"an engine whose build was killed before its record")
    shutil.rmtree(bundle_copy / "ort", ignore_errors=True)  # (the copy's may hold what other tests loaded)
    Pipeline(bundle_copy, OnnxRuntimeBackend()).load()  # writes the CPU session cache
    assert main(["info", str(bundle_copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    tiny, unet = (next(x for x in lines if name in x) for name in ("tiny_vae_decoder", "unet.plan"))
    assert "tiny_vae_decoder" in tiny and "not a component of this bundle" in tiny, tiny
    assert "incomplete: no build record" in unet, unet
    cache = lines.index(next(x for x in lines if x.startswith("ort cache:")))
    assert f"{sum(f.stat().st_size for f in (bundle_copy / 'ort').rglob('*')) / 1e6:.1f} MB" in lines[cache]
    cached = [(x.split()[4], x.split()[-1]) for x in lines[cache + 1 :]]  # what the load wrote: txt2img's
    assert cached == [(name, "[valid]") for name in ("text_encoder", "unet", "vae_decoder")], lines[cache:]


def test_a_damaged_ort_cache_is_rebuilt_never_used(bundle_copy, caplog):
    fresh = generate(bundle_copy)
    Pipeline(bundle_copy, OnnxRuntimeBackend()).load()  # writes the optimized graphs
    b = Bundle(bundle_copy)
    comp = b.component("fp32", "unet")
    model, _ = cache_paths(b, onnxruntime.__version__, "fp32", "unet")
    data = model.with_name(model.name + ".data")
    damage(data if data.is_file() else model)
    with caplog.at_level("WARNING"):
        assert cached_model(b, comp, onnxruntime.__version__, "fp32") is None
    assert "cached optimized unet graph" in caplog.text and "rebuilding" in caplog.text
    out = Pipeline(bundle_copy, OnnxRuntimeBackend())(["a cat"], height=64, width=64)  # rebuilds the cache
    np.testing.assert_array_equal(out, fresh)
    assert cached_model(b, comp, onnxruntime.__version__, "fp32") == model


def test_without_a_home_a_bundle_is_hashed_and_runs_and_the_cache_names_sdturbo_cache(bundle_copy, monkeypatch):
    """No cache root to be found (no $HOME, and a user id without a passwd entry, as a container's --user gives):
    a bundle given by path still loads, hashed each time since no stamp can be kept; what needs the cache says
    to set SDTURBO_CACHE, in one line, not a traceback."""
    for name in ("SDTURBO_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(InputError, match=r"^cannot find a cache folder \(Could not .*\); set SDTURBO_CACHE to a"):
        cache_root()
    hashed = count_hashes(monkeypatch)
    assert generate(bundle_copy).shape == (1, 64, 64, 3)
    first = list(hashed)
    assert generate(bundle_copy).shape == (1, 64, 64, 3)
    assert first and hashed[len(first) :] == first  # hashed again on the next load: nothing was stamped


def test_checked_cache_files(tmp_path, caplog):
    path = tmp_path / "unet.runtime-cache"
    integrity.write_checked(path, b"kernels" * 100)
    assert integrity.read_checked(path, "the runtime cache") == b"kernels" * 100
    damage(path, n=8)
    with caplog.at_level("WARNING"):
        assert integrity.read_checked(path, "the runtime cache") is None
    assert "does not match its checksum" in caplog.text
    assert not path.exists()  # made again by the next save
    assert integrity.read_checked(path, "the runtime cache") is None


def test_size_only_mode_is_a_choice_and_a_bad_mode_is_refused(bundle_copy, monkeypatch):
    comp = Bundle(bundle_copy).components["fp32"]["vae_decoder"]
    damage(comp.data or comp.onnx)
    monkeypatch.setenv("SDTURBO_VERIFY", "size")
    Bundle(bundle_copy).component("fp32", "vae_decoder")  # trusted at the right size: the documented risk
    with pytest.raises(IntegrityError):
        Bundle(bundle_copy).component("fp32", "vae_decoder", rehash=True)  # info --verify still hashes
    monkeypatch.setenv("SDTURBO_VERIFY", "sha265")
    with pytest.raises(InputError, match="SDTURBO_VERIFY='sha265' is not allowed"):
        Bundle(bundle_copy).component("fp32", "vae_decoder")


def test_a_cache_file_without_its_checksum_is_not_used(tmp_path):
    path = tmp_path / "unet.runtime-cache"
    integrity.write_checked(path, b"kernels" * 100)
    path.with_name(path.name + ".sha256").unlink()  # an older sdturbo's, or its checksum lost
    assert integrity.read_checked(path, "the runtime cache") is None
    assert not path.exists()


def test_a_file_changed_while_it_is_hashed_is_hashed_again(tmp_path, monkeypatch):
    """The stamp records the file as it was hashed: a change made meanwhile is not trusted on the next load."""
    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "unet.onnx"
    path.write_bytes(b"weights" * 1000)
    sha = integrity.file_sha256(path)
    real = integrity.file_sha256

    def changed_meanwhile(*paths):
        out = real(*paths)
        damage(path, n=64, keep_mtime=False)
        return out

    monkeypatch.setattr(integrity, "file_sha256", changed_meanwhile)
    assert integrity.verify([path], sha, "the unet")  # hashed right, as it was read
    monkeypatch.setattr(integrity, "file_sha256", real)
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        integrity.verify([path], sha, "the unet")


def with_external_data(bundle, precision="fp32", name="unet"):
    """The bundle's ``name`` saved as .onnx + .onnx.data, as export saves graphs over 2 GB, and its manifest entry
    made to match: sha256 of both files' bytes, one after the other, and their total size."""
    import hashlib

    import onnx

    manifest = json.loads((bundle / MANIFEST).read_text())
    entry = manifest["components"][precision][name]
    onnx_path = bundle / entry["onnx"]
    onnx.save_model(
        onnx.load(str(onnx_path)),
        str(onnx_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=onnx_path.name + ".data",
        size_threshold=0,
    )
    files = [onnx_path, onnx_path.with_name(onnx_path.name + ".data")]
    entry["data"] = str(files[1].relative_to(bundle))
    entry["sha256"] = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    entry["bytes"] = sum(f.stat().st_size for f in files)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return files[1]


def test_a_component_s_external_data_file_is_checked_too(bundle_copy):
    """The weights of a large graph live in its .data file: their damage is found as the .onnx file's is."""
    data = with_external_data(bundle_copy)
    comp = Bundle(bundle_copy).component("fp32", "unet")
    assert comp.data == data and data.stat().st_size > comp.onnx.stat().st_size
    damage(data)
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        Bundle(bundle_copy).component("fp32", "unet")
    assert "BROKEN" in next(x for x in describe(bundle_copy).splitlines() if "fp32  unet" in x)


def test_info_verify_hashes_again_what_a_stamp_would_trust(bundle_copy):
    """Damage that leaves a file's stat as it was (bit rot on the disk: same size, times, inode) keeps its stamp,
    so a load trusts it; `sdturbo info --verify` hashes every file again and finds it, component and tokenizer."""
    b = Bundle(bundle_copy)
    comp = b.components["fp16"]["unet"]
    files = [comp.onnx] + ([comp.data] if comp.data else [])
    damage(files[-1])
    tok = bundle_copy / "tokenizer.json"
    spec = json.loads(tok.read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # still a tokenizer, a wrong one
    tok.write_text(json.dumps(spec))
    for paths, sha in ((files, comp.sha256), ([tok], b.tokenizer_sha256[tok])):
        integrity.stamp(paths, sha)  # the stamp of the file as it now is: as if its stat had not changed
    report = describe(bundle_copy)
    assert "BROKEN" not in report  # trusted by its stamp: what --verify is for
    broken = []
    lines = describe(bundle_copy, verify=True, broken=broken).splitlines()
    assert "BROKEN" in next(x for x in lines if "fp16  unet" in x)
    assert "BROKEN" in next(x for x in lines if x.lstrip().startswith("tokenizer.json"))
    assert broken == ["fp16 unet", "tokenizer.json"]


def test_info_exits_1_when_a_tokenizer_is_broken(bundle_copy, capsys):
    (bundle_copy / "tokenizer.json").unlink()
    assert main(["info", str(bundle_copy)]) == 1
    assert "tokenizer.json              [BROKEN" in capsys.readouterr().out


def test_the_integrity_cost_benchmark_hashes_every_component(bundle_copy, monkeypatch, capsys):
    """benchmarks/integrity_cost.py's first table is the cost of hashing: each component hashed, stamps or not."""
    from sdturbo.benchmarks import integrity_cost

    b = Bundle(bundle_copy)
    for name in b.component_names:
        b.component("fp32", name)  # stamped: a plain check would hash nothing
    calls = count_hashes(monkeypatch)
    integrity_cost.main([str(bundle_copy), "--precision", "fp32"])
    assert len(calls) == len(b.component_names)  # once each, in the table; none in the stamped check after it
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in b.component_names) and "stamped check of 4 components" in out

"""ONNX Runtime's optimized graphs are cached in the bundle, keyed by the ONNX hash; the same images result."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
from sdturbo.engine.backends import ort_cache
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.backends.ort_cache import cache_paths, cached_model
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.pipeline import Pipeline


def test_cache_is_written_then_used_with_identical_images(tiny_bundle, tmp_path):
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    shutil.rmtree(path / "ort", ignore_errors=True)
    fresh = Pipeline(path, OnnxRuntimeBackend(cache_optimized=False))(["a cat"], height=64, width=64)
    first = Pipeline(path, OnnxRuntimeBackend())(["a cat"], height=64, width=64)  # optimizes, writes the cache
    b = Bundle(path)
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert cached_model(b, b.component("fp32", name), onnxruntime.__version__, "fp32") is not None
    cached = Pipeline(path, OnnxRuntimeBackend())(["a cat"], height=64, width=64)  # loads the cache
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(cached, fresh)


def test_a_changed_onnx_or_a_damaged_cache_is_not_used(tiny_bundle, tmp_path):
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    Pipeline(path, OnnxRuntimeBackend()).load()
    b = Bundle(path)
    comp = b.component("fp32", "unet")
    model, record = cache_paths(b, onnxruntime.__version__, "fp32", "unet")
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "onnx_sha256": "0" * 64}))  # as if the bundle's ONNX had changed
    assert cached_model(b, comp, onnxruntime.__version__, "fp32") is None
    record.write_text(json.dumps(rec))
    model.write_bytes(b"garbage")  # damaged: loading falls back to the bundle's ONNX and re-caches
    out = Pipeline(path, OnnxRuntimeBackend())(["a cat"], height=64, width=64)
    assert out.shape == (1, 64, 64, 3)
    assert model.stat().st_size > 1000


def test_a_cache_written_on_another_cpu_is_not_used(tiny_bundle, tmp_path, monkeypatch):
    """Optimized layouts depend on the CPU's instruction set (AVX2, AVX-512): a bundle on a shared disk keeps one
    cache per CPU, and never loads another CPU's."""
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    Pipeline(path, OnnxRuntimeBackend()).load()
    b = Bundle(path)
    comp = b.component("fp32", "unet")
    assert cached_model(b, comp, onnxruntime.__version__, "fp32") is not None
    monkeypatch.setattr(ort_cache, "cpu_key", lambda: "x86_64-0000beef")
    assert cached_model(b, comp, onnxruntime.__version__, "fp32") is None


def test_a_cached_graph_onnxruntime_cannot_load_is_rebuilt_fully_optimized(tiny_bundle, tmp_path, monkeypatch):
    """A cached graph is loaded with the optimizer off (it is optimized already). Where onnxruntime refuses it all
    the same, the session is made from the bundle's ONNX with the optimizer as asked, as the first time, and the
    graph cached again is that optimized one."""
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    shutil.rmtree(path / "ort", ignore_errors=True)
    b = Bundle(path)
    levels, real = [], onnxruntime.InferenceSession
    refuse = []

    def recording(model, options=None, **kwargs):
        levels.append((model, options.graph_optimization_level))
        if refuse and refuse.pop() == model:
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : this onnxruntime cannot load it")
        return real(model, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    backend = OnnxRuntimeBackend()
    backend.session(b, "unet")  # optimizes, writes the cache
    cached, _ = cache_paths(b, onnxruntime.__version__, "fp32", "unet")
    (first,) = levels
    refuse.append(str(cached))
    levels.clear()
    backend.session(b, "unet")
    assert [m for m, _ in levels] == [str(cached), first[0]]  # the cached graph refused, then the bundle's
    assert levels[-1] == first


def test_a_cache_that_cannot_be_written_costs_only_the_cache(tiny_bundle, tmp_path, monkeypatch, caplog):
    """A full disk while onnxruntime writes the optimized graph, or while it is moved into place: the image is
    made all the same (the same one), with a warning that names the folder; nothing half-written is left or
    used. It was refused before as "the file is corrupt, export the bundle again"; a bundle's ONNX that
    onnxruntime cannot load still is."""
    import errno
    import os
    import tempfile

    import pytest
    from sdturbo.engine.errors import BundleError

    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    shutil.rmtree(path / "ort", ignore_errors=True)
    want = Pipeline(path, OnnxRuntimeBackend(cache_optimized=False))(["a cat"], height=64, width=64)
    real_mkdtemp = tempfile.mkdtemp

    def unwritable(*args, **kwargs):  # the names onnxruntime writes taken by folders: its write fails
        tmp = real_mkdtemp(*args, **kwargs)
        graph = kwargs["prefix"].removeprefix(".").split(".tmp-")[0] + ".onnx"
        for taken in (graph, graph + ".data"):
            os.mkdir(os.path.join(tmp, taken))
        return tmp

    monkeypatch.setattr(ort_cache.tempfile, "mkdtemp", unwritable)
    out = Pipeline(path, OnnxRuntimeBackend())(["a cat"], height=64, width=64)
    np.testing.assert_array_equal(out, want)
    folder = cache_paths(Bundle(path), onnxruntime.__version__, "fp32", "unet")[0].parent
    warned = [r.getMessage() for r in caplog.records if "could not cache the optimized" in r.getMessage()]
    assert len(warned) == 3 and all(str(folder) in w and "MB free there" in w for w in warned), warned
    assert not list(folder.iterdir())  # no graph, record or leftover

    monkeypatch.setattr(ort_cache.tempfile, "mkdtemp", real_mkdtemp)
    caplog.clear()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ort_cache, "publish_graph", full)
    out = Pipeline(path, OnnxRuntimeBackend())(["a cat"], height=64, width=64)
    np.testing.assert_array_equal(out, want)
    assert sum("No space left on device" in r.getMessage() for r in caplog.records) == 3
    assert not list(folder.iterdir())

    monkeypatch.undo()  # (publish_graph, and the rest: only the next patch below)
    caplog.clear()

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # a read-only bundle: the cache's folders cannot be made
        if path / "ort" in (self, *self.parents):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    shutil.rmtree(path / "ort")
    monkeypatch.setattr(Path, "mkdir", read_only)
    with caplog.at_level(logging.WARNING):
        out = Pipeline(path, OnnxRuntimeBackend())(["a cat"], height=64, width=64)
    np.testing.assert_array_equal(out, want)
    warned = [r.getMessage() for r in caplog.records if "could not cache the optimized" in r.getMessage()]
    assert len(warned) == 3 and all("Read-only file system" in w and "MB free there" in w for w in warned), warned
    assert all(str(folder) in w for w in warned if "unet" in w)
    monkeypatch.undo()

    def refused(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : cannot load it")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refused)
    with pytest.raises(BundleError, match=r"INVALID_GRAPH.*corrupt"):
        OnnxRuntimeBackend().session(Bundle(path), "unet")


def test_a_bundle_copied_without_its_mtimes_keeps_its_cache(tiny_bundle, tmp_path, monkeypatch, caplog):
    """A bundle copied to where it is deployed (``cp -r``, an image build: new mtimes, the same bytes) loads its
    cached graphs: the record names the ONNX by sha256, which the bundle checks before any load. It was made
    again at the first load (a minute for a full-size UNet), and on a read-only copy at every load."""
    src = shutil.copytree(tiny_bundle, tmp_path / "src")
    shutil.rmtree(src / "ort", ignore_errors=True)
    want = Pipeline(src, OnnxRuntimeBackend())(["a cat"], height=64, width=64)  # writes the cache
    path = shutil.copytree(src, tmp_path / "copy", copy_function=shutil.copyfile)  # bytes only: new mtimes
    assert (path / "manifest.json").stat().st_mtime_ns != (src / "manifest.json").stat().st_mtime_ns
    made, real = [], ort_cache.create_and_cache

    def recording(*args):
        made.append(args[3].spec.name)
        return real(*args)

    monkeypatch.setattr(ort_cache, "create_and_cache", recording)
    b = Bundle(path)
    backend = OnnxRuntimeBackend()
    for name in ("text_encoder", "unet", "vae_decoder"):
        backend.session(b, name)
    assert made == []
    monkeypatch.undo()
    assert [r["state"] for r in ort_cache.list_cached(b)] == ["valid"] * 3
    np.testing.assert_array_equal(Pipeline(path, OnnxRuntimeBackend())(["a cat"], height=64, width=64), want)


def test_a_stale_cached_graph_is_removed_before_its_replacement_is_written(tiny_bundle, tmp_path, monkeypatch):
    """A stale graph (another ONNX's, kept by `export --force` or left by an old export) went on taking its disk
    while the new one was written beside it: twice the space at full size (13 GB more for SDXL-Turbo fp32), and on a
    tight disk no cache at all (a helper's review). It goes first."""
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    Pipeline(path, OnnxRuntimeBackend()).load()
    b = Bundle(path)
    model, record = cache_paths(b, onnxruntime.__version__, "fp32", "unet")
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "onnx_sha256": "0" * 64}))  # made from other ONNX
    seen, real = [], ort_cache.publish_graph

    def publishing(tmp, model_, record_, rec_):
        seen.append((model_.exists(), record_.exists()))
        return real(tmp, model_, record_, rec_)

    monkeypatch.setattr(ort_cache, "publish_graph", publishing)
    OnnxRuntimeBackend().session(b, "unet")
    assert seen == [(False, False)]
    assert cached_model(b, b.component("fp32", "unet"), onnxruntime.__version__, "fp32") == model

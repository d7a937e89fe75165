"""The prompt cache: least-recently-used order, hits and misses, eviction, and the same images bit for bit with and
without it (the decoded floats, not only the pixels), for SD-Turbo and SDXL-Turbo, shuffled batches included."""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.errors import InputError
from sdturbo.engine.pipeline import Pipeline
from sdturbo.engine.prompt_cache import PromptCache

A, B, C = "a red cube on a table", "an astronaut riding a horse", "a bowl of soup"


def ids(*rows: int) -> list[np.ndarray]:
    return [np.array([[r] * 4 for r in rows], np.int32)]


def test_lru_order_hits_misses_and_evictions():
    cache = PromptCache(2)
    k1, k2, k3 = (PromptCache.keys("enc", ids(r))[0] for r in (1, 2, 3))
    assert cache.lookup([k1]) is None and cache.misses == 1
    assert cache.store(k1, "one") == 0 and cache.store(k2, "two") == 1
    assert [e.value for e in cache.lookup([k1])] == ["one"]  # k1 is now the most recent: k2 goes first
    assert cache.store(k3, "three") == 1 and cache.evictions == 1  # k3 takes k2's slot
    assert cache.lookup([k2]) is None and cache.lookup([k1, k3]) is not None
    assert cache.lookup([k1, k2]) is None  # all or nothing
    assert cache.stats() == {"capacity": 2, "size": 2, "hits": 2, "misses": 3, "evictions": 1}


def test_slots_are_reused_and_a_restore_is_recent():
    """Slots index the device cache's rows: an evicted entry's slot goes to the new one (slot 0 here, where a
    count of entries would say 2, a row another entry holds), and storing a key again refreshes it (value and
    recency) in its own slot, so the least recent one is evicted next."""
    cache = PromptCache(3)
    k1, k2, k3, k4, k5 = (PromptCache.keys("enc", ids(r))[0] for r in range(1, 6))
    assert [cache.store(k, k) for k in (k1, k2, k3)] == [0, 1, 2]
    assert cache.store(k4, k4) == 0 and cache.lookup([k1]) is None  # k1 was the least recent
    assert cache.store(k2, "new") == 1  # again: same slot, now the most recent
    assert cache.store(k5, k5) == 2 and cache.lookup([k3]) is None  # k3, not k2, was the least recent
    entries = cache.lookup([k2, k4, k5])
    assert [e.value for e in entries] == ["new", k4, k5]
    assert sorted(e.slot for e in entries) == [0, 1, 2]


def test_keys_tell_encoders_batches_and_tokens_apart():
    both = PromptCache.keys("enc", ids(1, 2))
    assert both[0] != PromptCache.keys("enc", ids(1))[0]  # the batch size is part of the key
    assert both[0] != PromptCache.keys("other", ids(1, 2))[0]  # so is the encoder
    assert both[0] == PromptCache.keys("enc", ids(1, 3))[0] and both[0] != both[1]
    two = [np.array([[1, 1]], np.int32), np.array([[1, 2]], np.int32)]  # SDXL: both tokenizers' ids
    assert PromptCache.keys("enc", two) != PromptCache.keys("enc", [two[0], two[0]])


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True])
def test_a_bad_size_is_refused(bad, tiny_bundle):
    with pytest.raises(InputError, match="prompt_cache="):
        Pipeline(tiny_bundle, OnnxRuntimeBackend(), prompt_cache=bad)


def test_off_stores_nothing():
    cache = PromptCache(0)
    key = PromptCache.keys("enc", ids(1))[0]
    assert cache.store(key, "x") is None and cache.lookup([key]) is None and len(cache) == 0
    assert cache.stats()["misses"] == 0


def counting(pipe) -> list[str]:
    """The names of the text encoders ``pipe`` runs from now on, in order."""
    calls, original = [], pipe.stage

    def stage(name):
        s = original(name)
        if not name.startswith("text_encoder"):
            return s
        return lambda **kw: (calls.append(name), s(**kw))[1]

    pipe.stage = stage
    return calls


@pytest.fixture(scope="module", params=["sd-turbo", "sdxl-turbo"])
def bundle(request, tiny_bundle, xl_bundle):
    return {"sd-turbo": tiny_bundle, "sdxl-turbo": xl_bundle}[request.param]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_identical_images_with_and_without_the_cache(bundle, precision):
    """Hits, misses and evictions in turn: every decoded image equals the uncached pipeline's bit for bit, and a
    request whose prompts are all cached runs no text encoder."""
    cached = Pipeline(bundle, OnnxRuntimeBackend(precision), prompt_cache=3)
    plain = Pipeline(bundle, OnnxRuntimeBackend(precision), prompt_cache=0)
    calls = counting(cached)
    encoders = len(cached.text_encoders)
    requests = [  # (prompts, whether the text encoders run)
        ([A, B], True),
        ([B, A], False),  # both rows cached at batch 2, at the other positions
        ([A, A], False),
        ([A], True),  # batch 1: not computed at this batch size yet
        ([A], False),
        ([C, B], True),  # C is new: the whole batch runs; the cache holds 3, so A (batch 2) is evicted
        ([A, B], True),
        ([B, C], False),
    ]
    for i, (prompts, runs) in enumerate(requests):
        kw = dict(height=64, width=64, seed=i, steps=1 + i % 2)
        before = len(calls)
        got = cached.run_float(cached.request(prompts, **kw))
        assert len(calls) - before == (encoders if runs else 0), (i, prompts)
        np.testing.assert_array_equal(got, plain.run_float(plain.request(prompts, **kw)), err_msg=str(prompts))
    assert cached.prompt_cache.evictions > 0 and cached.prompt_cache.hits == 4


def test_img2img_and_the_tiny_vae_use_the_cache_too(tiny_vae_bundle):
    cached = Pipeline(tiny_vae_bundle, OnnxRuntimeBackend(), vae="tiny")
    plain = Pipeline(tiny_vae_bundle, OnnxRuntimeBackend(), vae="tiny", prompt_cache=0)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kw = dict(height=64, width=64, image=image, steps=2, strength=0.5)
    for _ in range(2):
        np.testing.assert_array_equal(cached([A], **kw), plain([A], **kw))
    assert cached.prompt_cache.stats()["hits"] == 1


def test_a_shared_cache_keeps_encoders_apart(tiny_bundle):
    """One cache for two pipelines of different precisions: each gets its own encoder's rows."""
    shared = PromptCache(8)
    pipes = [Pipeline(tiny_bundle, OnnxRuntimeBackend(p), prompt_cache=shared) for p in ("fp32", "fp16")]
    for pipe in pipes:
        pipe([A], height=64, width=64)
    assert shared.stats()["hits"] == 0 and len(shared) == 2


def other_text_encoder(bundle, out):
    """A copy of ``bundle`` whose fp32 text encoder has other weights (a fine-tune of the same architecture)."""
    import hashlib
    import json
    import shutil

    import onnx
    from sdturbo.engine.bundle import MANIFEST

    out = shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("ort"))  # (no optimized graphs of the old one)
    manifest = json.loads((out / MANIFEST).read_text())
    entry = manifest["components"]["fp32"]["text_encoder"]
    path = out / entry["onnx"]
    model = onnx.load(str(path))
    norm = next(t for t in model.graph.initializer if "layer_norm" in t.name)
    norm.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(norm) * 1.5, norm.name))
    onnx.save(model, str(path))
    entry["sha256"], entry["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_a_shared_cache_keeps_models_apart(tiny_bundle, tmp_path):
    """One cache for two bundles of the same architecture and precision whose text encoders differ: the second
    pipeline runs its own encoder and gives its own image, never the first one's rows."""
    other = other_text_encoder(tiny_bundle, tmp_path / "other")
    shared = PromptCache(8)
    first, second = (Pipeline(b, OnnxRuntimeBackend("fp32"), prompt_cache=shared) for b in (tiny_bundle, other))
    plain = Pipeline(other, OnnxRuntimeBackend("fp32"), prompt_cache=0)
    kw = dict(height=64, width=64)
    want = plain.run_float(plain.request([A], **kw))
    assert not np.array_equal(first.run_float(first.request([A], **kw)), want), "the copy's encoder changes nothing"
    np.testing.assert_array_equal(second.run_float(second.request([A], **kw)), want)
    assert shared.stats()["hits"] == 0 and len(shared) == 2

"""Full-size random:sd-turbo: export, and a TensorRT-RTX UNet engine built on the CPU. Minutes and ~20 GB.

Marked slow (deselected by the README's test command). Run with: python -m pytest -m slow -s
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_bundle():
    from sdturbo.engine.cache import ensure_bundle

    return ensure_bundle("random:sd-turbo", "fp16")


def test_full_size_unet_engine_builds_on_a_cpu(full_bundle, record_property):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    from sdturbo.engine.bundle import Bundle
    from sdturbo.engine.engine_store import Profile
    from sdturbo.export.rss import PeakRss
    from sdturbo.export.trt_build import build_engines

    rss, start = PeakRss(), time.perf_counter()
    (plan,) = build_engines(
        full_bundle, "tensorrt-rtx", Profile(), compute_capability=86, components=("unet",), force=True
    )
    seconds, peak = time.perf_counter() - start, rss.peak_mb()
    record_property("build_seconds", seconds)
    record_property("peak_rss_mb", peak)
    print(
        f"full-size UNet engine (SM86, batch 1, 512x512): {seconds:.1f} s, peak RSS {peak} MB, "
        f"{plan.stat().st_size / 1e6:.0f} MB"
    )
    spec = Bundle(full_bundle).component("fp16", "unet").spec
    assert plan.stat().st_size > 1e9  # 866 M fp16 parameters
    import json

    record = json.loads(plan.with_suffix(".json").read_text())
    assert [t["name"] for t in record["io"]] == [t.name for t in (*spec.inputs, *spec.outputs)]
    assert record["profile_shapes"]["sample"] == [[1, 4, 64, 64]] * 3

"""SDXL-Turbo with the tiny VAE against diffusers' SDXL pipelines given ``vae=AutoencoderTiny`` of the same weights.

SD-Turbo's measure (tests/engine/test_tiny_vae_parity.py): our largest error against diffusers in float64 at
most twice diffusers' own at our precision. With AutoencoderTiny diffusers' SDXL pipelines decode and encode in
the pipeline's dtype (its ``force_upcast`` is False), so the fp16 bundle's tiny VAE is fp16, unlike the SDXL VAE.
"""

from __future__ import annotations

import pytest
import torch
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.runtime import open_pipeline

from tests.engine.test_tiny_vae_parity import FAULTS_TINY
from tests.reference import CASES, References, check_fault_fails, check_precision


@pytest.fixture(scope="module")
def reference(xl_folder, taesd_folder):
    return References(xl_folder, ancestral=True, tiny_vae=taesd_folder)


@pytest.fixture(scope="module")
def pipes(xl_tiny_vae_bundle):
    return {p: open_pipeline(xl_tiny_vae_bundle, "onnxruntime", p, vae="tiny") for p in ("fp32", "fp16")}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_within_twice_diffusers_fp32_error(case, pipes, reference, record_property):
    check_precision(pipes["fp32"], reference, case, torch.float32, "SDXL tiny VAE", record_property)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp16_within_twice_diffusers_fp16_error(case, pipes, reference, record_property):
    check_precision(pipes["fp16"], reference, case, torch.float16, "SDXL tiny VAE", record_property)


@pytest.mark.parametrize("where", ["tiny VAE decoder input", "img2img input image scale (tiny encoder)"])
def test_a_small_error_in_the_tiny_vae_fails(where, pipes, reference, monkeypatch):
    check_fault_fails(pipes["fp32"], reference, FAULTS_TINY, where, "SDXL tiny VAE", monkeypatch)


def test_the_fp16_tiny_vae_is_fp16(xl_tiny_vae_bundle):
    b = Bundle(xl_tiny_vae_bundle)
    assert {t.dtype for t in b.component("fp16", "tiny_vae_decoder").spec.inputs} == {"float16"}
    assert {t.dtype for t in b.component("fp16", "vae_decoder").spec.inputs} == {"float32"}  # the SDXL VAE: fp32

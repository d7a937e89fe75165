"""The tiny random SDXL-Turbo model and its bundle."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def xl_folder(cache_dir):
    from sdturbo.export.models import resolve_model_folder

    return resolve_model_folder("random:sdxl-tiny")


@pytest.fixture(scope="session")
def xl_bundle(xl_folder, tmp_path_factory):
    from sdturbo.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("xl") / "bundle"
    return export_bundle("random:sdxl-tiny", out, ("fp32", "fp16"), max_batch=4, min_size=32, max_size=256)


@pytest.fixture(scope="session")
def xl_model(xl_folder):
    from sdturbo.export.models import load_model

    return load_model("random:sdxl-tiny")

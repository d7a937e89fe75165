"""Shared fixtures: a private cache, the tiny random SD-Turbo and SDXL-Turbo models and their bundles."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Every test writes its models and bundles under a fresh cache, never the user's."""
    path = tmp_path_factory.mktemp("sdturbo-cache")
    old = os.environ.get("SDTURBO_CACHE")
    os.environ["SDTURBO_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SDTURBO_CACHE", None)
    else:
        os.environ["SDTURBO_CACHE"] = old


@pytest.fixture(autouse=True)
def python_s_shared_bytes_are_intact():
    """After every test (and the imports before it): the 256 one-byte bytes objects, which CPython shares
    process-wide (every b" " is one object), still hold their byte. Native code handed a bytes object as a buffer
    to write into (NVRTC's log, once) changes them all, and with them every later b" " of the process: PIL then
    read "40\x0024" from a PPM header. Checked here so that any such write is named by the test that made it."""
    yield
    bad = [i for i in range(256) if bytes([i])[0] != i]
    if bad:
        import ctypes

        for i in bad:  # put the byte back (CPython: the data follows the object's header), so only this test fails
            ctypes.c_ubyte.from_address(id(bytes([i])) + bytes.__basicsize__ - 1).value = i
        pytest.fail(f"the shared one-byte bytes objects {bad[:8]} were overwritten (native code wrote into a bytes)")


@pytest.fixture(scope="session")
def tiny_folder(cache_dir):
    from sdturbo.export.models import resolve_model_folder

    return resolve_model_folder("random:tiny")


def export_tiny(model: str, tmp_path_factory):
    """``model`` exported in fp32 and fp16, batch <= 4, sides 32-256 px, into a fresh folder."""
    from sdturbo.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("bundles") / model.removeprefix("random:")
    return export_bundle(model, out, ("fp32", "fp16"), max_batch=4, min_size=32, max_size=256)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_folder, tmp_path_factory):
    return export_tiny("random:tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    """The torch modules of random:tiny, fp32 (read-only: do not convert them)."""
    from sdturbo.export.models import load_model

    return load_model("random:tiny")


@pytest.fixture(scope="session")
def xl_folder(cache_dir):
    from sdturbo.export.models import resolve_model_folder

    return resolve_model_folder("random:sdxl-tiny")


@pytest.fixture(scope="session")
def xl_bundle(xl_folder, tmp_path_factory):
    return export_tiny("random:sdxl-tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def xl_model(xl_folder):
    from sdturbo.export.models import load_model

    return load_model("random:sdxl-tiny")


TINY_VAE = "random:taesd-tiny"  # AutoencoderTiny's architecture, small: 16 channels, one block per stage


@pytest.fixture(scope="session")
def taesd_folder(cache_dir):
    from sdturbo.export.tiny_vae import resolve_tiny_vae_folder

    return resolve_tiny_vae_folder(TINY_VAE)


@pytest.fixture(scope="session")
def tiny_vae_bundle(tiny_folder, taesd_folder, tmp_path_factory):
    """random:tiny exported with the tiny VAE in one go (a new bundle's path)."""
    from sdturbo.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-taesd"
    return export_bundle(
        "random:tiny", out, ("fp32", "fp16"), max_batch=4, min_size=32, max_size=256, tiny_vae=TINY_VAE
    )


@pytest.fixture(scope="session")
def xl_tiny_vae_bundle(xl_bundle, taesd_folder, tmp_path_factory):
    """A copy of the SDXL tiny bundle with the tiny VAE added to it (an existing bundle's path: no model export)."""
    import shutil

    from sdturbo.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "sdxl-tiny-taesd"
    shutil.copytree(xl_bundle, out)
    return export_bundle("random:sdxl-tiny", out, ("fp32", "fp16"), tiny_vae=TINY_VAE)


@pytest.fixture
def disk_free(monkeypatch):
    """``disk_free(n)``: from then on the disk reports ``n`` bytes free (of ten times as many); with ``total=0``
    it reports no size at all, as some network mounts do."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")

    def set_free(n: int, total: int | None = None) -> None:
        total = 10 * n if total is None else total
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(total, total - n, n))

    return set_free

"""Model names: random builds, local folders, and the errors for bad ones."""

from __future__ import annotations

import shutil

import pytest
from sdturbo.engine.errors import InputError
from sdturbo.export.models import load_model, resolve_model_folder


def test_random_model_is_built_once(tiny_folder):
    mtime = (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert resolve_model_folder("random:tiny") == tiny_folder
    assert (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_local_folder_loads_like_a_hub_model(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    lm = load_model(str(folder))
    assert lm.folder == folder and lm.unet.config.cross_attention_dim == 32
    assert lm.config_hash() == load_model("random:tiny").config_hash()


@pytest.mark.parametrize("remove", ["unet", "vae/diffusion_pytorch_model.safetensors", "scheduler"])
def test_folder_missing_a_component(tiny_folder, tmp_path, remove):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(InputError, match=remove.split("/")[0]):
        resolve_model_folder(str(folder))


@pytest.mark.parametrize(
    "name,match",
    [
        ("random:huge", "unknown random model"),
        ("./no/such/folder", "neither an existing folder"),
    ],
)
def test_bad_model_names(name, match):
    with pytest.raises(InputError, match=match):
        resolve_model_folder(name)

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


@pytest.mark.parametrize("change", ["truncated", "trailing bytes"])
def test_weights_that_are_not_exactly_what_their_header_describes_are_refused(tiny_folder, tmp_path, change):
    """A safetensors file must hold exactly the bytes its header describes: a cut file and one with bytes
    appended (a partial overwrite, two files concatenated) are both refused, naming the file."""
    from sdturbo.export.models import check_safetensors

    path = tmp_path / "model.safetensors"
    data = (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    path.write_bytes(data[:-16] if change == "truncated" else data + b"\0" * 16)
    check_safetensors(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")  # the whole file: fine
    with pytest.raises(InputError, match="truncated or corrupt"):
        check_safetensors(path)


@pytest.mark.parametrize("sub, name", [("unet", "config.json"), ("scheduler", "scheduler_config.json")])
def test_the_config_hash_follows_every_component_s_config(tiny_folder, tmp_path, sub, name):
    """Bundles exported with another scheduler or architecture setting must not hash the same."""
    import json

    from sdturbo.export.models import LoadedModel

    folder = shutil.copytree(tiny_folder, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    model = LoadedModel("m", folder, None, None, None, None, {})
    before = model.config_hash()
    cfg = json.loads((folder / sub / name).read_text())
    cfg["sdturbo_test_setting"] = 1
    (folder / sub / name).write_text(json.dumps(cfg))
    assert model.config_hash() != before

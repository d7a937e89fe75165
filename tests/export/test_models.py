"""Model names: random builds, local folders, and the errors for bad ones."""

from __future__ import annotations

import logging
import shutil

import numpy as np
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
        ("", "is empty"),  # the current folder, before
        (" ", "is empty"),
        ("org/na me", r"neither an existing folder nor a valid hub id \(Repo id must"),  # blamed on the network, before
        ("org/-name", "valid hub id"),
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


def _sharded_copy(tiny_folder, tmp_path):
    """random:tiny saved again with its UNet's weights in shards, as save_pretrained writes a UNet above its
    shard size (diffusers' 10 GB: SDXL's UNet in fp32): ``<stem>-0000i-of-0000n.safetensors`` + an index."""
    from diffusers import UNet2DConditionModel

    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    unet = UNet2DConditionModel.from_pretrained(tiny_folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="100KB")
    shards = sorted((folder / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    return folder, shards


def test_a_model_whose_weights_are_sharded_loads_the_same_weights(tiny_folder, tmp_path):
    """A diffusers folder whose UNet is sharded is a model like any other (it was refused as lacking
    unet/diffusion_pytorch_model.safetensors, and random:sdxl-turbo, saved that way, failed with an errno)."""
    import torch

    folder, _ = _sharded_copy(tiny_folder, tmp_path)
    resolve_model_folder(str(folder))
    sharded, whole = load_model(str(folder)).unet.state_dict(), load_model("random:tiny").unet.state_dict()
    assert sharded.keys() == whole.keys()
    assert all(torch.equal(sharded[k], whole[k]) for k in whole)


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "damaged index"])
def test_a_sharded_model_with_a_damaged_shard_or_index_is_refused_naming_it(tiny_folder, tmp_path, damage):
    folder, shards = _sharded_copy(tiny_folder, tmp_path)
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    if damage == "missing shard":
        shards[-1].unlink()
        with pytest.raises(InputError, match=f"lacks unet/{shards[-1].name}"):
            resolve_model_folder(str(folder))
        return
    if damage == "truncated shard":
        shards[0].write_bytes(shards[0].read_bytes()[:-8])
        named, match = shards[0], "truncated or corrupt"
    else:
        index.write_text(index.read_text()[:40])
        named, match = index, "not a safetensors index"
    with pytest.raises(InputError, match=match) as e:
        load_model(str(folder))
    assert str(named) in str(e.value)


def test_the_hub_download_takes_sharded_weights_and_no_other_variant():
    """Which files a Hub download fetches: each component's weights whole or sharded (with their index), not
    the fp16 or non-safetensors copies a repo also holds."""
    from fnmatch import fnmatch

    from sdturbo.export.models import HUB_PATTERNS

    def fetched(name):
        return any(fnmatch(name, p) for p in HUB_PATTERNS)

    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "vae/config.json",
        "tokenizer_2/vocab.json",
    ):
        assert fetched(name), name
    for name in (
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/model.fp16.safetensors",
        "sd_turbo.safetensors",
    ):
        assert not fetched(name), name


@pytest.mark.parametrize("model", ["random:tiny", "random:sdxl-tiny"])
def test_random_models_pool_clip_at_the_end_of_text_as_the_released_ones_do(tiny_folder, xl_folder, model):
    """The released text encoders pool at argmax(ids) (eos_token_id 2, see random_models.py): that is the
    end-of-text token only where it has the highest id, so the random tokenizers must give it that (else the
    pooled SDXL embedding would be the start token's, a path the real models never take)."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = tiny_folder if model == "random:tiny" else xl_folder
    for sub in ("tokenizer", "tokenizer_2") if model == "random:sdxl-tiny" else ("tokenizer",):
        tok = CLIPTokenizer.from_pretrained(folder / sub)
        ids = tok("a photo of a cat").input_ids
        assert ids.index(tok.eos_token_id) == int(np.argmax(ids)) == len(ids) - 1
        assert max(tok.get_vocab().values()) == tok.eos_token_id
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 2, 1)
    assert config.vocab_size > max(tok.get_vocab().values())


def test_random_models_are_the_same_weights_every_time_they_are_built():
    """``random:*`` weights are seeded: two caches, two machines, the same model (bundles and benchmarks agree)."""
    import torch
    from sdturbo.export.random_models import build_random

    torch.manual_seed(1234)  # whatever the process drew before
    first = build_random("tiny")
    torch.randn(10)
    second = build_random("tiny")
    for name in ("text_encoder", "unet", "vae"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _fp16_variant_copy(tiny_folder, tmp_path, shard_unet=False):
    """random:tiny as a folder saved with ``variant="fp16"`` in fp16 (the form the model cards load, and
    what a Hub cache holds after ``from_pretrained(..., variant="fp16")``): no plain weights in it."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float16)
    folder = tmp_path / "fp16"
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    if shard_unet:
        shutil.rmtree(folder / "unet")
        pipe.unet.save_pretrained(folder / "unet", safe_serialization=True, variant="fp16", max_shard_size="100KB")
    assert not list(folder.glob("*/diffusion_pytorch_model.safetensors")) + list(folder.glob("*/model.safetensors"))
    return folder, pipe


@pytest.mark.parametrize("shard_unet", [False, True])
def test_a_folder_of_fp16_variant_weights_loads_those_weights(tiny_folder, tmp_path, shard_unet):
    """It was refused as lacking unet/diffusion_pytorch_model.safetensors. Each component is read from its
    fp16 files (whole or sharded): the weights equal them, in fp32 for an fp32 export."""
    import torch

    folder, pipe = _fp16_variant_copy(tiny_folder, tmp_path, shard_unet)
    if shard_unet:
        assert len(list((folder / "unet").glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))) > 1
    lm = load_model(str(folder))
    for name in ("text_encoder", "unet", "vae"):
        ours, theirs = getattr(lm, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(ours[k].dtype == torch.float32 and torch.equal(ours[k], theirs[k].float()) for k in theirs), name


def test_plain_weights_are_read_before_the_fp16_variant_and_each_component_on_its_own(tiny_folder, tmp_path):
    """As diffusers without ``variant=``: where a component has its plain weights, those; a component with
    only the fp16 variant's, those (here the VAE only)."""
    import torch

    folder, pipe = _fp16_variant_copy(tiny_folder, tmp_path)
    for sub, name in (("text_encoder", "model.safetensors"), ("unet", "diffusion_pytorch_model.safetensors")):
        shutil.copy(tiny_folder / sub / name, folder / sub / name)
    lm, plain = load_model(str(folder)), load_model("random:tiny")
    for name in ("text_encoder", "unet"):
        ours, theirs = getattr(lm, name).state_dict(), getattr(plain, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    ours, theirs = lm.vae.state_dict(), pipe.vae.state_dict()
    assert all(torch.equal(ours[k], theirs[k].float()) for k in theirs)
    assert any(not torch.equal(ours[k], plain.vae.state_dict()[k]) for k in theirs)  # fp16-rounded: not the plain


def test_a_damaged_fp16_variant_is_refused_naming_it(tiny_folder, tmp_path):
    folder, _ = _fp16_variant_copy(tiny_folder, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(InputError, match="truncated or corrupt") as e:
        load_model(str(folder))
    assert str(weights) in str(e.value)
    weights.unlink()
    with pytest.raises(InputError, match=r"lacks unet/diffusion_pytorch_model.safetensors .*or the fp16 variant"):
        resolve_model_folder(str(folder))


def _hub_cache(tmp_path, monkeypatch, snapshot=None):
    """A Hugging Face cache under tmp_path holding ``org/m`` at one revision: ``snapshot`` (a model folder) as
    its files, the layout huggingface_hub writes (refs/main names the snapshot), and the Hub unreachable."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    repo = cache / "models--org--m"
    if snapshot is not None:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123abcd")
        shutil.copytree(snapshot, repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / "0123abcd"


def _unreachable(monkeypatch, folder=None):
    """snapshot_download failing as offline with a cached listing that misses files (huggingface_hub 1.x+
    raises then), or returning ``folder`` as it is (without such a listing it cannot tell)."""
    import huggingface_hub

    def snapshot_download(repo_id, **kw):
        if folder is None:
            raise OSError(f"The cached snapshot for {repo_id!r} is incomplete: 3 file(s) are missing")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_offline_a_hub_id_uses_the_fp16_variant_copy_in_the_hugging_face_cache(
    tiny_folder, tmp_path, monkeypatch, caplog
):
    """The model cards load SD-Turbo with ``variant="fp16"``, which leaves only the fp16 files in the cache.
    Offline, that copy is the model (it was refused: the plain weights were missing), with a warning."""
    import torch

    folder, pipe = _fp16_variant_copy(tiny_folder, tmp_path)
    snapshot = _hub_cache(tmp_path, monkeypatch, folder)
    assert resolve_model_folder("org/m") == snapshot  # huggingface_hub's own offline answer: the folder
    _unreachable(monkeypatch)
    with caplog.at_level("WARNING", logger="sdturbo.export.models"):
        lm = load_model("org/m")
    assert lm.folder == snapshot and "using its copy in the Hugging Face cache" in caplog.text
    ours, theirs = lm.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k].float()) for k in theirs)


@pytest.mark.parametrize("cached", ["nothing", "a copy without its UNet weights"])
def test_offline_a_hub_id_without_a_whole_cached_copy_is_refused(tiny_folder, tmp_path, monkeypatch, cached):
    snapshot = None
    if cached != "nothing":
        snapshot = shutil.copytree(tiny_folder, tmp_path / "partial")
        (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    snapshot = _hub_cache(tmp_path, monkeypatch, snapshot)
    _unreachable(monkeypatch)
    with pytest.raises(InputError, match=r"could not download model 'org/m' .*is incomplete"):
        resolve_model_folder("org/m")
    if cached != "nothing":  # handed over as it is, the partial copy is refused naming what it lacks
        _unreachable(monkeypatch, snapshot)
        with pytest.raises(InputError, match=r"lacks unet/diffusion_pytorch_model.safetensors"):
            resolve_model_folder("org/m")


def test_loading_a_model_asks_the_user_to_install_nothing(tiny_folder, taesd_folder, monkeypatch, capfd, caplog):
    """diffusers loads through accelerate by default and, where it is missing (as in our extras), warns at every
    load that it is "strongly recommended" to install it. We load the way it falls back to (measured on full-size
    SD-Turbo: the same peak memory, a faster load), so a newcomer's first run prints no such advice, with or
    without accelerate installed."""
    import diffusers.models.modeling_utils as modeling_utils
    from sdturbo.export.tiny_vae import load_tiny_vae

    from tests.conftest import TINY_VAE

    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    records = []  # diffusers' loggers do not propagate to the root logger (caplog's), and their handler keeps the
    handler = logging.Handler()  # stderr it found first: listen on diffusers' own root logger
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        load_model("random:tiny")
        load_model("random:sdxl-tiny")
        load_tiny_vae(TINY_VAE)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    said = capfd.readouterr()
    logged = " ".join(r.getMessage() for r in [*records, *caplog.records])
    assert "accelerate" not in said.err + said.out + logged


def test_building_a_random_model_does_not_advise_installing_torchvision():
    """Importing a diffusers pipeline makes transformers 5 advise installing torchvision (for CLIP's image
    processor, which we never use); on a CPU torch, that pip install can pull a CUDA torch over it. The README's
    first offline run builds a random model through those pipelines: a fresh process (transformers warns once per
    process) must print no such advice."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has no such notice to give")
    code = "from sdturbo.export.random_models import build_random; build_random('tiny')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "torchvision" not in run.stdout + run.stderr


def test_the_torchvision_filter_drops_that_notice_and_nothing_else():
    from sdturbo.export.random_models import quiet_torchvision_notice

    logger = logging.getLogger("transformers.utils.import_utils")
    quiet_torchvision_notice()
    filters = len(logger.filters)
    quiet_torchvision_notice()  # once is enough: no second filter
    assert len(logger.filters) == filters

    def passes(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, None, None)))

    assert not passes("`CLIPImageProcessor` requires torchvision (not installed); falling back to ...")
    assert passes("`CLIPImageProcessor` requires something else")
    assert passes("VideoProcessor requires the torchvision library but it was not found in your environment")
    assert passes("Could not import module 'CLIPImageProcessor'")


@pytest.mark.parametrize("model", ["random:tiny", "random:sdxl-tiny"])
def test_configs_and_sizes_known_before_loading_are_the_loaded_modules(tiny_folder, xl_folder, model):
    """An export reads configs and parameter counts (for its contracts, trace sizes, manifest and disk check)
    before any weights load: they must be the loaded modules' own, defaults filled in as loading fills them."""
    lm = load_model(model)
    names = ["text_encoder", "unet", "vae"] + (["text_encoder_2"] if lm.family == "sdxl-turbo" else [])
    assert lm.loaded == {}
    for name in names:
        config, module = lm.config(name), lm.module(name)
        # loading adds where it loaded from, and transformers its dtype and attention choice; nothing else differs
        skip = {"_name_or_path", "dtype", "torch_dtype", "_attn_implementation_autoset", "attn_implementation"}
        mine, own = (c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in (config, module.config))
        assert {k: v for k, v in mine.items() if k not in skip} == {k: v for k, v in own.items() if k not in skip}
        assert lm.parameter_count(name) == sum(p.numel() for p in module.parameters()), name
    vae = lm.module("vae")
    assert lm.parameter_count("vae", ("decoder", "post_quant_conv")) == sum(
        p.numel() for part in (vae.decoder, vae.post_quant_conv) for p in part.parameters()
    )
    lm.release(*names)
    assert lm.loaded == {} and lm.module("text_encoder_2" if lm.family == "sdxl-turbo" else "unet") is not None


@pytest.mark.parametrize("xl", [False, True])
def test_a_tokenizer_without_its_vocabulary_is_refused_not_exported(tiny_folder, xl_folder, tmp_path, xl):
    """A Hub snapshot whose tokenizer files were lost (an interrupted download) exported without a word: transformers
    makes a 2-token CLIP tokenizer from such a folder, and every image ignored its prompt (a helper's audit:
    "a cat" -> ids [0, 2, 2, 2, ...])."""
    model = shutil.copytree(xl_folder if xl else tiny_folder, tmp_path / "m")
    sub = "tokenizer_2" if xl else "tokenizer"
    (model / sub / "tokenizer.json").unlink()
    with pytest.raises(
        InputError, match=rf"lacks {sub}/vocab\.json and {sub}/merges\.txt \(or {sub}/tokenizer\.json\)"
    ):
        load_model(str(model))


def test_a_tokenizer_far_smaller_than_its_text_encoder_is_refused(tiny_folder, tmp_path):
    """Vocabulary files there but of almost nothing (or another model's): the tokenizer's size against the text
    encoder's embeddings (SD-Turbo's are equal; random:tiny's tokenizer has 747 of 1000)."""
    import json

    model = shutil.copytree(tiny_folder, tmp_path / "m")
    (model / "tokenizer" / "tokenizer.json").unlink()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "c": 3}
    (model / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (model / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(InputError, match=r"the tokenizer in .*tokenizer has \d tokens for a text encoder of 1000"):
        load_model(str(model))


@pytest.mark.parametrize("command", ["generate", "serve", "export"])
def test_an_empty_model_name_is_refused_not_taken_for_the_default_or_this_folder(command, capsys, tmp_path):
    """`--model "$UNSET"`: generate took the default model (a download of gigabytes), export and serve the current
    folder."""
    from sdturbo.engine.cli import main

    argv = {
        "generate": ["generate", "a cat", "--model", "", "--out", str(tmp_path / "a.png")],
        "serve": ["serve", "--model", ""],
        "export": ["export", "", "--out", str(tmp_path / "b")],
    }[command]
    if command == "serve":
        pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'sdturbo[serve]')")
        from sdturbo.benchmarks.serve_load import free_ports

        ports = [str(p) for p in free_ports(3)]
        argv += ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--host", "127.0.0.1"]
    assert main(argv) == 2
    assert "model '' is empty" in capsys.readouterr().err


def test_a_damaged_hub_blob_says_to_delete_it_not_to_download_again(tmp_path):
    """A download keeps a Hugging Face cache blob that is there, truncated or not: "download the model again" did
    nothing (a helper's audit). A Hub snapshot's damaged weights name their blob and what to do."""
    from sdturbo.export.models import check_safetensors

    blob = tmp_path / "hub" / "models--org--name" / "blobs" / ("a" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_bytes((64).to_bytes(8, "little") + b"{")  # cut short inside its header
    link = tmp_path / "hub" / "models--org--name" / "snapshots" / ("0" * 40) / "unet" / "w.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    with pytest.raises(InputError, match=rf"Hugging Face cache's blob {blob}: delete it, and the next run online"):
        check_safetensors(link)
    plain = tmp_path / "w.safetensors"
    plain.write_bytes(blob.read_bytes())
    with pytest.raises(InputError, match=r"truncated or corrupt; download or save the model again$"):
        check_safetensors(plain)


def test_transformers_progress_bars_show_with_verbose_only(tiny_folder, capfd, caplog):
    """transformers' "Loading weights" bar, drawn between our log lines at every load, shows with -v only; the
    switch it shares with the Hub's download bars is as it was after (on here)."""
    from transformers.utils import logging as tf_logging

    assert tf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    load_model(str(tiny_folder)).text_encoder  # noqa: B018 (loads the module)
    assert "Loading weights" not in capfd.readouterr().err and tf_logging.is_progress_bar_enabled()
    with caplog.at_level(logging.DEBUG, logger="sdturbo"):
        load_model(str(tiny_folder)).text_encoder  # noqa: B018
    assert "Loading weights" in capfd.readouterr().err and tf_logging.is_progress_bar_enabled()

"""Load an SD-Turbo model by the name a user gives it.

- a Hugging Face repo id (``stabilityai/sd-turbo``): downloaded once by huggingface_hub;
- a local diffusers folder (``model_index.json`` with ``text_encoder/``, ``tokenizer/``, ``unet/``,
  ``vae/``, ``scheduler/``);
- ``random:sd-turbo`` / ``random:tiny``: the real (or a tiny) architecture with seeded random weights,
  built once into the cache as an ordinary diffusers folder, then loaded like any other.

Weights load through safetensors only: each component's whole file, its shards, or where neither is there
its fp16 variant (``save_pretrained(variant="fp16")``, the form the model cards load).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.bundle import is_bundle, make_shareable
from ..engine.cache import cache_folder, check_model_name, folder_stamp, hub_blob, random_model_folder
from ..engine.errors import InputError, IntegrityError, first_line
from ..engine.files import locked, remove_leftovers, replace_dir, temp_prefix
from ..engine.integrity import file_sha256, hashing_on, stamp, stat_stamp, verify
from .random_models import ALL_RANDOM, build_random

log = logging.getLogger(__name__)

REQUIRED = {
    "text_encoder": ("config.json",),
    "tokenizer": (),
    "unet": ("config.json",),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}
REQUIRED_XL = {**REQUIRED, "text_encoder_2": ("config.json",), "tokenizer_2": ()}
WEIGHTS = {
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}
# Large weights may be sharded: ``<stem>-00001-of-00002.safetensors``... listed by ``<name>.index.json``
# (save_pretrained does it above its shard size, 10 GB in diffusers: SDXL's UNet in fp32). Either form loads.
# A folder saved with ``variant="fp16"`` names them ``<stem>.fp16.safetensors`` (or ``<name>.index.fp16.json``
# and ``<stem>.fp16-0000i-of-0000n.safetensors``); a component read from those only where the plain ones are
# absent (as diffusers reads the plain ones unless told the variant). Hub downloads take the plain ones.
VARIANT = "fp16"
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    *(f"{sub}/config.json" for sub in WEIGHTS),
    *(f"{sub}/{name}" for sub, name in WEIGHTS.items()),
    *(f"{sub}/{name}.index.json" for sub, name in WEIGHTS.items()),
    *(f"{sub}/{name.removesuffix('.safetensors')}-*-of-*.safetensors" for sub, name in WEIGHTS.items()),
]


@dataclass
class LoadedModel:
    """A model to export: its configs, tokenizers and scheduler settings at once; each torch module (on the CPU,
    fp32, or fp16 with ``half``; the SDXL VAE always fp32) loaded from its weights when first used, and let go
    with ``release`` once its components are written, so that an export holds one module's weights at a time."""

    model_id: str
    folder: Path
    tokenizer: object
    scheduler_config: dict
    family: str = "sd-turbo"  # or "sdxl-turbo"
    tokenizer_2: object = None
    loaders: dict = field(default_factory=dict, repr=False)  # module name -> () -> the loaded module
    skeletons: dict = field(default_factory=dict, repr=False)  # module name -> the module on the meta device
    loaded: dict = field(default_factory=dict, repr=False)

    def module(self, name: str):
        """The torch module ``name`` (text_encoder, text_encoder_2, unet, vae): loaded on first use; None where
        the family has none (text_encoder_2 of SD-Turbo)."""
        if name not in self.loaders:
            return None
        if name not in self.loaded:
            self.loaded[name] = self.loaders[name]()
        return self.loaded[name]

    def config(self, name: str):
        """Module ``name``'s config, as its loaded module would have it (defaults filled in), without its weights."""
        return self.skeletons[name].config

    def parameter_count(self, name: str, children: tuple[str, ...] = ()) -> int:
        """Parameters of module ``name`` (or of its ``children``), counted without loading its weights."""
        skeleton = self.skeletons[name]
        parts = [getattr(skeleton, c, None) for c in children] if children else [skeleton]
        return sum(p.numel() for part in parts if part is not None for p in part.parameters())

    def release(self, *names: str) -> None:
        """Let go of loaded modules (loaded again if used later)."""
        for name in names:
            self.loaded.pop(name, None)
        gc.collect()

    text_encoder = property(lambda self: self.module("text_encoder"))
    text_encoder_2 = property(lambda self: self.module("text_encoder_2"))
    unet = property(lambda self: self.module("unet"))
    vae = property(lambda self: self.module("vae"))

    def source(self) -> dict:
        """What identifies the model's files an export reads, taken before it reads any weights (the manifest's
        model entry; ``unchanged_since`` compares it later): ``source_stamp`` (``model_stamp``: names, sizes,
        mtimes) and, where files are hashed (not SDTURBO_VERIFY=size), ``source_sha256`` (``content_sha256``),
        stamped (integrity.py): a copy with new mtimes and the same names, sizes and bytes still matches."""
        files = model_files(self.folder)
        recorded = model_stamp(self.folder)
        if not hashing_on():
            return {"source_stamp": recorded}
        before = stat_stamp(files)
        sha = content_sha256(self.folder, *files)
        if stat_stamp(files) != before:
            raise InputError(
                f"the files of model {self.model_id} in {self.folder} changed while they were read; export it "
                f"again once they are written"
            )
        stamp(files, sha, before)
        return {"source_stamp": recorded, "source_sha256": sha}

    def config_hash(self) -> str:
        """sha256 over the component configs: the same architecture and settings give the same hash."""
        h = hashlib.sha256()
        subs = [
            ("text_encoder", "config.json"),
            ("unet", "config.json"),
            ("vae", "config.json"),
            ("scheduler", "scheduler_config.json"),
        ]
        if self.family == "sdxl-turbo":
            subs.append(("text_encoder_2", "config.json"))
        for sub, name in subs:
            cfg = json.loads((self.folder / sub / name).read_text())
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
            h.update(json.dumps(cfg, sort_keys=True).encode())
        return h.hexdigest()


def resolve_model_folder(model: str) -> Path:
    """The local diffusers folder for ``model``, building or downloading it if needed."""
    check_model_name(model)
    if model.startswith("random:"):
        name = model.removeprefix("random:")
        if name not in ALL_RANDOM:
            raise InputError(f"unknown random model {model!r}; allowed: {', '.join('random:' + n for n in ALL_RANDOM)}")
        return random_folder(name)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model {model!r} is a file; give a diffusers folder, a hub id or random:<name>")
        check_model_folder(path)
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise InputError(f"model {model!r} is neither an existing folder nor a hub id like 'stabilityai/sd-turbo'")
    try:  # before a download, whose failure would read as the network's
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(model)
    except ImportError:
        pass
    except ValueError as e:
        raise InputError(
            f"model {model!r} is neither an existing folder nor a valid hub id ({first_line(e)})"
        ) from None
    return _download(model)


def model_family(folder: Path) -> str:
    """ "sdxl-turbo" for an SDXL pipeline folder, else "sd-turbo"."""
    try:
        cls = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError):
        cls = ""
    return "sdxl-turbo" if "XL" in cls or (folder / "text_encoder_2").is_dir() else "sd-turbo"


def check_model_folder(folder: Path) -> None:
    required = REQUIRED_XL if model_family(folder) == "sdxl-turbo" else REQUIRED
    missing = [f"{sub}/" for sub in required if not (folder / sub).is_dir()]
    for sub, files in required.items():
        if (folder / sub).is_dir():
            missing += [f"{sub}/{f}" for f in files if not (folder / sub / f).is_file()]
            if sub.startswith("tokenizer") and not _has_vocabulary(folder / sub):
                missing.append(f"{sub}/vocab.json and {sub}/merges.txt (or {sub}/tokenizer.json)")
            if sub in WEIGHTS:
                _, files = component_weights(folder / sub, WEIGHTS[sub])
                missing += [f"{sub}/{f.name}" for f in files if not f.is_file()]
    if missing and is_bundle(folder):  # an sdturbo bundle, given as a model
        raise InputError(
            f"{folder} is an sdturbo bundle (exported already), not a model folder: run it with `sdturbo generate "
            f"--bundle {folder}` (or serve --bundle)"
        )
    if missing:
        raise InputError(
            f"model folder {folder} lacks {', '.join(missing)} (a diffusers folder of this model "
            f"needs {', '.join(required)} with safetensors weights: whole, sharded, or the {VARIANT} variant)"
        )


def load_model(model: str, half: bool = False) -> LoadedModel:
    """``model``'s configs and tokenizers, its weights checked (each file's safetensors header); each torch module
    loads from them on the CPU when first used: fp32, or fp16 with ``half`` (for fp16-only exports: half the
    memory). The SDXL VAE always loads in fp32: it overflows in fp16."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = resolve_model_folder(model)
    family = model_family(folder)
    variants = {}
    for sub in REQUIRED_XL if family == "sdxl-turbo" else REQUIRED:
        if sub in WEIGHTS:
            variants[sub], files = component_weights(folder / sub, WEIGHTS[sub])
            for path in files:
                check_safetensors(path)
    log.info("loading %s (%s) from %s", model, family, folder)
    if any(variants.values()):
        log.info("weights of the %s variant: %s", VARIANT, ", ".join(sub for sub, v in variants.items() if v))
    # Eager attention exports as plain MatMul/Softmax in the model's dtype; the TorchScript exporter
    # lowers transformers' SDPA path with fp32 casts that leave fp16 graphs ill-typed.
    xl = family == "sdxl-turbo"
    dtype = torch.float16 if half else torch.float32

    def kw(sub, **extra):
        return {"use_safetensors": True, "torch_dtype": dtype, "variant": variants[sub], **extra}

    te_kw = {"attn_implementation": "eager"}
    # diffusers' default, low_cpu_mem_usage through accelerate, measured on full-size SD-Turbo: the same peak
    # (7.06 GB for the fp32 export) and a slower load (9.5 s against 7.0-7.5 s); without accelerate installed it
    # falls back to this with a warning at every load that tells the user to install it.
    dm_kw = {"low_cpu_mem_usage": False}
    xl_vae = {"torch_dtype": torch.float32} if xl else {}
    modules = {  # each module's class and loading arguments, as diffusers' pipelines load it
        "text_encoder": (CLIPTextModel, te_kw),
        "unet": (UNet2DConditionModel, dm_kw),
        "vae": (AutoencoderKL, {**xl_vae, **dm_kw}),
    }
    if xl:
        modules["text_encoder_2"] = (CLIPTextModelWithProjection, te_kw)

    def loader(name):
        cls, extra = modules[name]

        def load():
            try:
                with transformers_bars_quiet():
                    return cls.from_pretrained(folder / name, **kw(name, **extra)).eval()
            except (OSError, ValueError) as e:
                raise _load_error(model, folder, e) from e

        return load

    try:  # transformers' and diffusers' words for a damaged config or file become one line naming the model
        with torch.device("meta"):  # configs as the modules hold them, and parameter counts: no weights
            skeletons = {name: _skeleton(cls, folder / name) for name, (cls, _) in modules.items()}
        lm = LoadedModel(
            model_id=model,
            folder=folder,
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
            family=family,
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2") if xl else None,
            loaders={name: loader(name) for name in modules},
            skeletons=skeletons,
        )
    except (OSError, ValueError) as e:
        raise _load_error(model, folder, e) from e
    pairs = [(lm.tokenizer, "tokenizer", "text_encoder"), (lm.tokenizer_2, "tokenizer_2", "text_encoder_2")]
    for tok, sub, encoder in pairs:
        if tok is not None:
            _check_vocabulary(model, folder / sub, len(tok), int(lm.config(encoder).vocab_size))
    return lm


@contextlib.contextmanager
def transformers_bars_quiet():
    """transformers draws a progress bar for every model it loads or saves ("Loading weights", "Writing model
    shards"), seconds at most, between our own lines. While we load or save one they show with -v only. Its
    switch is the Hub's too: turned back on after, and left alone where the user turned bars off (no download
    runs meanwhile: the model's files are here by then)."""
    from transformers.utils import logging as tf_logging

    if log.isEnabledFor(logging.DEBUG) or not tf_logging.is_progress_bar_enabled():
        yield
        return
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.enable_progress_bar()


def _check_vocabulary(model: str, folder: Path, size: int, embeddings: int) -> None:
    """A tokenizer whose vocabulary is far smaller than its text encoder's, or larger, maps prompts to the wrong
    tokens (transformers makes a 2-token CLIP tokenizer from a folder without its vocabulary files: every image
    then ignores its prompt, silently). SD-Turbo's are equal (49408); random:tiny's 747 of 1000."""
    if size > embeddings or size < embeddings // 2:
        raise InputError(
            f"model {model}: the tokenizer in {folder} has {size} tokens for a text encoder of {embeddings}: its "
            f"vocabulary files are incomplete or of another model; download or save the model again"
        )


def _skeleton(cls, folder: Path):
    """Module class ``cls`` built from the config in ``folder`` (under a meta device: no memory for weights)."""
    if hasattr(cls, "load_config"):  # diffusers
        return cls.from_config(cls.load_config(folder))
    return cls(cls.config_class.from_pretrained(folder))


def _load_error(model: str, folder: Path, e: Exception) -> InputError:
    return InputError(f"cannot load the model {model} from {folder}: {first_line(e)}; download or save the model again")


def _has_vocabulary(folder: Path) -> bool:
    """A CLIP tokenizer's folder holds its vocabulary: tokenizer.json, or vocab.json and merges.txt (transformers
    loads a folder with neither, as a tokenizer of 2 tokens)."""
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


def model_files(folder: Path) -> list[Path]:
    """The files an export of the model in ``folder`` reads: model_index.json, the scheduler's config, the
    tokenizers' files, each component's config and the weights it loads (``component_weights``: the plain ones or
    the fp16 variant, whole, or the index and its shards). Other files (a README, another variant or format of
    the weights, as diffusers' ``from_pretrained(..., variant="fp16")`` adds them to a Hub snapshot) are not read."""
    required = REQUIRED_XL if model_family(folder) == "sdxl-turbo" else REQUIRED
    files = [folder / "model_index.json"]
    for sub, names in required.items():
        d = folder / sub
        if sub.startswith("tokenizer") and d.is_dir():
            files += sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
        files += [d / n for n in names]
        if sub in WEIGHTS:
            variant, weights = component_weights(d, WEIGHTS[sub])
            single, index = _weight_names(WEIGHTS[sub], variant)
            if not (d / single).is_file() and (d / index).is_file():
                files.append(d / index)
            files += weights
    return files


STAMP_PREFIX = "files:"  # a model_stamp; a bundle exported before it records a folder_stamp of every file


def model_stamp(folder: Path) -> str:
    """The fingerprint of ``model_files(folder)``: names, sizes, mtimes (engine/cache.py folder_stamp)."""
    return STAMP_PREFIX + folder_stamp(folder, model_files(folder))


def unchanged_since(recorded: str | None, folder: Path, sha256: str | None = None) -> bool:
    """Whether the model in ``folder`` is as it was when a bundle recorded ``recorded``: its ``model_stamp``, or
    where that differs and the bundle recorded ``sha256`` (``source_sha256``), the files' content (hashed once
    per change; with SDTURBO_VERIFY=size the stamp alone decides). For a bundle exported before the model stamp,
    the stamp of every file in the folder."""
    if recorded is not None and recorded.startswith(STAMP_PREFIX):
        if recorded == model_stamp(folder):
            return True
        return sha256 is not None and _same_content(folder, sha256)
    return recorded == folder_stamp(folder)


def content_sha256(folder: Path, *files: Path) -> str:
    """sha256 over each file's name (relative to ``folder``), size and sha256, in order: a file renamed or added
    (even empty), or bytes moved from one file to another, change it, as any changed byte does."""
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def _same_content(folder: Path, sha256: str) -> bool:
    """Whether the files an export of ``folder`` reads hash to ``sha256`` (``content_sha256``), hashed once per
    change of them (integrity.verify's stamps); never with SDTURBO_VERIFY=size, where the stamp alone decides."""
    if not hashing_on():
        return False
    digest = functools.partial(content_sha256, folder)
    try:
        verify(model_files(folder), sha256, f"the files of model {folder}", digest=digest)
    except (IntegrityError, OSError):  # changed, or a file missing
        return False
    return True


def component_weights(folder: Path, name: str) -> tuple[str | None, list[Path]]:
    """(variant, files) of a component's weights: the plain ones (whole or sharded) where there, else the
    fp16 variant's where there (variant ``"fp16"``), else (None, the plain file), which is missing."""
    for variant in (None, VARIANT):
        single, index = _weight_names(name, variant)
        if (folder / single).is_file() or (folder / index).is_file():
            return variant, weight_files(folder, name, variant)
    return None, [folder / name]


def _weight_names(name: str, variant: str | None) -> tuple[str, str]:
    """The whole file's and the index's names, as save_pretrained writes them for ``variant``."""
    if variant is None:
        return name, f"{name}.index.json"
    return name.replace(".safetensors", f".{variant}.safetensors"), f"{name}.index.{variant}.json"


def weight_files(folder: Path, name: str, variant: str | None = None) -> list[Path]:
    """The safetensors files holding a component's weights: the whole file, or where it is absent and its
    index is there, the shards that index lists (each file once, in name order)."""
    single, index_name = _weight_names(name, variant)
    index = folder / index_name
    if (folder / single).is_file() or not index.is_file():
        return [folder / single]
    try:
        shards = json.loads(index.read_text())["weight_map"].values()
        return [folder / shard for shard in sorted(set(shards))]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"model weights index {index} is not a safetensors index ({first_line(e)}); the file is truncated or "
            "corrupt; download or save the model again"
        ) from e


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or damaged safetensors file with one line naming it (the loaders raise a traceback
    deep in their own code): its header must parse and describe exactly the bytes the file holds."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if 8 + n > size:
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(f.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise InputError(
            f"model weights {path} are not a readable safetensors file ({e}); the file is truncated or corrupt; "
            f"{_refetch(path)}"
        ) from e
    if 8 + n + end != size:
        raise InputError(
            f"model weights {path} are {size} bytes but their header describes {8 + n + end}: the file is "
            f"truncated or corrupt; {_refetch(path)}"
        )


def _refetch(path: Path) -> str:
    """How to get a damaged weights file again. A Hub snapshot's is a Hugging Face cache blob, which a download
    keeps while it is there: deleting it makes the next run (online) fetch it anew."""
    if hub_blob(path) is not None:
        return f"it is the Hugging Face cache's blob {path.resolve()}: delete it, and the next run online downloads it"
    return "download or save the model again"


def random_folder(name: str, build=build_random, marker: str = "model_index.json") -> Path:
    """random:<name> built once by ``build(name)`` (anything with ``save_pretrained``), complete once it has
    ``marker``: a pipeline's model_index.json, or a single model's config.json (export/tiny_vae.py)."""
    folder = random_model_folder(name)
    if (folder / marker).is_file():
        return folder
    cache_folder(folder.parent)
    with locked(folder, "is building"):  # concurrent first runs: one builds, the others wait and use it
        if (folder / marker).is_file():
            return folder
        remove_leftovers(folder.parent, f".random-{name}-*")
        log.info("building random:%s once into %s", name, folder)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f".random-{name}-"), dir=folder.parent))
        make_shareable(tmp)
        try:
            with transformers_bars_quiet():
                build(name).save_pretrained(tmp, safe_serialization=True)
            replace_dir(tmp, folder)  # a folder there without the marker is a broken earlier build
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _download(repo_id: str) -> Path:
    """The Hub's copy of ``repo_id`` (the plain weights), downloaded once into the Hugging Face cache. Where
    that fails (offline, or the Hub unreachable) and the cache holds a whole model of it in a form we read
    (such as the fp16 variant alone, as ``from_pretrained(..., variant="fp16")`` leaves it), that copy."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, or unknown repo: say which model and why
        cached = _cached_snapshot(repo_id)
        if cached is None:
            raise InputError(
                f"could not download model {repo_id!r} from the Hugging Face Hub ({first_line(e)}); offline, "
                f"give a local diffusers folder or random:sd-turbo / random:tiny with --model"
            ) from e
        log.warning(
            "could not download %s (%s); using its copy in the Hugging Face cache, %s", repo_id, first_line(e), cached
        )
        return cached
    check_model_folder(folder)  # offline, the Hub library returns a cached folder it cannot vouch for
    return folder


def _cached_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's snapshot of ``repo_id`` (its main revision) if it holds a whole model."""
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(repo_id, "model_index.json")
        if not isinstance(index, str):
            return None
        folder = Path(index).parent
        check_model_folder(folder)
        return folder
    except Exception:  # not cached, or not whole: the download's own error is the one to give
        return None

"""A bundle on disk: ``manifest.json``, ``tokenizer.json``, ``onnx/<precision>/<component>.onnx``, engines.

The manifest is the commit point. A bundle is complete for a precision exactly when its manifest lists
that precision; files it does not list are ignored. Writers build everything under a temporary name and
rename the manifest into place last, so an interrupted export never looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import BundleError, InputError, IntegrityError
from .files import atomic_write, make_shareable  # noqa: F401  (re-exported: writers import them from here)
from .integrity import verify
from .schedule import SchedulerConfig
from .spec import ComponentSpec, TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
COMPONENTS_XL = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
TINY_VAE = ("tiny_vae_decoder", "tiny_vae_encoder")  # present when the manifest has a "tiny_vae" entry
VAES = ("full", "tiny")  # the decoder (and encoder) a pipeline runs: the model's own VAE, or the tiny one
FAMILIES = ("sd-turbo", "sdxl-turbo")
EXTERNAL_DATA_BYTES = 1_800_000_000  # graphs larger than this keep their weights in a .data file: protobuf
# refuses files over 2 GiB; stay clear of it


def is_bundle(folder: Path) -> bool:
    """``folder`` is an sdturbo bundle (of any schema version, or one whose manifest was damaged), not merely a
    folder with a ``manifest.json`` (a web app's): its manifest is a JSON object with the keys every version
    wrote (schema_version, model's config_hash, components), or it has a bundle's ONNX layout (``onnx/`` holding
    precision folders only), so that a bundle whose manifest was cut short is still one to export again."""
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError):
        manifest = None
    if (
        isinstance(manifest, dict)
        and isinstance(manifest.get("schema_version"), int)
        and isinstance(manifest.get("model"), dict)
        and "config_hash" in manifest["model"]
        and isinstance(manifest.get("components"), dict)
    ):
        return True
    try:
        layout = {p.name for p in (folder / "onnx").iterdir()}
    except OSError:
        return False
    return (folder / MANIFEST).is_file() and bool(layout) and layout <= {"fp32", "fp16"}


@dataclass(frozen=True)
class ComponentFile:
    spec: ComponentSpec
    onnx: Path
    data: Path | None
    sha256: str
    bytes: int  # onnx + data


@dataclass(frozen=True)
class TinyVae:
    """The manifest's record of the tiny autoencoder exported beside the full VAE (``export --tiny-vae``)."""

    source: str  # what it was exported from: a hub id, a folder, or random:<name>
    scaling_factor: float  # applied inside its graphs, as diffusers' pipelines apply it (TAESD: 1.0)


@dataclass(frozen=True)
class Limits:
    max_batch: int
    min_size: int
    max_size: int


MAX_BATCH, MIN_SIDE, MAX_SIDE = 256, 8, 4096  # the widest limits a bundle may hold (export refuses wider)
DEFAULT_LIMITS = {"max_batch": 16, "min_size": 64, "max_size": 1024}  # a new bundle's, where none is given


def export_again(root: Path, options: str = "MODEL") -> str:
    """What every "export it again" says: the command that does it, replacing the bundle at ``root`` (``options``:
    the model and export options; MODEL where the manifest cannot tell them)."""
    return f"export it again: `sdturbo export {options} --out {shlex.quote(str(root))} --force`"


def _on_disk(comp: ComponentFile) -> tuple[list[Path], list[Path], int]:
    """A component's files, those missing, and the size of them all (0 when any is missing)."""
    files = [comp.onnx] + ([comp.data] if comp.data else [])
    missing = [f for f in files if not f.is_file()]
    return files, missing, 0 if missing else sum(f.stat().st_size for f in files)


def _number(manifest: dict, dotted: str, kind: type = int):
    """The manifest's value at ``dotted`` (``limits.max_batch``) as ``kind``; a ValueError naming the field
    and its value otherwise (a bool is not a number here, nor is 2.5 a whole one)."""
    value = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif kind is int:
        ok = isinstance(value, int) or value.is_integer()
    else:
        ok = isinstance(value, int) or math.isfinite(value)
    if not ok:
        wanted = "a whole number" if kind is int else "a number"
        raise ValueError(f"{dotted} is {value!r}; it must be {wanted}")
    return kind(value)


class Bundle:
    """A read-only view of a bundle folder, checked on open."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise BundleError(
                f"bundle {self.root} is a file, not a bundle folder; give the folder `sdturbo export` made"
            )
        if not self.root.is_dir():
            raise BundleError(f"bundle {self.root} does not exist (run `sdturbo export MODEL --out {self.root}`)")
        path = self.root / MANIFEST
        if not path.is_file():
            inside = next((p for p in self.root.resolve().parents if is_bundle(p)), None)
            if inside is not None:
                raise BundleError(f"{self.root} is a folder inside the bundle {inside}; give the bundle's own folder")
            if (self.root / "model_index.json").is_file():  # a diffusers model folder, given as a bundle
                raise BundleError(
                    f"{self.root} is a diffusers model folder, not a bundle: give it with --model (exported once, "
                    f"cached), or export it with `sdturbo export {self.root} --out BUNDLE`"
                )
            raise BundleError(
                f"bundle {self.root} has no {MANIFEST}: it is incomplete or not a bundle; if it was one, remove it "
                f"and export it again: `sdturbo export MODEL --out {shlex.quote(str(self.root))}`"
            )
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is corrupt ({e}); {export_again(self.root)}") from e
        version = self.manifest.get("schema_version") if isinstance(self.manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{path} has schema_version {version!r}; this sdturbo reads schema_version {SCHEMA_VERSION} "
                f"({export_again(self.root)})"
            )
        try:
            self._parse()
        except KeyError as e:
            raise BundleError(f"{path} is malformed: field {e} is missing; {export_again(self.root)}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{path} is malformed: {e}; {export_again(self.root)}") from e

    def _parse(self) -> None:
        m = self.manifest
        self.model_id: str = m["model"]["id"]
        self.config_hash: str = m["model"]["config_hash"]
        self.scheduler = SchedulerConfig.from_dict(m["scheduler"])
        self.vae_scale_factor: int = _number(m, "vae.scale_factor")
        if self.vae_scale_factor < 1 or self.vae_scale_factor & (self.vae_scale_factor - 1):
            raise ValueError(f"vae.scale_factor {self.vae_scale_factor} (must be a positive power of two, e.g. 8)")
        self.latent_channels: int = _number(m, "vae.latent_channels")
        self.family: str = m["model"].get("family", "sd-turbo")
        if self.family not in FAMILIES:
            raise ValueError(f"model.family {self.family!r} (this sdturbo serves {', '.join(FAMILIES)})")
        entries = [("tokenizer", m["tokenizer"])]
        if m.get("tokenizer_2") is not None:
            entries.append(("tokenizer_2", m["tokenizer_2"]))
        self.tokenizers = [
            (self._path(t["file"]), _number(m, f"{k}.max_length"), _number(m, f"{k}.pad_id"), t["pad_token"])
            for k, t in entries
        ]
        self.tokenizer_file, self.max_length, self.pad_id, self.pad_token = self.tokenizers[0]
        self.tokenizer_sha256 = {self._path(t["file"]): t.get("sha256") for _, t in entries}  # None: older bundles
        self.limits = lim = Limits(*(_number(m, f"limits.{k}") for k in ("max_batch", "min_size", "max_size")))
        if not 1 <= lim.max_batch <= MAX_BATCH or not MIN_SIDE <= lim.min_size <= lim.max_size <= MAX_SIDE:
            raise ValueError(
                f"limits are {m['limits']}; max_batch must be 1 to {MAX_BATCH}, and "
                f"{MIN_SIDE} <= min_size <= max_size <= {MAX_SIDE}"
            )
        tiny = m.get("tiny_vae")
        self.tiny_vae = (
            None if tiny is None else TinyVae(str(tiny["source"]), _number(m, "tiny_vae.scaling_factor", float))
        )
        self.components: dict[str, dict[str, ComponentFile]] = {}
        for precision, comps in m["components"].items():
            self.components[precision] = {
                name: ComponentFile(
                    spec=ComponentSpec(
                        name,
                        tuple(TensorSpec.from_json(t) for t in c["inputs"]),
                        tuple(TensorSpec.from_json(t) for t in c["outputs"]),
                    ),
                    onnx=self._path(c["onnx"]),
                    data=self._path(c["data"]) if c.get("data") else None,
                    sha256=c["sha256"],
                    bytes=int(c["bytes"]),
                )
                for name, c in comps.items()
            }

    def _path(self, rel: str) -> Path:
        """A file named by the manifest: relative, and inside the bundle (no absolute paths, no '..')."""
        parts = PurePosixPath(rel).parts
        if not isinstance(rel, str) or not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise ValueError(f"file path {rel!r} (paths must stay inside the bundle)")
        return self.root.joinpath(*parts)

    @property
    def component_names(self) -> tuple[str, ...]:
        return (COMPONENTS_XL if self.family == "sdxl-turbo" else COMPONENTS) + (TINY_VAE if self.tiny_vae else ())

    def vae_components(self, vae: str) -> tuple[str, str]:
        """(decoder, encoder) of ``vae``: "full" (the default: diffusers' own image) or "tiny"."""
        if vae not in VAES:
            raise InputError(f"vae {vae!r} is not allowed; use one of {', '.join(VAES)}")
        if vae == "full":
            return "vae_decoder", "vae_encoder"
        if self.tiny_vae is None:
            source = "madebyollin/taesdxl" if self.family == "sdxl-turbo" else "madebyollin/taesd"
            raise BundleError(
                f"bundle {self.root} has no tiny VAE; add one with `sdturbo export {self.model_id} --out {self.root} "
                f"--tiny-vae {source}` (or a local AutoencoderTiny folder; offline: --tiny-vae random:"
                f"{source.split('/')[1]})"
            )
        return TINY_VAE

    def select_components(self, names=None) -> tuple[str, ...]:
        """``names`` (default: every component of this bundle's family), each checked to be one of them."""
        if names is not None and not names:
            raise InputError(f"--components is empty; name one or more of {', '.join(self.component_names)}")
        names = tuple(dict.fromkeys(names or self.component_names))  # (each once, in the order given)
        unknown = [c for c in names if c not in self.component_names]
        if unknown:
            raise InputError(
                f"--components {','.join(unknown)} is not allowed: component {unknown[0]!r} is not in this bundle "
                f"({', '.join(self.component_names)})"
            )
        return names

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.components)

    def component(self, precision: str, name: str, *, rehash: bool = False) -> ComponentFile:
        """A component's files, checked to be present, of the recorded size and content (sha256: hashed once
        per change of the files, see integrity.py; every time with ``rehash``)."""
        if precision not in self.components:
            raise BundleError(
                f"bundle {self.root} has no {precision} ONNX (it has: {', '.join(self.precisions)}); "
                f"export it with --precision {precision}"
            )
        comp = self.components[precision].get(name)
        if comp is None:
            raise BundleError(f"bundle {self.root} has no {name} for {precision}")
        files, missing, size = _on_disk(comp)
        if missing:
            raise BundleError(f"bundle {self.root} is missing {', '.join(map(str, missing))}; {self.export_hint}")
        if size != comp.bytes:
            raise BundleError(
                f"{comp.onnx} is {size} bytes but the manifest says {comp.bytes}: the file is "
                f"truncated or was changed; {self.export_hint}"
            )
        self._verify(files, comp.sha256, f"the {precision} {name} of bundle {self.root}", rehash)
        return comp

    def _verify(self, files: list[Path], sha256: str, what: str, rehash: bool = False) -> None:
        """integrity.verify, its error ending with the command that exports the bundle again."""
        try:
            verify(files, sha256, what, rehash=rehash)
        except IntegrityError as e:
            raise IntegrityError(f"{e}; {self.export_hint}") from e

    @property
    def export_hint(self) -> str:
        """The command that exports this bundle again as it was: its model, precisions, tiny VAE and limits."""
        options = [self.model_id]
        if len(self.precisions) == 1:
            options += ["--precision", self.precisions[0]]
        if self.tiny_vae is not None:
            options += ["--tiny-vae", self.tiny_vae.source]
        for name, default in DEFAULT_LIMITS.items():
            if getattr(self.limits, name) != default:
                options += [f"--{name.replace('_', '-')}", str(getattr(self.limits, name))]
        return export_again(self.root, shlex.join(options))

    def check_files(self) -> None:
        """BundleError naming every file the manifest lists that is missing or not of its recorded size, and the
        command that repairs the bundle. Cheap (nothing is hashed: ``component`` checks content)."""
        damaged = []
        for comps in self.components.values():
            for comp in comps.values():
                _, missing, size = _on_disk(comp)
                damaged += [f"{f.relative_to(self.root)} is missing" for f in missing]
                if not missing and size != comp.bytes:
                    damaged.append(f"{comp.onnx.relative_to(self.root)} is {size} bytes, not {comp.bytes}")
        damaged += [f"{p.relative_to(self.root)} is missing" for p in self.tokenizer_sha256 if not p.is_file()]
        if damaged:
            raise BundleError(f"bundle {self.root} is damaged: {'; '.join(damaged)}; {self.export_hint}")

    def prompt_tokenizers(self) -> list:
        """The tokenizers, checked: present, of the recorded content (bundles that record it), readable."""
        from .tokenizer import PromptTokenizer, Warned

        for path, sha in self.tokenizer_sha256.items():
            if not path.is_file():
                raise BundleError(f"bundle {self.root} is missing {path.name}; {self.export_hint}")
            if sha is not None:
                self._verify([path], sha, f"the tokenizer of bundle {self.root}")
        warned = Warned()  # shared: a prompt both of SDXL's tokenizers cut at the same place is warned of once
        return [PromptTokenizer(*t, warned=warned) for t in self.tokenizers]

    def check_request(self, batch: int, height: int, width: int) -> None:
        lim = self.limits
        if batch < 1:
            raise InputError(f"batch {batch} is not allowed; give 1 or more (up to max_batch {lim.max_batch})")
        if batch > lim.max_batch:
            raise InputError(
                f"batch {batch} is larger than this bundle allows (max_batch {lim.max_batch}); "
                f"export with a larger --max-batch"
            )
        for side, v in (("height", height), ("width", width)):
            if not lim.min_size <= v <= lim.max_size:
                raise InputError(f"{side} {v} is outside this bundle's range {lim.min_size}-{lim.max_size}")

"""Write a bundle: ONNX per component and precision, tokenizer.json, manifest.json; atomically.

A new bundle is written under a temporary sibling folder and renamed into place when complete. Adding a
precision to an existing bundle writes ``onnx/<precision>`` under a temporary name, renames it in, and
rewrites the manifest last (the manifest is the commit point: see engine/bundle.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from ..engine.bundle import (
    DEFAULT_LIMITS,
    MANIFEST,
    MAX_BATCH,
    MAX_SIDE,
    MIN_SIDE,
    SCHEMA_VERSION,
    Bundle,
    is_bundle,
)
from ..engine.cache import cache_root, check_model_name
from ..engine.errors import BundleError, InputError, ModelChanged
from ..engine.files import (
    atomic_write,
    check_free_space,
    folder_bytes,
    human_size,
    locked,
    make_shareable,
    naming_failures,
    nearest_existing,
    remove_leftovers,
    replace_dir,
    temp_prefix,
)
from ..engine.integrity import file_sha256, stamp
from ..engine.spec import component_specs, component_specs_xl
from .models import LoadedModel, load_model, model_stamp, unchanged_since
from .onnx_export import export_record
from .tiny_vae import (
    AUTO,
    check_fits,
    check_tiny_source,
    default_source,
    load_tiny_vae,
    same_source,
    write_tiny_onnx,
)

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")  # export order matters: fp16 converts the loaded modules in place
ITEM_BYTES = {"float32": 4, "float16": 2}


EXPORT_TOOLS = ("sdturbo", "torch", "diffusers", "transformers", "onnx", "tokenizers")


def tool_versions(dists: tuple[str, ...] = EXPORT_TOOLS) -> dict[str, str]:
    """Python's version and each installed distribution's (missing ones are left out)."""
    out = {"python": platform.python_version()}
    for dist in dists:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def export_bundle(
    model: str,
    out: str | os.PathLike,
    precisions=("fp32", "fp16"),
    max_batch: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    force: bool = False,
    tiny_vae: str | None = None,
) -> Path:
    """Export ``model`` into the bundle folder ``out`` (created, or completed with missing precisions).

    ``force`` replaces the bundle at ``out`` (never a folder that is not a bundle). One process writes a
    bundle at a time: others wait for it, then use or complete what it wrote. Readers see the old bundle
    or the new one at every moment. ``tiny_vae``: a tiny autoencoder's source (export/tiny_vae.py), exported
    beside the full VAE into every precision of the bundle (added to an existing bundle without exporting the
    model again; ``"auto"``: the model's own TAESD); a bundle that has one exports it into precisions added
    later too. ``max_batch``, ``min_size``, ``max_size``: the limits of a new bundle (None: ``DEFAULT_LIMITS``); an
    existing bundle keeps its own, and one given that differs from them is refused (``force`` exports anew)."""
    check_model_name(model)
    out = Path(out)
    asked = {"max_batch": max_batch, "min_size": min_size, "max_size": max_size}
    precisions = _check_args(precisions, asked)
    if tiny_vae not in (None, AUTO):
        check_tiny_source(tiny_vae)  # before it is compared with a bundle's own, or the model loads
    _make_parent(out)
    with locked(out, "is exporting"):
        remove_leftovers(out.parent, f".{out.name}.tmp-*")
        remove_leftovers(out.parent, f".{out.name}.old-*")
        existing = _existing(out, force)
        if existing is not None:  # it keeps its own limits: any given must be those
            existing.check_files()  # a damaged bundle is not completed, nor reported done
            _check_same_limits(existing, asked, out)
        max_batch, min_size, max_size = (DEFAULT_LIMITS[k] if v is None else v for k, v in asked.items())
        if existing is None and min_size > max_size:
            raise InputError(f"size range {min_size}-{max_size} is not allowed; the smallest side is above the largest")
        todo = [p for p in PRECISIONS if p in precisions and (existing is None or p not in existing.precisions)]
        if tiny_vae == AUTO:  # the model's own TAESD, unless the bundle has a tiny VAE already
            has = existing is not None and existing.tiny_vae is not None
            tiny_vae = None if has else default_source(model, existing.family if existing else None)
        tiny_source, tiny_todo = _tiny_plan(existing, tiny_vae, todo, out)
        if not todo and not tiny_todo:
            _check_same_name(existing, model, out)  # nothing to export: say so only for the bundle's own model
            log.info("bundle %s already has %s", out, ", ".join(precisions))
            return out
        _check_can_write(out)  # before the model loads (minutes, for a real one)
        if existing is not None and not todo:
            _check_same_id(existing, model, out)  # only a tiny VAE to add: no model loads
        tiny = load_tiny_vae(tiny_source) if tiny_todo else None  # before the model: a failed download takes seconds
        lm = load_model(model, half="fp32" not in todo) if todo else None
        source = lm.source() if lm is not None and existing is None else None  # before the weights are read
        if lm is not None:
            _check_disk(lm, out, todo)  # before minutes of export that a full disk would end
            if existing is not None:
                _check_same_model(existing, lm, out)
        if tiny is not None:
            if lm is not None:
                vae = lm.config("vae")
                channels, scale = vae.latent_channels, 2 ** (len(vae.block_out_channels) - 1)
            else:
                channels, scale = existing.latent_channels, existing.vae_scale_factor
            check_fits(tiny, channels, scale)  # before the model's export too
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{out.name}.tmp-"), dir=out.parent))
        make_shareable(tmp)
        try:
            with naming_failures(out.parent):  # a full disk mid-write names where it was writing
                components = _write_onnx(lm, tmp, todo) if todo else {}
                if tiny is not None:
                    for p, comps in write_tiny_onnx(tiny, tmp, tiny_todo, channels, scale).items():
                        components.setdefault(p, {}).update(comps)
                if existing is None:
                    manifest = _manifest(lm, source, tmp, max_batch, min_size, max_size)
                    manifest["components"] = components
                    if tiny is not None:
                        manifest["tiny_vae"] = tiny.manifest_entry()
                    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
                    if force:
                        _keep_caches(out, tmp)
                        replace_dir(tmp, out)  # out is absent, an empty folder or a bundle
                    else:
                        _publish(tmp, out)
                else:
                    _complete(existing, out, tmp, todo, components, tiny)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _stamp_written(Bundle(out), components, tokenizers=existing is None)
    log.info("bundle ready: %s", out)
    return out


CACHES = ("engines", "ort-optimized", "ort")  # what `build` and loads make in a bundle, keyed by its ONNX's sha256


def _keep_caches(old: Path, new: Path) -> None:
    """What `build` and loads made in the bundle ``old`` (TensorRT engines, ONNX Runtime optimized graphs: hours
    at full size; ONNX Runtime's CPU session graphs: a minute), carried into ``new``, the bundle that replaces it.
    Each is keyed by the sha256 of the ONNX it was made from (an export writes the same bytes from the same
    model), so one that this export changed is found stale where it is used (rebuilt, or refused, as ever).
    Hard links, so that readers of ``old`` keep them until the swap; moved where the file system has none."""
    kept = []
    for name in CACHES:
        src, dst = old / name, new / name
        if not src.is_dir():
            continue
        try:
            shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
        except OSError:  # (shutil.Error is one) a file system without hard links
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
        kept.append(f"{name} ({human_size(folder_bytes(dst))})")
    if kept:
        log.info(
            "keeping %s of the bundle it replaces: each is keyed by the sha256 of its ONNX, so any made from a "
            "graph this export changed is made again (engines and fused graphs by `sdturbo build`, refused until "
            "then; CPU session graphs by the next load)",
            ", ".join(kept),
        )


def _complete(existing: Bundle, out: Path, tmp: Path, todo: list[str], components: dict, tiny) -> None:
    """Move what was written under ``tmp`` into the existing bundle, then commit it in its manifest: new
    precisions as whole folders, a tiny VAE added to an existing precision file by file (new names, not in the
    manifest until it is rewritten, so not in use)."""
    for p in todo:
        dest = out / "onnx" / p
        if dest.exists():  # left by an interrupted run: not in the manifest, so not in use
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "onnx" / p, dest)
    for p, comps in components.items():
        if p not in todo:
            for entry in comps.values():
                for rel in filter(None, (entry["onnx"], entry["data"])):
                    os.replace(tmp / rel, out / rel)
    manifest = dict(existing.manifest)
    old = manifest["components"]
    manifest["components"] = {p: {**old.get(p, {}), **components.get(p, {})} for p in (*old, *components)}
    if tiny is not None:
        manifest["tiny_vae"] = tiny.manifest_entry()
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2))


def _tiny_plan(existing: Bundle | None, source: str | None, todo: list[str], out: Path) -> tuple[str | None, list]:
    """(source, precisions) of the tiny VAE to export now: every precision the bundle will have for a new one,
    the new precisions for the one a bundle already has. One tiny VAE per bundle: another source is refused."""
    have = existing.tiny_vae if existing is not None else None
    if have is not None:
        if source is not None and not same_source(source, have.source):
            raise BundleError(
                f"bundle {out} already has a tiny VAE from {have.source}; to use {source} instead, export the "
                f"bundle again with --force, or into another --out"
            )
        return have.source, todo
    if source is None:
        return None, []
    return source, [p for p in PRECISIONS if p in todo or (existing is not None and p in existing.precisions)]


def _check_same_id(existing: Bundle, model: str, out: Path) -> None:
    """Adding only a tiny VAE loads no model: the model named must be the one the bundle was exported from."""
    if not same_source(model, existing.model_id):
        raise BundleError(
            f"bundle {out} was exported from {existing.model_id}, not {model}; give that model, or another --out"
        )


def _check_same_limits(existing: Bundle, asked: dict, out: Path) -> None:
    """A limit given (not None) that is not the existing bundle's: refused, as completing the bundle keeps its
    own and reporting it done would say the new one holds."""
    for name, value in asked.items():
        have = getattr(existing.limits, name)
        if value is not None and value != have:
            raise BundleError(
                f"bundle {out} was exported with {name} {have}, not {value} (--{name.replace('_', '-')}); nothing "
                f"was exported: use another --out, or --force to export it again with the new limits"
            )


def _check_same_name(existing: Bundle, model: str, out: Path) -> None:
    """A bundle that has everything asked for is reported done only when ``model`` names the model it was
    exported from (its name, or the same folder: a random model's build counts as its folder)."""
    from ..engine.cache import local_model_folder

    if same_source(model, existing.model_id):
        return
    mine, theirs = local_model_folder(model), local_model_folder(existing.model_id)
    if mine is not None and theirs is not None and mine.resolve() == theirs.resolve():
        return
    raise BundleError(
        f"bundle {out} was exported from {existing.model_id}, not {model}; nothing was exported: "
        f"use another --out, or --force to replace it"
    )


def _publish(tmp: Path, out: Path) -> None:
    """Rename the new bundle into place (``out`` is absent or an empty folder). A bundle put there meanwhile by
    a writer that does not take the lock (an older sdturbo) is kept: it is the same model."""
    try:
        os.replace(tmp, out)
    except OSError as e:
        if is_bundle(out):
            log.info("another process exported %s first; using that one", out)
        elif e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise BundleError(
                f"--out {out} appeared during the export and is not a bundle; choose another --out"
            ) from e
        else:  # (e.g. a mount point made meanwhile: EBUSY)
            raise BundleError(
                f"the new bundle cannot be renamed to --out {out} ({e.strerror}); choose another --out"
            ) from e


def _check_same_model(existing: Bundle, lm: LoadedModel, out: Path) -> None:
    """A precision is added only from the model the bundle was exported from, as it was then (ModelChanged:
    the cache replaces its bundle instead)."""
    if existing.config_hash != lm.config_hash():
        raise ModelChanged(
            f"bundle {out} was exported from another model ({existing.model_id}); "
            f"use another --out or --force to replace it"
        )
    recorded = existing.manifest["model"].get("source_stamp")
    if recorded is not None and not unchanged_since(
        recorded, lm.folder, existing.manifest["model"].get("source_sha256")
    ):
        raise ModelChanged(
            f"bundle {out} was exported from {existing.model_id} before its files changed; a precision added now "
            f"would not match the others: use --force to export it again, or another --out"
        )


def _stamp_written(bundle: Bundle, written: dict, tokenizers: bool) -> None:
    """The files just written (``written``: precision -> components; the tokenizers of a new bundle) hashed to
    their recorded sha256 as they were written: say so, so that the first load does not hash them again
    (integrity.py). Files written earlier are left to be checked."""
    for precision, names in written.items():
        for name in names:
            comp = bundle.components[precision][name]
            stamp([comp.onnx] + ([comp.data] if comp.data else []), comp.sha256)
    for path, sha in bundle.tokenizer_sha256.items() if tokenizers else ():
        if sha is not None:
            stamp([path], sha)


def _make_parent(out: Path) -> None:
    """``out``'s parent folder, made if missing; InputError naming a file in the way."""
    folder = nearest_existing(out.parent)
    if not folder.is_dir():
        raise InputError(f"cannot write the bundle {out}: {folder} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write the bundle {out}: {out.parent} cannot be made ({e.strerror})") from e


def _check_can_write(out: Path) -> None:
    """The bundle is written into a temporary folder beside ``out``, then renamed: one is made and removed now
    (what os.access cannot tell, such as a read-only mount, included); InputError if that fails."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=temp_prefix(f".{out.name}.tmp-"), dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot write the bundle {out}: no folder can be made in {out.parent} ({e.strerror})") from e


# Each component's torch module, and the parts of it that the component runs (all of it: ()).
COMPONENT_MODULES = {
    "text_encoder": ("text_encoder", ()),
    "text_encoder_2": ("text_encoder_2", ()),
    "unet": ("unet", ()),
    "vae_decoder": ("vae", ("decoder", "post_quant_conv")),
    "vae_encoder": ("vae", ("encoder", "quant_conv")),
}


def weight_bytes(lm: LoadedModel, precision: str) -> dict[str, int]:
    """Each component's weights in its float type at ``precision`` (its contract's: SDXL's VAE stays fp32): what
    its ONNX file holds, but for its graph's few MB."""
    sizes = {}
    for name, spec in specs_for(lm).items():
        module, children = COMPONENT_MODULES[name]
        count = lm.parameter_count(module, children)
        sizes[name] = count * ITEM_BYTES[spec.resolve(precision).outputs[0].dtype]
    return sizes


def _check_disk(lm: LoadedModel, out: Path, todo: list[str]) -> None:
    """Refuse an export that the free space under ``out`` cannot hold: every graph, plus the largest once more
    (a large graph is traced to a temporary file, then cleaned into its own)."""
    sizes = {f"{name} ({p})": n for p in todo for name, n in weight_bytes(lm, p).items()}
    largest = max(sizes, key=sizes.get)
    check_free_space(
        out.parent,
        sum(sizes.values()) + sizes[largest],
        f"exporting {lm.model_id} ({', '.join(todo)})",
        f"{human_size(sum(sizes.values()))} of graphs, and room to write the largest, {largest}, twice",
        f"Free some space, or {_elsewhere(out)}",
    )


def _elsewhere(out: Path) -> str:
    """How to put the bundle ``out`` on another disk: the cache's (a model given to generate, bench or serve) is
    moved with SDTURBO_CACHE, an export's own with --out."""
    try:
        out.resolve().relative_to(cache_root().resolve())
    except ValueError:
        return "give --out on another disk"
    return "set SDTURBO_CACHE to a folder on another disk (the cache of models and bundles)"


def _check_args(precisions, limits: dict) -> tuple[str, ...]:
    """The precisions, and each limit given (not None) on its own; whether they fit together is checked for a
    new bundle, with the defaults of those not given (an existing bundle's own are compared instead)."""
    precisions = tuple(precisions)
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise InputError(f"precision {bad or precisions!r} is not allowed; use one or more of {PRECISIONS}")
    for name, value in limits.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name}={value!r} is not allowed; give a whole number")
        if name == "max_batch" and not 1 <= value <= MAX_BATCH:
            raise InputError(f"max_batch={value} is not allowed; use 1 to {MAX_BATCH}")
        if name != "max_batch" and (value % 8 or not MIN_SIDE <= value <= MAX_SIDE):
            raise InputError(f"{name}={value} is not allowed; use a multiple of 8 within {MIN_SIDE}-{MAX_SIDE}")
    return precisions


def _existing(out: Path, force: bool) -> Bundle | None:
    """The bundle at ``out`` to complete; None to write a new one (nothing there, an empty folder, or a bundle
    to replace with ``force``). Anything else at ``out`` is the user's: refused, with or without ``force``."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BundleError(f"--out {out} is a file, not a bundle folder; choose another --out")
    if not (out / MANIFEST).is_file():
        if not any(out.iterdir()):
            _check_not_mount_point(out)
            return None
        raise BundleError(
            f"--out {out} is a folder that is not a bundle (it has no {MANIFEST}); it is left as it is "
            f"(--force replaces bundles only): choose another --out, or empty that folder"
        )
    if not is_bundle(out):  # a web app's manifest.json, say: never a bundle to replace
        raise BundleError(
            f"--out {out} is a folder that is not a bundle (its {MANIFEST} is not an sdturbo bundle's); it is left "
            f"as it is (--force replaces bundles only): choose another --out, or empty that folder"
        )
    if not force:
        return Bundle(out)
    _check_not_mount_point(out)
    return None


def _check_not_mount_point(out: Path) -> None:
    """A new bundle replaces the folder ``out`` by a rename, which a mount point cannot take (EBUSY, found only
    after the whole export): BundleError saying what to give instead, now."""
    if os.path.ismount(out):
        raise BundleError(
            f"--out {out} is a mount point: a new bundle is written beside it and renamed into its place, which a "
            f"mount point cannot take; give a folder inside it, e.g. --out {out / 'bundle'}"
        )


def specs_for(lm: LoadedModel) -> dict:
    """The component contracts of ``lm``'s family, sized from its configs."""
    te, channels = lm.config("text_encoder"), lm.config("vae").latent_channels
    if lm.family == "sdxl-turbo":
        te2 = lm.config("text_encoder_2")
        return component_specs_xl(
            te.max_position_embeddings, te.hidden_size, te2.hidden_size, te2.projection_dim, channels
        )
    return component_specs(te.max_position_embeddings, te.hidden_size, channels)


def _write_onnx(lm: LoadedModel, root: Path, precisions: list[str]) -> dict:
    """Each component in each precision; one module's weights held at a time (measured, SDXL-Turbo fp16: the
    second text encoder's export beside the loaded UNet made the peak), each module in every precision before
    the next loads: fp32 first, then made fp16 in place (the SDXL VAE stays fp32: it overflows in fp16)."""
    specs = specs_for(lm)
    components = {p: dict.fromkeys(specs) for p in precisions}  # the manifest lists them in the specs' order
    total = len(precisions) * len(specs)
    done = 0
    for module in dict.fromkeys(COMPONENT_MODULES[name][0] for name in specs):
        for precision in precisions:
            folder = root / "onnx" / precision
            folder.mkdir(parents=True, exist_ok=True)
            if precision == "fp16" and not (module == "vae" and lm.family == "sdxl-turbo"):
                lm.module(module).half()
            for name in (n for n in specs if COMPONENT_MODULES[n][0] == module):
                done += 1
                log.info("[%d/%d] exporting %s (%s)", done, total, name, precision)
                spec = specs[name].resolve(precision)
                components[precision][name] = export_record(lm, spec, folder, precision)
        lm.release(module)
    return components


def _manifest(lm: LoadedModel, source: dict, root: Path, max_batch: int, min_size: int, max_size: int) -> dict:
    if model_stamp(lm.folder) != source["source_stamp"]:  # the ONNX would not be what the manifest names
        raise InputError(
            f"the files of model {lm.model_id} in {lm.folder} changed during the export; export it again once "
            f"they are written"
        )
    tok = lm.tokenizer
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    te, vae = lm.config("text_encoder"), lm.config("vae")
    extra = {}
    if lm.tokenizer_2 is not None:
        lm.tokenizer_2.backend_tokenizer.save(str(root / "tokenizer_2.json"))
        t2 = lm.tokenizer_2
        extra["tokenizer_2"] = {
            "file": "tokenizer_2.json",
            "max_length": int(te.max_position_embeddings),
            "pad_id": int(t2.pad_token_id),
            "pad_token": str(t2.pad_token),
            "sha256": file_sha256(root / "tokenizer_2.json"),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "id": lm.model_id,
            "config_hash": lm.config_hash(),
            "family": lm.family,
            **source,
        },
        "scheduler": {k: v for k, v in lm.scheduler_config.items() if k == "_class_name" or not k.startswith("_")},
        "vae": {
            "scaling_factor": float(vae.scaling_factor),
            "latent_channels": int(vae.latent_channels),
            "scale_factor": 2 ** (len(vae.block_out_channels) - 1),
        },
        "text": {"hidden_size": int(te.hidden_size), "vocab_size": int(te.vocab_size)},
        "tokenizer": {
            "file": "tokenizer.json",
            "max_length": int(te.max_position_embeddings),
            "pad_id": int(tok.pad_token_id),
            "pad_token": str(tok.pad_token),
            "sha256": file_sha256(root / "tokenizer.json"),
        },
        **extra,
        "limits": {"max_batch": max_batch, "min_size": min_size, "max_size": max_size},
        "components": {},
        "tools": tool_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

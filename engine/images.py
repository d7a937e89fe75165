"""Images in and out of the runtime, on the host (numpy + Pillow)."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Collection
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError
from .files import atomic_write, nearest_existing


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounding as diffusers does: ``clamp(x / 2 + 0.5, 0, 1)``
    in the image's dtype, then ``round(x * 255)`` in fp32.

    numpy's fp16 arithmetic is slow (about 25 ms at 512x512), and the result depends on the fp16 value alone,
    so fp16 images go through a table of all 65,536 values, made once with that same arithmetic."""
    if image.dtype == np.float16:
        return _fp16_table()[np.ascontiguousarray(image).view(np.uint16).transpose(0, 2, 3, 1)]
    return _uint8(image)


def nonfinite_images(image: np.ndarray) -> list[int]:
    """Indices of the images of ``image`` [B, ...] holding a NaN or an infinity, which uint8 would hide."""
    return np.flatnonzero(~np.isfinite(image.reshape(len(image), -1)).all(axis=1)).tolist()


def _uint8(image: np.ndarray) -> np.ndarray:
    x = np.clip(image / np.asarray(2, image.dtype) + np.asarray(0.5, image.dtype), 0, 1)
    return np.round(x.transpose(0, 2, 3, 1).astype(np.float32) * 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _fp16_table() -> np.ndarray:
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(1, 1, 1, -1)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf: whatever the arithmetic gives, as on [B,3,H,W]
        table = _uint8(values).reshape(-1)
    table.flags.writeable = False
    return table


def check_pixels(image) -> None:
    """img2img input must be uint8 pixels 0-255: a float image (say in [0, 1]) is refused, never reinterpreted."""
    if not isinstance(image, np.ndarray):
        raise InputError(
            f"image is a {type(image).__name__}; img2img needs a uint8 numpy array [batch, height, width, RGB]"
        )
    if image.dtype != np.uint8:
        raise InputError(
            f"image has dtype {image.dtype}; img2img needs uint8 pixels 0-255 "
            f"(from floats in [0, 1]: (x * 255).round().astype(np.uint8))"
        )


def to_model_image(image: np.ndarray, dtype) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] in [-1, 1]."""
    check_pixels(image)  # a Request made without ``check`` reaches here too
    x = image.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x * 2.0 - 1.0).astype(dtype)


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """[H, W, 3] uint8 from an image file, read as diffusers' ``load_image`` does (EXIF orientation applied,
    then RGB), except that 16-bit grayscale is scaled to 8 bits instead of clipped; resized (Lanczos, as
    diffusers) to ``size`` = (width, height). Images over Pillow's decompression-bomb limit are refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
            fmt = img.format  # exif_transpose returns a copy, which has no format
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {path} is too large to open safely: {e}") from e
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    img = _to_rgb(img, path, fmt)
    if size is not None and img.size != size:
        img = img.resize(size, Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image, path, fmt: str | None) -> Image.Image:
    """RGB as Pillow converts it, but 16-bit grayscale (which Pillow clips at 255) scaled 65535 -> 255,
    rounded; 32-bit integer and float pixels, which have no fixed range, are refused. ``fmt``: the file's format,
    read before exif_transpose (Pillow < 10.3 opens a 16-bit grayscale PNG as mode "I", later ones as "I;16")."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N") or (img.mode == "I" and fmt == "PNG"):
        gray = (np.asarray(img).astype(np.uint32) + 128) // 257  # round(v / 257): 0..65535 -> 0..255
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if img.mode == "F" or img.mode.startswith("I"):
        kind = "float" if img.mode == "F" else "32-bit integer"
        raise InputError(
            f"image {path} has {kind} pixels (Pillow mode {img.mode!r}), which have no fixed range; "
            f"save it as an 8- or 16-bit image (RGB or grayscale)"
        )
    return img.convert("RGB")


OUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_out_path(out: str | Path, count: int = 1) -> list[Path]:
    """The files ``save_images`` writes for ``count`` images at ``out``, checked before any work is done: an
    image extension Pillow writes here, no folder of that name, and a writable folder to put them in (or one
    that can be made)."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"cannot save images as {out}: it is a folder; name a file in it, e.g. {out / 'out.png'}")
    Image.init()
    allowed = [e for e in OUT_EXTENSIONS if Image.registered_extensions().get(e) in Image.SAVE]  # webp: libwebp
    if out.suffix.lower() not in allowed:
        what = f"extension {out.suffix!r}" if out.suffix else "no extension"
        raise InputError(f"cannot save images as {out}: it has {what}; use {', '.join(allowed)}")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise InputError(f"cannot save an image as {path}: it is a folder; choose another name")
        if path.exists() and not os.access(path, os.W_OK):
            raise InputError(f"cannot write {path}: the file is read-only for this user")
    folder = nearest_existing(out.parent)  # save_images creates the rest under it
    if not folder.is_dir():
        raise InputError(f"cannot save images in {out.parent}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out}: the folder {folder} is read-only or not writable for this user")
    try:  # and what access() cannot tell (root, a read-only mount, /proc): a file made there and removed
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sdturbo-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write {out}: a file cannot be made in {folder} ({e.strerror})") from e
    return paths


def save_images(images: np.ndarray, out: str | Path, skip: Collection[int] = ()) -> list[Path]:
    """Save [B, H, W, 3] uint8 images: ``out`` for one image, ``stem-<i><suffix>`` for several (the format
    follows the extension; see ``check_out_path``), except the images numbered in ``skip`` (a file where one
    would go is left as it is). The paths written."""
    paths = check_out_path(out, len(images))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (img, path) in enumerate(zip(images, paths, strict=False)):
        if i in skip:
            continue
        data = io.BytesIO()
        Image.fromarray(img).save(data, format=Image.registered_extensions()[path.suffix.lower()])
        atomic_write(path, data.getvalue())  # an image there before is replaced whole or kept, never cut short
        written.append(path)
    return written


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))

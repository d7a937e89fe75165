"""Images in and out of the runtime, on the host (numpy + Pillow)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounding as diffusers does: ``clamp(x / 2 + 0.5, 0, 1)``
    in the image's dtype, then ``round(x * 255)`` in fp32.

    numpy's fp16 arithmetic is slow (about 25 ms at 512x512), and the result depends on the fp16 value alone,
    so fp16 images go through a table of all 65,536 values, made once with that same arithmetic."""
    if image.dtype == np.float16:
        return _fp16_table()[np.ascontiguousarray(image).view(np.uint16).transpose(0, 2, 3, 1)]
    return _uint8(image)


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


def to_model_image(image: np.ndarray, dtype) -> np.ndarray:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] in [-1, 1]."""
    x = image.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x * 2.0 - 1.0).astype(dtype)


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """[H, W, 3] uint8 from an image file; resized (Lanczos, as diffusers) to ``size`` = (width, height)."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    if size is not None and img.size != size:
        img = img.resize(size, Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def save_images(images: np.ndarray, out: str | Path) -> list[Path]:
    """Save [B, H, W, 3] uint8 as PNG: ``out`` for one image, ``stem-<i>.png`` for several."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths, strict=False):
        Image.fromarray(img).save(path)
    return paths


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))

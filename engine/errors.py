"""The exceptions the runtime raises. Every one names the bad value and what is allowed."""

from __future__ import annotations


class SdTurboError(Exception):
    """Base class: anything this package raises on purpose."""


class InputError(SdTurboError, ValueError):
    """A request (prompt, size, steps, strength, latents, ...) is not valid."""


class BundleError(SdTurboError):
    """A bundle is missing, incomplete, corrupt, or of an unknown schema."""


class ModelChanged(BundleError):
    """A precision would be added to a bundle from a model other than, or changed since, the one it holds."""


class IntegrityError(BundleError):
    """A file's content does not match the sha256 recorded for it: changed or damaged since it was written."""


class EngineMissing(BundleError):
    """No engine was built for this library, device and shape (as opposed to a stale or broken one)."""


class EngineCorrupt(EngineMissing):
    """An engine file that fails its checksum: rebuilt like a missing one, never loaded."""


class BackendError(SdTurboError):
    """A backend is not installed, cannot run here, or failed."""


def export_extra_missing(what: str, e: ImportError, alternative: str = "") -> BackendError:
    """The one line for ``what`` (exporting, optimizing) run where the export extra is not installed, or one of
    its packages is there but does not import (another version than ours needs)."""
    from importlib.util import find_spec

    try:
        there = e.name is not None and find_spec(e.name.split(".")[0]) is not None
    except (ImportError, ValueError):
        there = False
    why = f"{e.name} is installed but does not import: {first_line(e)}" if there else f"{e.name} is missing"
    return BackendError(
        f"{what} needs the export extra: PyTorch, diffusers, onnx ({why}): pip install "
        f"'sdturbo[export]' (after the torch build for this machine: README, first lines){alternative}"
    )


class CaptureRefused(BackendError):
    """onnxruntime will not create a session for CUDA graphs: some of the graph runs off the CUDA provider
    through host copies (Memcpy nodes), which a captured graph would replay with stale values."""


FP32_REMEDY = "--precision fp32"  # how the fp32 graphs are asked for, where a backend has them


class NonFiniteOutput(SdTurboError):
    """The VAE decoder gave NaN or infinite values for some images of a request (an fp16 overflow, most
    often, in the UNet or the VAE): their pixels would be no image (black where NaN) with nothing to say so.
    Nothing is lost: ``images`` holds every image's pixels, [B, H, W, 3] uint8, as rounded, and ``bad`` the
    indices of the wrong ones; the others are good."""

    def __init__(self, images, bad: list[int], remedy: str | None = FP32_REMEDY):
        """``remedy``: how to run the fp32 graphs instead (None: they are what ran)."""
        self.images, self.bad, self.remedy = images, [int(i) for i in bad], remedy
        n, k = len(images), len(self.bad)
        which = "the image" if n == 1 else f"image{'s' * (k > 1)} {', '.join(map(str, self.bad))} of {n}"
        why = f"an fp16 overflow, most often; the fp32 graphs avoid it: {remedy}" if remedy else "with fp32 graphs"
        super().__init__(
            f"{which} came out of the VAE decoder with NaN or infinite values ({why}): "
            f"{'its pixels are' if k == 1 else 'their pixels are'} no image"
        )

    def alone(self, i: int) -> NonFiniteOutput:
        """Image ``i``'s error, as a request of that image alone would get it."""
        return NonFiniteOutput(self.images[i : i + 1], [0], self.remedy)


def first_line(e: BaseException) -> str:
    """``e``'s message in one line, for a status or a log line (onnxruntime's and CUDA's span several): its
    first non-empty line, else the exception's type."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)

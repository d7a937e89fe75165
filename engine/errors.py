"""The exceptions the runtime raises. Every one names the bad value and what is allowed."""


class SdTurboError(Exception):
    """Base class: anything this package raises on purpose."""


class InputError(SdTurboError, ValueError):
    """A request (prompt, size, steps, strength, latents, ...) is not valid."""


class BundleError(SdTurboError):
    """A bundle is missing, incomplete, corrupt, or of an unknown schema."""


class IntegrityError(BundleError):
    """A file's content does not match the sha256 recorded for it: changed or damaged since it was written."""


class EngineMissing(BundleError):
    """No engine was built for this library, device and shape (as opposed to a stale or broken one)."""


class EngineCorrupt(EngineMissing):
    """An engine file that fails its checksum: rebuilt like a missing one, never loaded."""


class BackendError(SdTurboError):
    """A backend is not installed, cannot run here, or failed."""


class CaptureRefused(BackendError):
    """onnxruntime will not create a session for CUDA graphs: some of the graph runs off the CUDA provider
    through host copies (Memcpy nodes), which a captured graph would replay with stale values."""


def first_line(e: BaseException) -> str:
    """``e``'s message in one line, for a status or a log line (onnxruntime's and CUDA's span several): its
    first non-empty line, else the exception's type."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)

"""The exceptions the runtime raises. Every one names the bad value and what is allowed."""


class SdTurboError(Exception):
    """Base class: anything this package raises on purpose."""


class InputError(SdTurboError, ValueError):
    """A request (prompt, size, steps, strength, latents, ...) is not valid."""


class BundleError(SdTurboError):
    """A bundle is missing, incomplete, corrupt, or of an unknown schema."""


class EngineMissing(BundleError):
    """No engine was built for this library, device and shape (as opposed to a stale or broken one)."""


class BackendError(SdTurboError):
    """A backend is not installed, cannot run here, or failed."""

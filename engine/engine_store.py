"""Where a bundle keeps TensorRT engines, and when one may be loaded.

    engines/<flavour>-<version>-<device>/<profile>/<component>.plan   the serialized engine
    engines/<flavour>-<version>-<device>/<profile>/<component>.json   its build record
    engines/<flavour>-<version>-<device>/timing.cache                 TensorRT's builder timing cache, reused
    engines/<flavour>-<version>-<device>/<profile>/<component>.runtime-cache   TensorRT-RTX's JIT kernels

An engine is keyed by everything it depends on: the ONNX's sha256, the library and its version, the
device (compute capability) and the shape profile. A record whose key differs from what is asked for
is stale: it is rebuilt, or the error says which part of the key changed. Never loaded. A plan whose
content does not match the sha256 in its record (damaged, even at the same size) is rebuilt like a missing
one (EngineCorrupt; hashed once per change, see integrity.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundle import Bundle
from .errors import BundleError, EngineCorrupt, EngineMissing, InputError, IntegrityError
from .integrity import verify
from .spec import axis_values


@dataclass(frozen=True)
class Profile:
    """Shape ranges an engine accepts: (min, opt, max) for batch and for each image side in pixels."""

    batch: tuple[int, int, int] = (1, 1, 1)
    height: tuple[int, int, int] = (512, 512, 512)
    width: tuple[int, int, int] = (512, 512, 512)

    @classmethod
    def parse(cls, batch: str = "1", size: str = "512x512") -> Profile:
        """``--batch 1`` or ``1-4``; ``--size 512x512`` (static) or ``256-1024`` (both sides in that range)."""
        b = _range(batch, "--batch")
        if "x" in size.lower():
            w, h = (_range(s, "--size") for s in size.lower().split("x", 1))
        else:
            w = h = _range(size, "--size")
        return cls(b, h, w)

    @property
    def static(self) -> bool:
        return all(lo == hi for lo, _, hi in (self.batch, self.height, self.width))

    @property
    def tag(self) -> str:
        def r(v):
            return str(v[0]) if v[0] == v[2] else f"{v[0]}-{v[2]}"

        return f"b{r(self.batch)}_{r(self.width)}x{r(self.height)}"

    def covers(self, batch: int, height: int, width: int) -> bool:
        return all(
            lo <= v <= hi for v, (lo, _, hi) in ((batch, self.batch), (height, self.height), (width, self.width))
        )

    def dims(self, which: int, scale: int) -> dict[str, int]:
        """Axis values for min (0), opt (1) or max (2)."""
        return axis_values(self.batch[which], self.height[which], self.width[which], scale)

    def check(self, bundle: Bundle) -> None:
        lim, f = bundle.limits, bundle.vae_scale_factor
        for name, (lo, opt, hi) in (("height", self.height), ("width", self.width)):
            if any(v % f for v in (lo, opt, hi)) or not lim.min_size <= lo <= opt <= hi <= lim.max_size:
                raise InputError(
                    f"{name} range {lo}-{hi} is not allowed; use multiples of {f} within {lim.min_size}-{lim.max_size}"
                )
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi <= lim.max_batch:
            raise InputError(f"batch range {lo}-{hi} is not allowed; use 1-{lim.max_batch}")


def _range(text: str, flag: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in str(text).split("-")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] < 1 or parts[0] > parts[1]:
        size = " (for each side; WIDTHxHEIGHT gives both)" if flag == "--size" else ""
        raise InputError(f"{flag} {text!r} is not N or MIN-MAX with 1 <= MIN <= MAX{size}")
    lo, hi = parts
    return (lo, lo, hi)  # optimise for the smallest: latency-critical callers run batch 1


def engine_dir(bundle: Bundle, flavour: str, version: str, device: str, profile: Profile) -> Path:
    return bundle.root / "engines" / f"{flavour}-{version}-{device}" / profile.tag


# Builder flags every engine of a flavour is built with; part of the key, so engines built without them are
# rebuilt. TensorRT-RTX needs REQUIRE_USER_ALLOCATION for CUDA stream capture (release notes 1.2).
BUILDER_FLAGS = {"tensorrt": (), "tensorrt-rtx": ("REQUIRE_USER_ALLOCATION",)}


def engine_key(bundle: Bundle, component: str, flavour: str, version: str, device: str, profile: Profile) -> dict:
    onnx = bundle.components.get("fp16", {}).get(component)  # (None: no fp16 graph to build it from)
    return {
        "component": component,
        "onnx_sha256": onnx.sha256 if onnx is not None else None,
        "library": flavour,
        "library_version": version,
        "device": device,
        "profile": asdict(profile),
        "builder_flags": list(BUILDER_FLAGS.get(flavour, ())),
    }


def stale_reason(record: dict, key: dict) -> str | None:
    """Why a build record does not match ``key`` (None when it matches)."""
    have = record.get("key", {})
    names = {
        "onnx_sha256": "the ONNX changed",
        "library_version": "another library version",
        "device": "another device",
        "profile": "another shape profile",
        "library": "another library",
        "builder_flags": "other builder flags",
    }
    for field, why in names.items():
        want, got = key.get(field), have.get(field)
        if field == "profile" and got is not None:
            got = {k: list(v) for k, v in got.items()}
            want = {k: list(v) for k, v in want.items()}
        if want != got:
            return f"{why} ({field}: engine has {got!r}, needed {want!r})"
    return None


def find_engine(bundle: Bundle, component: str, flavour: str, version: str, device: str, profile: Profile) -> Path:
    """The plan for ``component`` if one matches the key exactly; otherwise BundleError saying why not."""
    folder = engine_dir(bundle, flavour, version, device, profile)
    plan, record = folder / f"{component}.plan", folder / f"{component}.json"
    hint = f"run `sdturbo build {bundle.root}` with --batch/--size for this profile"
    if not plan.is_file() or not record.is_file():
        raise EngineMissing(f"no {flavour} {version} engine for {component} on {device}, profile {profile.tag}; {hint}")
    try:
        rec = json.loads(record.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{record} is corrupt ({e}); {hint}") from e
    why = stale_reason(rec, engine_key(bundle, component, flavour, version, device, profile))
    if why:
        raise BundleError(f"the {component} engine in {folder} is stale: {why}; {hint}")
    if "plan_sha256" not in rec:
        raise BundleError(f"the {component} engine in {folder} has no checksum (built by an older sdturbo); {hint}")
    if plan.stat().st_size != rec.get("plan_bytes"):
        raise EngineCorrupt(f"{plan} is {plan.stat().st_size} bytes, its record says {rec.get('plan_bytes')}")
    try:
        verify([plan], rec["plan_sha256"], f"the {component} engine")
    except IntegrityError as e:
        raise EngineCorrupt(str(e)) from e
    return plan


def built_profiles(bundle: Bundle, flavour: str, version: str, device: str) -> list[Profile]:
    """Profiles with a UNet engine for this library and device."""
    root = bundle.root / "engines" / f"{flavour}-{version}-{device}"
    out = []
    for record in sorted(root.glob("*/unet.json")):
        try:
            key = json.loads(record.read_text())["key"]["profile"]
        except (json.JSONDecodeError, KeyError):
            continue
        out.append(Profile(**{k: tuple(v) for k, v in key.items()}))
    return out


def select_profile(
    profiles: list[Profile], batch: int, height: int, width: int, any_batch: bool = False
) -> Profile | None:
    """The profile to serve a request with: an exact static one, else the narrowest range covering it.
    ``any_batch``: one that covers every batch from 1 to ``batch`` (a server batches what arrives)."""
    covering = [p for p in profiles if p.covers(batch, height, width) and (not any_batch or p.covers(1, height, width))]
    if not covering:
        return None

    def width_of(p: Profile) -> int:
        return sum(hi - lo for lo, _, hi in (p.batch, p.height, p.width))

    return min(covering, key=width_of)


def list_engines(bundle: Bundle) -> list[dict]:
    """Every build record in the bundle, with its plan's path; then each plan without a record (a build that did
    not finish, or a copy), as ``incomplete``."""
    out = []
    root = bundle.root / "engines"
    for record in sorted(root.glob("*/*/*.json")):
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            rec = {"corrupt": True}
        out.append({**(rec if isinstance(rec, dict) else {"corrupt": True}), "path": str(record.with_suffix(".plan"))})
    for plan in sorted(root.glob("*/*/*.plan")):
        if not plan.with_suffix(".json").is_file():
            out.append({"path": str(plan), "incomplete": True, "plan_bytes": plan.stat().st_size})
    return out

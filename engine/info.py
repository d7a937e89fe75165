"""``sdturbo info``: a readable summary of a bundle."""

from __future__ import annotations

from .bundle import Bundle
from .errors import BundleError


def describe(path) -> str:
    b = Bundle(path)
    m = b.manifest
    lines = [
        f"bundle     {b.root}",
        f"model      {b.model_id} (config {b.config_hash[:12]})",
        f"schema     {m['schema_version']}, written {m.get('created', '?')} by "
        + ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items()),
        f"scheduler  {m['scheduler'].get('_class_name', 'EulerDiscreteScheduler')} "
        f"({b.scheduler.timestep_spacing}, {b.scheduler.prediction_type})",
        f"limits     batch <= {b.limits.max_batch}, sides {b.limits.min_size}-{b.limits.max_size} px "
        f"(multiples of {b.vae_scale_factor})",
        "onnx:",
    ]
    for precision, comps in b.components.items():
        for name, comp in comps.items():
            try:
                b.component(precision, name)
                state = "ok"
            except BundleError as e:
                state = f"BROKEN: {e}"
            ins = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in comp.spec.inputs)
            lines.append(f"  {precision:5} {name:13} {comp.bytes / 1e6:9.1f} MB  {ins}  [{state}]")
    return "\n".join(lines)

"""Benchmark output: where it goes, a markdown table on stdout, results.json, and a plot."""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

from ..engine.errors import InputError
from ..engine.files import atomic_write
from . import modes

RESULTS = Path("benchmarks/results")  # where runs without --out go, relative to the working directory


def new_results_folder(parent: Path = RESULTS) -> Path:
    """A folder no earlier run has used, named by the UTC time it starts (``run-20261124-020304``, then ``-2``...):
    a run without ``--out`` never overwrites, or mixes its images with, the results of another."""
    stamp = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise InputError(f"{parent / stamp}: 999 folders of that name exist already; give --out")


def results_folder(out: str) -> Path:
    """The folder ``--out`` names (made if missing; "": a new one, ``new_results_folder``), before anything runs;
    InputError naming it where it is a file or cannot be made (a read-only working directory, say)."""
    path = Path(out) if out else RESULTS
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a folder; give --out a folder for the results")
    try:
        if not out:
            return new_results_folder(path)
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # an existing folder that cannot be written: now, not at the end
    except OSError as e:
        where = "" if out else " (without --out: under the working directory)"
        raise InputError(f"{path} cannot be written{where} ({e.strerror}); give --out a folder you can write") from e
    return path


FAMILY_NAMES = {"sd-turbo": "SD-Turbo", "sdxl-turbo": "SDXL-Turbo"}  # (results before "family": SD-Turbo's)


def markdown(results: dict) -> str:
    cfg, m = results["config"], results["machine"]
    where = m.get("gpu") or f"{m.get('cpu')} ({m.get('cores')} cores)"
    family = FAMILY_NAMES.get(results.get("family"), "SD-Turbo")
    lines = [
        f"{family} `{cfg['model']}`, {cfg['width']}x{cfg['height']}, {cfg['steps']} step(s), batch {cfg['batch']}, "
        f"{cfg['runs']} runs after {cfg['warmup']} warm-up; {m['device']}: {where}",
        f"machine: {results['rates']['matmul_tflops']:.2f} TFLOP/s {results['rates']['matmul_dtype']} matmul, "
        f"{results['rates']['copy_gbps']:.1f} GB/s copy; reference: {results['reference']}",
        "",
        "| contender | e2e median ms | p90 | p99 | speedup | text enc ms | UNet/step ms | VAE dec ms | sched+other ms "
        "| e2e / floor | load s | cold start s | peak MB (at start) | PSNR vs ref dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = [r for r in results["contenders"] if r.get("mode", modes.FULL) == modes.FULL]  # modes: apart
    for r in full:
        e, s = r["e2e_ms"], r["stages_ms"]
        cold = r.get("cold_start", {})
        cold = f"{cold['process_s']:.2f}" if "process_s" in cold else "failed" if "error" in cold else "-"
        start = r.get("memory_at_start_mb")
        lines.append(
            f"| {r['name']} | {e['median']:.1f} | {e['p90']:.1f} | {e['p99']:.1f} | {r['speedup_vs_reference']:.2f}x "
            f"| {s['text_encoder']:.1f} | {s['unet_per_step']:.1f} | {s['vae_decoder']:.1f} "
            f"| {s['scheduler'] + s['other']:.1f} | {r['over_floor']['end_to_end']:.1f}x | {r['load_s']:.2f} "
            f"| {cold} | {r['peak_memory_mb']:.0f}{'' if start is None else f' ({start:.0f})'} "
            f"| {_db(r['psnr_vs_reference_db'])} |"
        )
    for f in results.get("failed", []):
        lines.append(f"| {f['name']} | failed: {f['error'].splitlines()[0][:200]} |" + " |" * 12)
    eager = [r["name"] for r in full if "eager_total" in r["stages_ms"]]
    lines += [
        "",
        "Stages: those of the median run (they add up to its time)"
        + (
            f"; {', '.join(eager)}: from the median of eager runs apart (CUDA events between the stages; "
            "`eager_total` in the JSON), while the e2e columns time the CUDA graph; sched+other there is the "
            "scheduler's and the uint8 kernels: the tokenizer, the copies and the host wait are in no stage"
            if eager
            else ""
        )
        + ". Peak MB: load and latency runs (not the throughput sweep); on a CPU the process's high-water, which "
        "includes what it held at the start (imports, earlier contenders' leftovers).",
    ]
    colds = [f"{r['name']}: {r['cold_start']['error']}" for r in full if "error" in r.get("cold_start", {})]
    if colds:
        lines += ["", "cold start failed: " + "; ".join(colds)]
    graphs = [f"{r['name']}: {r['cuda_graph']}" for r in results["contenders"] if r.get("cuda_graph")]
    if graphs:
        lines += ["", "CUDA graph: " + "; ".join(graphs)]
    demo = [(r["name"], r.get("vs_onnxruntime_demo")) for r in results["contenders"]]
    demo = [f"{name}: {ratio:.2f}x" for name, ratio in demo if ratio]
    if demo:
        lines += ["", "against ONNX Runtime's own pipeline (its e2e median / ours): " + "; ".join(demo)]
    floor = results["contenders"][0]["floor_ms"]
    lines += [
        "",
        "floors (ms, max of FLOPs / matmul rate and weights / copy bandwidth): "
        + ", ".join(f"{k} {v:.2f}" for k, v in floor.items()),
    ]
    tp = []
    for r in results["contenders"]:  # TensorRT's sweep runs on engines of their own: their profile is named
        name = r["name"] + (f" (engines {r['throughput_profile']})" if r.get("throughput_profile") else "")
        tp += [(name, t["batch"], t["images_per_s"], t.get("error")) for t in r["throughput"]]
    if tp:
        lines += ["", "| contender | batch | images/s |", "|---|---|---|"]
        lines += [f"| {n} | {b} | {_rate(v, err)} |" for n, b, v, err in tp]
    flops = results.get("flops", {}).get("tiny_vae_decoder")
    if flops:
        lines += ["", f"tiny VAE decoder: {flops['flops'] / 1e9:.1f} GFLOP, {flops['params'] / 1e6:.2f} M parameters"]
    return "\n".join(lines) + modes.markdown(results)


def _rate(images_per_s, error) -> str:
    return f"failed: {(error or 'no time')[:120]}" if images_per_s is None else f"{images_per_s:.2f}"


def _db(value) -> str:
    return "identical" if value is None else f"{value:.1f}"


def write(results: dict, out: Path) -> list[Path]:
    """Each file whole or not at all (a temporary name, then a rename): a run stopped while writing leaves the
    last run's results, never half of them."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "latency.png"]
    atomic_write(paths[0], json.dumps(results, indent=2))
    atomic_write(paths[1], markdown(results) + "\n")
    plot(results, paths[2])
    return paths


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = results["contenders"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [c["name"] for c in cs]
    bottom = [0.0] * len(cs)
    steps = results["config"]["steps"]
    for stage, label in (
        ("text_encoder", "text encoder"),
        ("unet", f"UNet x{steps}"),
        ("vae_decoder", "VAE decoder"),
        ("scheduler", "scheduler"),
        ("other", "other"),
    ):
        vals = [max(c["stages_ms"][stage], 0.0) for c in cs]
        ax1.barh(names, vals, left=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax1.set_xlabel("ms (median run)")
    ax1.set_title("latency per stage")
    ax1.legend(fontsize=8)
    for c in cs:
        pts = [(t["batch"], t["images_per_s"]) for t in c["throughput"] if t["images_per_s"]]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker="o", label=c["name"])
    ax2.set_xticks(sorted({t["batch"] for c in cs for t in c["throughput"]}))
    ax2.set_xlabel("batch")
    ax2.set_ylabel("images / s")
    ax2.set_title("throughput")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())

"""The opt-in modes beyond the reference path (`sdturbo bench --modes tiny-vae,prompt-cache`), each run by this
engine and by diffusers doing the same thing, and reported apart from the full-VAE comparison:

- ``tiny-vae``: ``generate --vae tiny`` against diffusers given ``vae=AutoencoderTiny`` of the same weights;
- ``prompt-cache``: every timed request a prompt-cache hit (the warm-up run fills the cache) against diffusers
  given ``prompt_embeds`` computed once (in its warm-up run).

A mode's contenders are named like the default ones with the mode's variant: ``sdturbo-<backend>-tiny-<precision>``
and ``diffusers-<dtype>-tiny`` (``-cached`` / ``-embeds`` for the prompt cache). Each is compared with its own
mode's diffusers contender (``speedup_vs_reference``, PSNR) and, for the issue's targets, with diffusers'
full-VAE pipeline (``vs_full_reference``).
"""

from __future__ import annotations

import time

import numpy as np

CACHED_WARMUP = 2  # prompt-cache contenders: a miss fills the cache, then a hit's first run (its graph's capture)
MODES = {  # mode -> (our variant, diffusers' variant)
    "tiny-vae": ("tiny", "tiny"),
    "prompt-cache": ("cached", "embeds"),
}
FULL = "full"


def check(modes: tuple[str, ...]) -> tuple[str, ...]:
    from sdturbo.engine.errors import InputError

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise InputError(f"--modes {','.join(bad)} is not allowed; use any of {', '.join(MODES)}")
    return modes


def contenders(modes: tuple[str, ...], names: list[str]) -> list[str]:
    """The contenders of ``modes``, derived from the default ones in ``names``: diffusers' first (eager) one and
    each of ours on its default graphs."""
    from .contenders import parse_ours

    reference = next((n for n in names if n.startswith("diffusers-") and not n.endswith("-compile")), None)
    ours = [n for n in names if n.startswith("sdturbo-") and parse_ours(n)[1] == ""]
    out = []
    for mode in check(modes):
        variant, diffusers_variant = MODES[mode]
        if reference:
            out.append(f"{reference}-{diffusers_variant}")
        for n in ours:
            rest, precision = n.rsplit("-", 1)
            out.append(f"{rest}-{variant}-{precision}")
    return out


def mode_of(name: str) -> str:
    """The mode a contender belongs to, from its name; "full" for the default comparison."""
    for mode, variants in MODES.items():
        ours = name.startswith("sdturbo-") and f"-{variants[0]}-" in name
        if ours or (name.startswith("diffusers-") and name.endswith(f"-{variants[1]}")):
            return mode
    return FULL


def summary(results: list[dict]) -> dict:
    """Per mode: its reference, and what the issue's targets ask (vs diffusers' full-VAE pipeline; the time a
    prompt-cache hit saves against the text encoder's stage)."""
    full_ref = next((r for r in results if r["mode"] == FULL and r["name"].startswith("diffusers-")), None)
    out = {}
    for mode in sorted({r["mode"] for r in results} - {FULL}):
        rows = [r for r in results if r["mode"] == mode]
        entry = {"reference": rows[0]["reference"], "contenders": [r["name"] for r in rows]}
        if mode == "prompt-cache":
            saved = {}
            for r in rows:
                default = _default_of(r["name"], results)
                if default is not None:
                    saved[r["name"]] = {
                        "saved_ms": default["e2e_ms"]["median"] - r["e2e_ms"]["median"],
                        "text_encoder_ms": default["stages_ms"]["text_encoder"],
                        "vs": default["name"],
                    }
            entry["saved"] = saved
        if full_ref is not None:
            entry["full_reference"] = full_ref["name"]
        out[mode] = entry
    return out


def _default_of(name: str, results: list[dict]) -> dict | None:
    """The default-mode contender ``name`` is a variant of (diffusers-fp32-embeds -> diffusers-fp32)."""
    mode = mode_of(name)
    ours, theirs = MODES[mode]
    base = name.removesuffix(f"-{theirs}") if name.startswith("diffusers-") else name.replace(f"-{ours}-", "-")
    return next((r for r in results if r["name"] == base), None)


def markdown(results: dict) -> str:
    """One table per mode, apart from the full-VAE comparison, then the paired measurements."""
    rows = results["contenders"]
    lines = []
    for mode, entry in results.get("modes", {}).items():
        lines += [
            "",
            f"**{mode}** (reported apart; reference: {entry['reference']}; "
            f"'vs full' is against {entry.get('full_reference', '-')}, diffusers' default pipeline)",
            "",
            "| contender | e2e median ms | speedup vs mode reference | vs full | text enc ms | UNet/step ms "
            "| VAE dec ms | PSNR vs mode ref dB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["mode"] == mode):
            s, full = r["stages_ms"], r.get("vs_full_reference")
            psnr = "identical" if r["psnr_vs_reference_db"] is None else f"{r['psnr_vs_reference_db']:.1f}"
            lines.append(
                f"| {r['name']} | {r['e2e_ms']['median']:.1f} | {r['speedup_vs_reference']:.2f}x "
                f"| {'-' if full is None else f'{1 / full:.3f}x time'} | {s['text_encoder']:.1f} "
                f"| {s['unet_per_step']:.1f} | {s['vae_decoder']:.1f} | {psnr} |"
            )
        for name, v in entry.get("saved", {}).items():
            lines.append(
                f"\n{name}: a hit saves {v['saved_ms']:.1f} ms against {v['vs']} "
                f"(its text encoder stage: {v['text_encoder_ms']:.1f} ms)"
            )
    return "\n".join(lines) + paired_markdown(results)


def compare(results: list[dict], references: dict[str, str]) -> None:
    """Each result's mode, its mode's reference, its speedup against that reference (the first contender of
    its mode) and, when diffusers' full-VAE pipeline ran, against it (``vs_full_reference``)."""
    medians = {r["name"]: r["e2e_ms"]["median"] for r in results}
    full = references.get(FULL)
    full = full if full is not None and full.startswith("diffusers-") else None
    for r in results:
        r["mode"] = mode = mode_of(r["name"])
        r["reference"] = references[mode]
        r["speedup_vs_reference"] = medians[references[mode]] / r["e2e_ms"]["median"]
        if mode != FULL and full is not None:
            r["vs_full_reference"] = medians[full] / r["e2e_ms"]["median"]


def floors_for(name: str, floors: dict[str, float], steps: int) -> dict[str, float]:
    """The floors of ``name``'s mode: the tiny decoder's in place of the VAE's; no text encoder on a cache hit."""
    mode = mode_of(name)
    f = dict(floors)
    if mode == "tiny-vae":
        f["vae_decoder"] = floors["tiny_vae_decoder"]
    if mode == "prompt-cache":
        f["text_encoder"] = 0.0
    f["end_to_end"] = f["text_encoder"] + steps * f["unet_step"] + f["vae_decoder"]
    return f


def tiny_vae_folder(bundle_path) -> str:
    """The AutoencoderTiny folder the bundle's tiny VAE was exported from (for diffusers + AutoencoderTiny)."""
    from sdturbo.engine.bundle import Bundle
    from sdturbo.export.tiny_vae import resolve_tiny_vae_folder

    return str(resolve_tiny_vae_folder(Bundle(bundle_path).tiny_vae.source))


def paired(modes: tuple[str, ...], names: list[str], build, shape, call, runs: int, sync=lambda: None) -> dict:
    """Each mode's target measured in pairs, so that a machine whose load changes between contenders (a shared
    CPU) weighs on both sides alike:

    - tiny-vae: our tiny-VAE contender and diffusers + AutoencoderTiny loaded together and run in turn (the
      order alternating), ``runs`` times each: the median of the per-pair ratios; then the same against
      diffusers' default (full-VAE) pipeline;
    - prompt-cache: our cached contender running a miss (a prompt it has not seen) and a hit in turn: the
      median time a hit saves end to end, and in the one step that differs (the host pipeline's
      ``encode_prompts``: tokenizer, then the cache or the text encoders), next to the misses' text encoder stage.

    ``build(name, timer)`` makes a contender; ``call(contender, suffix)`` runs one request, its prompts with
    ``suffix`` appended (None: as they are)."""
    from .contenders import Diffusers
    from .timers import SETTLE_S, StageTimer

    def load(c):
        c.load() if isinstance(c, Diffusers) else c.load(shape)
        return c

    def timed(c, suffix, timer=None) -> float:
        if timer is not None:
            timer.reset()
        sync()
        time.sleep(SETTLE_S)  # the run before, the other contender's perhaps, lets go of the cores first
        t = time.perf_counter()
        call(c, suffix)
        sync()
        return 1e3 * (time.perf_counter() - t)

    def alternate(a: str, b: str) -> dict:
        """``a`` and ``b`` loaded together and run in turn, the order alternating; two at most in memory."""
        pair = {a: load(build(a, StageTimer())), b: load(build(b, StageTimer()))}
        ms = {a: [], b: []}
        for c in pair.values():
            timed(c, None)  # warm-up
        for i in range(runs):
            for name in (a, b) if i % 2 == 0 else (b, a):
                ms[name].append(timed(pair[name], None))
        for c in pair.values():
            c.close()
        ratios = [x / y for x, y in zip(ms[a], ms[b], strict=True)]
        return {"ms": ms, "ours_over_theirs_median": float(np.median(ratios))}

    out = {}
    for mode in modes:
        ours = [n for n in names if n.startswith("sdturbo-") and mode_of(n) == mode]
        theirs = [n for n in names if n.startswith("diffusers-") and mode_of(n) == mode]
        if mode == "tiny-vae" and ours and theirs:
            full = next((n for n in names if n.startswith("diffusers-") and mode_of(n) == FULL), None)
            out[mode] = {"ours": ours[0], "theirs": theirs[0], **alternate(ours[0], theirs[0])}
            if full is not None:  # the other target: against diffusers' default pipeline, in pairs too
                vs_full = alternate(ours[0], full)
                out[mode]["full"] = full
                out[mode]["vs_full"] = {
                    "ms": vs_full["ms"],
                    "ours_over_full_median": vs_full["ours_over_theirs_median"],
                }
        if mode == "prompt-cache" and ours:
            timer = StageTimer()
            c = load(build(ours[0], timer))
            encode = _time_encode_prompts(c.pipe)  # host pipelines: [ms] of each encode_prompts call
            for _ in range(CACHED_WARMUP):  # warm-up: a miss caches the request's prompts, then a hit
                timed(c, None)
            runs_of = {"miss": [], "hit": [], "encode_miss": [], "encode_hit": [], "text_encoder": []}
            for i in range(runs):
                for kind in ("miss", "hit") if i % 2 == 0 else ("hit", "miss"):
                    suffix = None if kind == "hit" else f"(request {i})"  # a prompt not seen before: a miss
                    runs_of[kind].append(timed(c, suffix, timer))
                    stages = timer.resolve()  # (none for a device pipeline: one CUDA graph, its stages not timed)
                    if kind == "miss" and "text_encoder" in stages:
                        runs_of["text_encoder"].append(stages["text_encoder"])
                    if encode:
                        runs_of[f"encode_{kind}"].append(encode[-1])
            c.close()
            med = {k: float(np.median(v)) if v else None for k, v in runs_of.items()}
            pairs = zip(runs_of["miss"], runs_of["hit"], strict=True)
            out[mode] = {
                "ours": ours[0],
                "ms": runs_of,
                "saved_ms_median": float(np.median([m - h for m, h in pairs])),
                "encode_saved_ms_median": med["encode_miss"] - med["encode_hit"] if encode else None,
                "text_encoder_ms_median": med["text_encoder"],
            }
    return out


def _time_encode_prompts(pipe) -> list[float] | None:
    """Time every ``encode_prompts`` call of a host pipeline from now on (None for the device pipelines)."""
    if not hasattr(pipe, "encode_prompts"):
        return None
    times, original = [], pipe.encode_prompts

    def encode_prompts(req):
        t = time.perf_counter()
        out = original(req)
        times.append(1e3 * (time.perf_counter() - t))
        return out

    pipe.encode_prompts = encode_prompts
    return times


def paired_markdown(results: dict) -> str:
    p = results.get("paired", {})
    lines = []
    if "tiny-vae" in p:
        t = p["tiny-vae"]
        med = {k: float(np.median(v)) for k, v in t["ms"].items()}
        lines.append(
            f"\ntiny-vae, run in turn ({len(t['ms'][t['ours']])} pairs): {t['ours']} {med[t['ours']]:.1f} ms, "
            f"{t['theirs']} {med[t['theirs']]:.1f} ms; ours / theirs per pair, median: "
            f"{t['ours_over_theirs_median']:.3f}"
        )
        if "vs_full" in t:
            ms = t["vs_full"]["ms"]
            lines.append(
                f"\ntiny-vae against {t['full']}, run in turn: {t['ours']} {np.median(ms[t['ours']]):.1f} ms, "
                f"{t['full']} {np.median(ms[t['full']]):.1f} ms; ours / theirs per pair, median: "
                f"{t['vs_full']['ours_over_full_median']:.3f}"
            )
    if "prompt-cache" in p:
        c = p["prompt-cache"]
        encode = c.get("encode_saved_ms_median")
        lines.append(
            f"\nprompt-cache, miss and hit in turn ({len(c['ms']['hit'])} pairs) in {c['ours']}: a hit saves "
            f"{c['saved_ms_median']:.1f} ms end to end (median per pair)"
            + ("" if encode is None else f", {encode:.1f} ms in encode_prompts (medians)")
            + (
                "; the misses' text encoder stage: not timed inside a CUDA graph (the table's text enc column has it "
                "from eager runs)"
                if c["text_encoder_ms_median"] is None
                else f"; the misses' text encoder stage: {c['text_encoder_ms_median']:.1f} ms (median)"
            )
        )
    return "\n".join(lines)

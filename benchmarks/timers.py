"""Stage timers: host clocks on a CPU, CUDA events on a GPU (resolved once per run, after the sync)."""

from __future__ import annotations

import time
from collections import defaultdict

# Between two timed runs that must not slow each other: the one before may leave worker threads spinning a while
# (torch's OpenMP threads, onnxruntime's on a GPU session), which on few cores slows a run that follows at once
# (measured on 2 cores: diffusers right after onnxruntime with its spinning on, 32 -> 142 ms; after 0.2 s, 36 ms).
SETTLE_S = 0.2


class StageTimer:
    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self._open: dict[str, object] = {}
        self._pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = defaultdict(float)  # ms, summed over a run
        self.counts: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self._open.clear()
        self._pending.clear()
        self.totals.clear()
        self.counts.clear()

    def start(self, name: str) -> None:
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open[name] = ev
        else:
            self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        begin = self._open.pop(name)
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((name, begin, end))
        else:
            self.totals[name] += 1e3 * (time.perf_counter() - begin)
        self.counts[name] += 1

    def resolve(self) -> dict[str, float]:
        """Per-stage ms for the run (call after the run has synchronised)."""
        for name, begin, end in self._pending:
            self.totals[name] += begin.elapsed_time(end)
        self._pending.clear()
        return dict(self.totals)


class TimedStage:
    """Wraps one of our pipeline's stages so each call is timed under ``name``."""

    def __init__(self, stage, name: str, timer: StageTimer):
        self._stage, self._name, self._timer = stage, name, timer

    def __call__(self, **inputs):
        self._timer.start(self._name)
        try:
            return self._stage(**inputs)
        finally:
            self._timer.stop(self._name)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))

"""Peak resident memory of this process over a span of work (Linux: VmHWM, reset through clear_refs)."""

from __future__ import annotations

import resource
from pathlib import Path


class PeakRss:
    """Starts a measuring span; ``peak_mb()`` is the high-water RSS since then (or since start, elsewhere)."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current RSS
            self._proc = True
        except OSError:
            self._proc = False

    @property
    def resets(self) -> bool:
        """True where the span's peak starts from the current RSS (Linux); elsewhere it is the process's own."""
        return self._proc

    def peak_mb(self) -> int:
        if self._proc:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

"""How much a piece of work raises a process's anonymous memory, measured from outside that process.

A sampler thread inside the process cannot see a peak that a C call makes while it holds the GIL (protobuf
serializing or parsing a whole model: measured here, a 5x peak unseen from inside), and what earlier work left in
the heap moves the rise either way. So the work runs in a fresh process (``spawn``) and this one reads its
/proc/PID/status every millisecond meanwhile.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import onnx
import pytest

SAMPLE_SECONDS = 0.001


def anon_mb(pid: int | str = "self") -> int | None:
    """RssAnon of process ``pid`` in MB (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def _worker(setup, args, conn) -> None:
    work = setup(*args)  # imports and warm-up: before the span that counts
    conn.send("ready")
    conn.recv()
    conn.send(work())


def anon_rise(setup, *args, timeout: float = 600) -> tuple[int, int, object]:
    """``setup(*args)`` (a module-level function) runs in a fresh process and returns a callable; that
    callable's run is measured. Returns (rise in MB over the memory before it, that memory, what it returned)."""
    if anon_mb() is None:
        pytest.skip("no /proc/PID/status here to read a process's anonymous memory from")
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    worker = ctx.Process(target=_worker, args=(setup, args, child))
    worker.start()
    child.close()  # (the worker's end: if it dies, recv() ends instead of waiting)
    try:
        if not conn.poll(timeout):
            worker.kill()
            worker.join()
            pytest.fail(f"the measured process's setup did not finish in {timeout} s")
        assert conn.recv() == "ready"
        before = peak = anon_mb(worker.pid)
        conn.send("go")
        while not conn.poll(SAMPLE_SECONDS):
            peak = max(peak, anon_mb(worker.pid) or 0)
        result = conn.recv()
    except EOFError:
        worker.kill()
        worker.join()
        pytest.fail(f"the measured process ended without a result (exit code {worker.exitcode}; its error above)")
    worker.join()
    return peak - before, before, result


def with_big_convs(model: onnx.ModelProto, size: int, n: int) -> onnx.ModelProto:
    """The UNet ``model`` with ``n`` more Convs of ``size`` bytes of fp32 weights in all, each applied to the latents
    and reduced to its largest value, their sum times zero added to its output (the same function)."""
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{out}_before" if o == out else o for o in node.output]
    sample = model.graph.input[0]  # the latents: their symbolic height and width go through the Convs
    assert sample.name == "sample", sample.name
    channels, side = sample.type.tensor_type.shape.dim[1].dim_value, 16
    init = model.graph.initializer
    init.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    for i in range(n):
        weight = np.full((size // n // (4 * channels * side * side), channels, side, side), 1e-3 * (i + 1), np.float32)
        init.append(onnx.numpy_helper.from_array(weight, f"big{i}"))
        pads = [side // 2, side // 2, side // 2 - 1, side // 2 - 1]  # the same size out
        model.graph.node.append(onnx.helper.make_node("Conv", ["sample", f"big{i}"], [f"big{i}_conv"], pads=pads))
        model.graph.node.append(onnx.helper.make_node("ReduceMax", [f"big{i}_conv"], [f"big{i}_max"], keepdims=0))
    model.graph.node.extend(
        [
            onnx.helper.make_node("Sum", [f"big{i}_max" for i in range(n)], ["big_sum"]),
            onnx.helper.make_node("Mul", ["big_sum", "zero"], ["big_zero"]),
            onnx.helper.make_node("Add", [f"{out}_before", "big_zero"], [out]),
        ]
    )
    return model

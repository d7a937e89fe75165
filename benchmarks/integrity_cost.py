"""What the content check costs: sha256 time per component of a bundle, and the stamped check after it.

python -m sdturbo.benchmarks.integrity_cost BUNDLE [--precision fp16]
"""

from __future__ import annotations

import argparse
import time

from ..engine.bundle import Bundle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--precision", default="fp16")
    args = p.parse_args(argv)
    b = Bundle(args.bundle)
    total_bytes = total_s = 0.0
    print("| component | GB | hash s | GB/s |\n|---|---|---|---|")
    for name in b.component_names:
        comp = b.components[args.precision][name]
        start = time.perf_counter()
        b.component(args.precision, name, rehash=True)
        seconds = time.perf_counter() - start
        total_bytes, total_s = total_bytes + comp.bytes, total_s + seconds
        print(f"| {name} | {comp.bytes / 1e9:.3f} | {seconds:.2f} | {comp.bytes / 1e9 / seconds:.2f} |")
    print(f"| all | {total_bytes / 1e9:.3f} | {total_s:.2f} | {total_bytes / 1e9 / total_s:.2f} |")
    start = time.perf_counter()
    for name in b.component_names:
        b.component(args.precision, name)
    print(f"\nstamped check of {len(b.component_names)} components: {1e3 * (time.perf_counter() - start):.2f} ms")


if __name__ == "__main__":
    main()

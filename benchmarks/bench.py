"""`make bench`: speed ratios measured in one run, printed as one table.

Each benchmark module in this folder exposes `rows() -> list[Row]`; this
script runs them in order and prints every row. Ratios, not seconds: a ratio
of two timings taken back to back on the same machine survives a change of
machine, a seconds figure does not.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Benchmark modules, in the order their rows print.
MODULES = ["bench_foundation", "bench_scale", "bench_onnx", "bench_lth", "bench_kmeans", "bench_vgg",
           "bench_any_network"]


@dataclass
class Row:
    name: str
    ratio: float
    target: str  # e.g. ">= 1.0x"
    detail: str  # the timings behind the ratio

    def passed(self) -> bool:
        op, value = self.target.split()[0], float(self.target.split()[1].rstrip("x%s"))
        return self.ratio >= value if op == ">=" else self.ratio <= value


def best_of(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` timings of fn(): the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# glibc's thresholds for mapping a block of its own and for giving freed memory back to the
# system, fixed high: a large batch's pass then reuses its heap (bench_scale's allocator_rows).
MMAP_THRESHOLD, TRIM_THRESHOLD = 128 << 20, 256 << 20


def fix_mmap_threshold() -> bool:
    """glibc only: those thresholds from now on, in this process, so a large-batch reading times
    the network, not the page faults of memory mapped anew."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers in malloc.h
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))


def main() -> int:
    only = sys.argv[1:]
    rows: list[Row] = []
    for name in MODULES:
        if only and name not in only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += importlib.import_module(name).rows()
    width = max(len(r.name) for r in rows)
    print(f"\n{'benchmark':{width}}  {'ratio':>8}  {'target':>9}  ok   detail")
    for r in rows:
        print(f"{r.name:{width}}  {r.ratio:8.3f}  {r.target:>9}  {'yes' if r.passed() else 'NO ':3}  {r.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

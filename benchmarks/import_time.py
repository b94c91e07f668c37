"""What a command costs before it does anything: start-up time of `cir` commands against `import torch`.

    python benchmarks/import_time.py              # 5 runs of each, median
    python benchmarks/import_time.py --runs 9

Every row runs in a fresh interpreter (``python -X importtime`` would time one process only, and
the operating system's file cache is warm after the first run of any row, so the first run of each
is discarded). ``--help`` rows are what a user sees first; ``import cir.X`` rows are what the
command loads before it reads its arguments, the cost of every real run. The goal of issue 28:
``cir compare --help`` and ``cir data --help`` within 1.5x of ``import torch``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

ROWS: list[tuple[str, list[str]]] = [
    ("import torch", ["-c", "import torch"]),
    ("cir --help", ["-m", "cir", "--help"]),
    ("cir compare --help", ["-m", "cir", "compare", "--help"]),
    ("cir data --help", ["-m", "cir", "data", "--help"]),
    ("cir serve --help", ["-m", "cir", "serve", "--help"]),
    ("import cir.compare", ["-c", "import cir.compare"]),
    ("import cir.data", ["-c", "import cir.data"]),
    ("import lightning_modules", ["-c", "import lightning_modules"]),
    ("lightning_modules.ProCIR", ["-c", "import lightning_modules; lightning_modules.ProCIR"]),
    ("import lightning", ["-c", "import lightning.pytorch"]),
]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"median of {args.runs} runs after one discarded\n")
    times = {}
    for label, argv in ROWS:
        timed(argv)
        times[label] = statistics.median(timed(argv) for _ in range(args.runs))
    torch_s = times["import torch"]
    print("| what | seconds | × import torch |")
    print("|---|---:|---:|")
    for label, _ in ROWS:
        print(f"| `{label}` | {times[label]:.2f} | {times[label] / torch_s:.2f} |")


if __name__ == "__main__":
    main()

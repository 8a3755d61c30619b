"""Runs every benchmark in its own process (`make bench`); results go to stdout.

Each benchmark prints its own numbers; copy them into docs/PERFORMANCE.md with the
command and the machine.
"""

import subprocess
import sys

BENCHMARKS = (
    "bench.bench_partition",
    "bench.bench_backbone_load",
    "bench.bench_personalization",
    "bench.bench_train_step",
    "bench.bench_generate",
    "bench.bench_round",
    "bench.bench_workers",
)


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"== python -m {module}", flush=True)
        if subprocess.call([sys.executable, "-m", module]) != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

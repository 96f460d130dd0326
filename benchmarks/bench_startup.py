"""Start-up latency: ``import scimpute_dask`` and ``scimpute-dask --help``, each in a fresh
interpreter (the median of several), and which heavy libraries each loads.

    python benchmarks/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("dask", "distributed", "zarr", "numba", "matplotlib", "pandas", "sklearn", "anndata",
         "numpy")
PROBE = "import sys; {code}; print(sorted(m for m in {heavy!r} if m in sys.modules))"


def _time(code: str, repeat: int) -> tuple[float, str]:
    times, loaded = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)],
                              capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - start)
        loaded = done.stdout.strip().splitlines()[-1]  # --help prints its usage first
    return statistics.median(times), loaded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    bare, _ = _time("pass", args.repeat)
    cases = {
        "python -c pass": "pass",
        "import scimpute_dask": "import scimpute_dask",
        "scimpute-dask --help": ("from scimpute_dask.cli import main\n"
                                 "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"),
    }
    for name, code in cases.items():
        seconds, loaded = _time(f"exec({code!r})", args.repeat)
        print(f"{name:<24} {seconds:6.3f} s  ({seconds - bare:+.3f} s over a bare interpreter)"
              f"  heavy modules loaded: {loaded}")


if __name__ == "__main__":
    main()

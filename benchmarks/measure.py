"""What the benchmarks share: data generated in a child process, and a run measured from
outside (its peak RSS per stage, and the disk it took).

Each benchmark is a script (``python benchmarks/NAME.py``), so this module is
imported from the scripts' own folder.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

#: Log lines (``--verbose``) that open a stage, and the stage they open.
STAGE_LINES = (("finding", "knn"), ("imputing", "impute"), ("scoring", "score"),
               ("exporting", "export"))


def in_child(target, *args) -> None:
    """``target(*args)`` in a fresh process: Linux carries a parent's high-water RSS into
    an exec'd child, so the measuring process must stay small."""
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"data generation failed ({proc.exitcode})")


def run_sampled(cmd: list[str], disk: Path | None = None
                ) -> tuple[float, dict[str, float], float]:
    """Run ``cmd`` (a ``--verbose`` run); its ``ru_maxrss`` and the peak RSS sampled every
    0.2 s within each logged stage (MiB), and the most disk it took on ``disk``'s file
    system (GiB: the drop of the free space below what it was at the start)."""
    free = (lambda: os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize) if disk \
        else (lambda: 0)
    start_free, least_free = free(), free()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage = ["convert"]
    peaks: dict[str, float] = {}
    tail: list[str] = []

    def follow() -> None:
        for line in proc.stderr:
            tail[:] = [*tail[-20:], line]
            for word, name in STAGE_LINES:
                if re.search(rf"\b{word}\b", line):
                    stage[0] = name

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    status_file = Path(f"/proc/{proc.pid}/status")
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = int(re.search(r"VmRSS:\s+(\d+)", status_file.read_text()).group(1)) / 1024
        except (OSError, AttributeError):
            rss = 0.0
        peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss)
        least_free = min(least_free, free())
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    if proc.returncode:
        sys.stderr.write("".join(tail))
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss / 1024, peaks, (start_free - least_free) / 2**30

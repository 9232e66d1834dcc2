"""Helper of the multi-process tests: start one Python process per rank, wait for all of them,
and fail with every rank's log tail if any did not exit cleanly."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence


def run_ranks(script: Path, args: Sequence[str], rank_envs: Sequence[dict[str, str]], timeout: float) -> list[str]:
    """Run ``python script *args`` once per entry of ``rank_envs`` (each added to this process's
    environment), all at once. A rank still running after ``timeout`` seconds is killed. Asserts
    every exit code is 0; returns the logs (stdout and stderr) in rank order."""
    # Each rank writes to its own file, never to a pipe: a rank whose pipe nobody is reading
    # (communicate() waits on one rank at a time) blocks in write() once 64 KiB of log are pending,
    # and a rank blocked mid-collective stalls the others (vLLM's CPU all-reduce spins forever).
    with tempfile.TemporaryDirectory(prefix="gb_ranks_") as tmp:
        outs = [open(Path(tmp) / f"rank{i}.log", "w+") for i in range(len(rank_envs))]
        procs = [subprocess.Popen([sys.executable, str(script), *args], env={**os.environ, **env},
                                  stdout=out, stderr=subprocess.STDOUT, text=True)
                 for env, out in zip(rank_envs, outs)]
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        logs = []
        for out in outs:
            out.seek(0)
            logs.append(out.read())
            out.close()
    assert all(p.returncode == 0 for p in procs), "\n".join(
        f"--- rank {i} (exit {p.returncode}) ---\n" + _tail(log) for i, (p, log) in enumerate(zip(procs, logs)))
    return logs


def _tail(log: str, n: int = 3000) -> str:
    # vLLM's per-layer reload warnings drown the lines that explain a failure
    keep = [ln for ln in log.splitlines() if "Failed to load weights" not in ln and "were not loaded from" not in ln]
    return "\n".join(keep)[-n:]

"""Helper of the multi-process tests: start one Python process per rank, wait for all of them,
and fail with every rank's log tail if any did not exit cleanly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def run_ranks(script: Path, args: Sequence[str], rank_envs: Sequence[dict[str, str]], timeout: float) -> list[str]:
    """Run ``python script *args`` once per entry of ``rank_envs`` (each added to this process's
    environment), all at once. A rank still running after ``timeout`` seconds is killed. Asserts
    every exit code is 0; returns the logs (stdout and stderr) in rank order."""
    procs = [subprocess.Popen([sys.executable, str(script), *args], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in rank_envs]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0])
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs

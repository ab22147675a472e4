"""What a stage ran on and how much memory it took, for reports/timings/ (never for metrics: it varies)."""

from __future__ import annotations

import platform
import resource

import torch


def device_name(dev: torch.device) -> str:
    """`NVIDIA H100 80GB HBM3` on a GPU; the CPU model and the threads used on the CPU."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:  # /proc/cpuinfo names the model; platform.processor() is often empty on Linux
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def peak_memory(dev: torch.device) -> dict:
    """Peak resident memory of this process, and on a GPU the peak memory torch allocated there (bytes)."""
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    gpu = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"peak_rss_bytes": rss, "peak_gpu_memory_bytes": gpu}

"""The host's memory: how much is free (to size the KV cache), and giving freed heap pages back."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

GiB = 1024**3


def free_memory(device: torch.device) -> tuple[int, int]:
    """(bytes free now, bytes in total) of the device: the GPU's from CUDA; on the CPU MemAvailable and
    MemTotal from /proc/meminfo, within a cgroup v2 memory limit when there is one."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024 if value.split() else 0
        free, total = info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):  # not Linux
        try:
            import psutil
        except ImportError:
            raise ValueError("cannot read the free memory of this machine (no /proc/meminfo, no psutil) "
                             "to size the KV cache: give --kv-cache-memory GB") from None
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free, total = min(free, int(limit) - used), min(total, int(limit))
    except (OSError, ValueError):
        pass
    return free, total


def memory_margin(total: int) -> int:
    """What auto sizing leaves free: 1 GiB or a tenth of the memory, the larger (activations, the OS)."""
    return max(GiB, total // 10)


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim): large temporaries of a load or a
    long prefill chunk would otherwise stay in RSS (about 0.3 GB after a 1,500-token 7B prefill). A no-op
    where glibc is not the C library."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

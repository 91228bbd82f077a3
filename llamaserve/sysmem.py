"""The host's memory: how much is free (to size the KV cache), giving freed heap and mapped pages back."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import Any

import numpy as np
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


def file_map(array: np.ndarray) -> mmap.mmap | None:
    """The mmap.mmap under an array that views an np.memmap (through any chain of views); None for an
    array in memory of our own."""
    base: Any = array
    while base is not None:
        mm = getattr(base, "_mmap", None) if isinstance(base, np.memmap) else None
        if mm is not None:
            return mm  # numpy keeps its mmap.mmap there
        base = getattr(base, "base", None)
    return None


def drop_mapped_pages(mm: mmap.mmap | None, end: int | None = None) -> None:
    """madvise(MADV_DONTNEED) the first `end` bytes (default: all) of a read-only shared file map: its
    pages leave our RSS and are mapped again from the page cache when touched (never written, the map
    loses nothing). Advice only: a no-op for None or where madvise is missing, and an error is ignored."""
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED, 0, len(mm) if end is None else min(end, len(mm)))
    except (OSError, ValueError):
        pass

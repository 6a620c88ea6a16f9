"""GPU memory by process, from NVIDIA's NVML (the optional ``nvidia-ml-py`` package).

The only module that imports ``pynvml``, and only inside :func:`gpu_memory_by_pid`.
Without the package, without a driver or without a GPU it answers ``None`` and logs
nothing as an error (one debug line); that outcome is kept, so NVML is tried once
per process.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["gpu_memory_by_pid", "reset"]

log = logging.getLogger(__name__)
_lock = threading.Lock()
#: None: not tried yet; False: unavailable (kept); else the pynvml module, initialised.
_nvml: Any = None


def _open() -> Any:
    """The initialised ``pynvml`` module, or False when NVML cannot be used (kept)."""
    global _nvml
    if _nvml is None:
        try:
            import pynvml  # type: ignore[import-not-found, unused-ignore]

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() < 1:
                raise RuntimeError("no GPU")
            _nvml = pynvml
        except Exception as exc:  # no module, no driver, no device: no GPU figures
            log.debug("no GPU memory figures: %s: %s", type(exc).__name__, exc)
            _nvml = False
    return _nvml


def gpu_memory_by_pid() -> dict[int, int] | None:
    """GPU memory in use, by host pid, summed over every GPU (bytes), from
    ``nvmlDeviceGetComputeRunningProcesses`` and ``nvmlDeviceGetGraphicsRunningProcesses``
    (``usedGpuMemory``; ``None`` there, as under some drivers, counts 0).

    Returns:
        ``{pid: bytes}`` (possibly empty), or ``None`` when NVML is not available (the
        ``nvidia-ml-py`` package missing, NVML failing to initialise, no GPU). Blocking;
        thread-safe. Never raises: a device whose query fails is skipped.
    """
    with _lock:
        nvml = _open()
        if nvml is False:
            return None
        found: dict[int, int] = {}
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception:
            return found
        for index in range(count):
            try:
                device = nvml.nvmlDeviceGetHandleByIndex(index)
                procs = [
                    *nvml.nvmlDeviceGetComputeRunningProcesses(device),
                    *nvml.nvmlDeviceGetGraphicsRunningProcesses(device),
                ]
            except Exception:
                continue
            seen: set[int] = set()
            for proc in procs:
                pid = int(getattr(proc, "pid", 0) or 0)
                used = getattr(proc, "usedGpuMemory", None)
                if pid in seen:  # one process listed as compute and graphics: once a device
                    continue
                seen.add(pid)
                found[pid] = found.get(pid, 0) + (used if isinstance(used, int) else 0)
        return found


def reset() -> None:
    """Forget the kept outcome (tests; a daemon tries NVML once)."""
    global _nvml
    with _lock:
        if _nvml not in (None, False):
            try:
                _nvml.nvmlShutdown()
            except Exception:
                log.debug("nvmlShutdown failed", exc_info=True)
        _nvml = None

"""Host-memory (or on-disk) cache of per-sample unit inputs/outputs, streamed to the device in batches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (falls back to 8 GiB where unavailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_memory_budget() -> int:
    """Default cache budget: a quarter of the RAM available now."""
    return available_ram_bytes() // 4


class MemoryBudget:
    """Shared byte budget for the caches of one reconstruction run; caches past it spill to disk."""

    def __init__(self, limit_bytes: int | None = None, spill_dir: str | os.PathLike | None = None) -> None:
        self.limit = default_memory_budget() if limit_bytes is None else int(limit_bytes)
        if self.limit < 0:
            raise ValueError(f"memory budget must be >= 0 bytes, got {limit_bytes}")
        self.used = 0
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None

    def reserve(self, nbytes: int) -> bool:
        if self.used + nbytes <= self.limit:
            self.used += nbytes
            return True
        return False

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


class TensorCache:
    """A [N, ...] float32 tensor kept in host memory, or in a disk memmap when the budget is exhausted.

    Fill it with :meth:`write` (rows ``start:start+len(chunk)``) and read random mini-batches with
    :meth:`gather`; both storage modes return identical values.
    """

    def __init__(self, n: int, row_shape: tuple[int, ...], budget: MemoryBudget) -> None:
        self.n, self.row_shape = n, tuple(row_shape)
        self.nbytes = n * int(np.prod(row_shape)) * 4
        self._budget = budget
        self.on_disk = not budget.reserve(self.nbytes)
        self._path: str | None = None
        if self.on_disk:
            fd, self._path = tempfile.mkstemp(prefix="isvit_cache_", suffix=".f32", dir=budget.spill_dir)
            os.close(fd)
            self._data = np.memmap(self._path, dtype=np.float32, mode="w+", shape=(n, *self.row_shape))
        else:
            self._data = torch.empty((n, *self.row_shape), dtype=torch.float32)

    def write(self, start: int, chunk: torch.Tensor) -> None:
        chunk = chunk.detach().to("cpu", torch.float32)
        if self.on_disk:
            self._data[start : start + len(chunk)] = chunk.numpy()
        else:
            self._data[start : start + len(chunk)] = chunk

    def gather(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.on_disk:
            out = torch.from_numpy(np.ascontiguousarray(self._data[idx.numpy()]))
        else:
            out = self._data.index_select(0, idx)
        return out.to(device, non_blocking=True)

    def close(self) -> None:
        if self.on_disk:
            del self._data
            if self._path:
                Path(self._path).unlink(missing_ok=True)
        else:
            self._budget.release(self.nbytes)
            self._data = torch.empty(0)

    def __del__(self) -> None:
        try:
            if self.on_disk and self._path and Path(self._path).exists():
                Path(self._path).unlink(missing_ok=True)
        except Exception:  # interpreter shutdown: best effort only
            return

"""A bounded cache of prepared volumes, so follow-up questions skip the vision encoder and the prefix.

Keyed by a hash of everything that changes the prepared state: the voxels, the geometry, the
preprocessing (axis, window, max_slices) and pruning settings, and the model. Two volumes or two
settings therefore never share an entry. Least recently used entries are evicted when the total
size (pixels, kept visual tokens, KV cache of the prefix) passes the budget, and before each job while
the memory they live in is nearly full (`evict_while` + `free_memory_fraction`), so cached follow-ups
never starve a new question of memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def volume_key(voxels: np.ndarray, geometry: dict[str, Any], settings: dict[str, Any], *, secret: bytes) -> str:
    """Keyed hex digest of voxels (dtype, shape, bytes), geometry and settings: a stable id for one prepared
    volume within one server. Keyed with the server's secret, so an id says nothing about the voxels to
    anyone without it (a plain hash would let a client test guesses of another patient's volume)."""
    if len(secret) < 16:
        raise ValueError("volume_key needs a secret of at least 16 bytes.")
    digest = hashlib.blake2b(digest_size=16, key=secret[:64])
    array = np.ascontiguousarray(voxels)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(json.dumps({"geometry": geometry, "settings": settings}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# Below this share of free memory (where the prepared volumes live), old entries are dropped before a job.
MIN_FREE_FRACTION = 0.10


def free_memory_fraction(device: torch.device | str) -> float | None:
    """Share of the device's memory a new job can still use; None where it cannot be read.

    CUDA: free driver memory plus what PyTorch's allocator holds but does not use. CPU: the kernel's
    MemAvailable (Linux). Elsewhere None, and only the byte budget and out-of-memory recovery apply.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return min(1.0, (free + idle) / total) if total else None
    if device.type == "cpu":
        return _linux_available_fraction()
    return None


def _linux_available_fraction(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0])
        available = int(fields["MemAvailable"].split()[0])
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return available / total if total else None


def _tensor_bytes(value: Any, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    return 0


def prepared_nbytes(prepared) -> int:
    """Bytes held by a PreparedVolume: pixels, kept visual tokens and features, and the prefix KV cache."""
    seen: set[int] = set()
    total = _tensor_bytes(prepared.pixels.pixel_values, seen)
    total += _tensor_bytes(prepared.visual_embeds, seen) + _tensor_bytes(prepared.visual_features, seen)
    if prepared.prefix is not None:
        for layer in getattr(prepared.prefix.cache, "layers", []):
            total += _tensor_bytes(list(vars(layer).values()), seen)
    return total


class PreparedCache:
    """Least-recently-used prepared volumes within `max_bytes`; safe to share between threads."""

    def __init__(self, max_bytes: int, secret: bytes | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}.")
        self.max_bytes = int(max_bytes)
        self.secret = secret if secret is not None else os.urandom(32)   # new ids for every process
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def key_for(self, voxels: np.ndarray, geometry: dict[str, Any], settings: dict[str, Any]) -> str:
        """The id this cache gives a volume prepared with `settings` (keyed with its own secret)."""
        return volume_key(voxels, geometry, settings, secret=self.secret)

    def get(self, key: str):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, value: Any, size: int) -> bool:
        """Keep `value` (of `size` bytes) under `key`, evicting the oldest entries to fit; False if it alone is too big."""
        with self._lock:
            self._entries.pop(key, None)
            if size > self.max_bytes:
                return False
            self._entries[key] = (value, size)
            while self.total_bytes > self.max_bytes:
                self._entries.popitem(last=False)
            return True

    def evict_while(self, under_pressure: Callable[[], bool]) -> int:
        """Drop least recently used entries while `under_pressure()` is true; how many were dropped."""
        dropped = 0
        while True:
            with self._lock:
                if not self._entries or not under_pressure():
                    return dropped
                self._entries.popitem(last=False)
            dropped += 1

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def clear(self) -> None:
        """Drop everything (e.g. when the accelerator runs out of memory)."""
        with self._lock:
            self._entries.clear()

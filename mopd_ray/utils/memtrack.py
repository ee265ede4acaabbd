"""Peak tensor memory of a block of torch code, measured on any device (CPU included).

CPU torch has no allocator statistics (torch.cuda.max_memory_allocated has no CPU twin), so this
tracks storages directly: a TorchDispatchMode sees every op's outputs, counts each new storage's
bytes once, and a weakref finalizer on the storage (torch keeps one Python object per live storage)
subtracts them when the storage is freed. Autograd's saved tensors keep their storages alive, so
memory held for the backward pass is counted. Tensors that existed before the block do not count.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemoryTracker(TorchDispatchMode):
    """``with PeakMemoryTracker() as m: ...`` then ``m.peak_bytes`` (and ``m.current_bytes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not a new allocation.
        seen = {id(a.untyped_storage()) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._live or key in seen:
                continue
            nbytes = storage.nbytes()
            self._live.add(key)
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            weakref.finalize(storage, self._release, key, nbytes)
        return out

"""Importing vLLM, torch, DeepSpeed and transformers without paying the cycle collector for it.

Their imports build millions of long-lived objects (modules, classes, registries). Python's cycle collector runs
while they are built (its young generation fills every 700 allocations) and, once they are built, every full
collection walks all of them again: a vLLM engine's construction ran four of those. ``heavy_imports`` raises the
young generation's threshold while a block imports them, then collects the imports' garbage and moves everything
alive out of the collector's reach (``gc.freeze``): module state is never garbage. Measured on this machine
(2026-12-07, a fresh engine process: ``from vllm import LLM`` and one engine of the tiny student): 8.1 s of CPU ->
5.7 s (benchmarks/results/2026-12-07_heavy_imports/).

Freezing keeps whatever is alive at that moment for the life of the process, so it happens only when the block
imported something new (the first engine of a process, not a warm actor's rebuild, whose previous engine may still
wait for collection), and ``freeze_survivors`` only after a role freed its engine.
"""

from __future__ import annotations

import contextlib
import gc
import sys

_DEPTH = 0  # heavy_imports blocks open in this process (one thread imports)
# The young generation's threshold while a block imports (Python's default: 700 allocations). Turning the collector
# off instead saved as much at the import but left the imports' garbage in between the live objects: every later
# full collection (a warm actor's engine rebuilt in place) took ~10% longer.
IMPORT_GEN0_THRESHOLD = 20000


@contextlib.contextmanager
def heavy_imports():
    """``with heavy_imports(): from vllm import LLM``: the young generation's threshold raised while the block runs,
    then, if the block imported anything new, the garbage collected and what is alive frozen."""
    global _DEPTH
    if _DEPTH:  # inside another block: the outermost one collects and freezes
        yield
        return
    known, thresholds = len(sys.modules), gc.get_threshold()
    gc.set_threshold(IMPORT_GEN0_THRESHOLD, *thresholds[1:])
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        gc.set_threshold(*thresholds)
        if len(sys.modules) > known:
            gc.collect()  # the imports' own garbage first: frozen, it would stay for the process's life
            gc.freeze()


def freeze_survivors() -> None:
    """After a role freed its engine in place (RoleWorker.close, before a warm rebuild): collect, then freeze what
    is still alive, the libraries' objects again. vLLM's engine shutdown unfreezes every object of its process
    (``gc.unfreeze``), so without this the next engine's construction walks them all again in its collections:
    a rebuilt tiny engine took 1.4 s of CPU, 0.35 s after this (this machine, 2026-12-07; the freeing +0.35 s).
    Only where nothing of the freed engine is alive: frozen, it would never be collected."""
    gc.collect()
    gc.freeze()

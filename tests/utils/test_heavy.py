"""heavy_imports: the young generation's threshold raised inside the block, what a new import built collected and
frozen after it, nothing frozen when the block imported nothing new (a warm actor's rebuild: its previous engine may
still await collection), nested blocks left to the outermost."""

import gc
import sys

from mopd_ray.utils.heavy import IMPORT_GEN0_THRESHOLD, heavy_imports


def test_a_new_import_is_frozen_and_its_garbage_collected_first(tmp_path, monkeypatch):
    (tmp_path / "mopd_probe_heavy_mod.py").write_text(
        "TABLE = [[i] for i in range(20000)]\n"
        "class Cycle:\n    pass\n"
        "for _ in range(2500):\n    a, b = Cycle(), Cycle(); a.b, b.a = b, a\n"  # garbage cycles
        "del a, b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    with heavy_imports():
        assert gc.get_threshold()[0] == IMPORT_GEN0_THRESHOLD
        with heavy_imports():  # nested: no-op
            import mopd_probe_heavy_mod  # noqa: F401
        assert gc.get_freeze_count() == frozen  # the outer block freezes, not the inner one
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() >= frozen + 20000  # the module's objects are out of the collector's reach
    # its garbage cycles (2,500 pairs of instances with their dicts, 10,000 objects: fewer than one young generation)
    # were collected, not frozen
    assert not [o for o in gc.get_objects() if type(o).__name__ == "Cycle"]
    frozen_cycles = gc.get_freeze_count() - frozen - 20000
    assert frozen_cycles < 2000, frozen_cycles
    sys.modules.pop("mopd_probe_heavy_mod")


def test_a_block_that_imports_nothing_new_freezes_nothing():
    frozen = gc.get_freeze_count()
    alive = [[] for _ in range(1000)]  # would be kept for the process's life if frozen
    with heavy_imports():
        import json  # noqa: F401  (already imported)
    assert gc.get_freeze_count() == frozen
    del alive

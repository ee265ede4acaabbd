"""heavy_imports: the collector off inside the block, what a new import built frozen after it, nothing frozen when
the block imported nothing new (a warm actor's rebuild: its previous engine may still await collection)."""

import gc
import sys

from mopd_ray.utils.heavy import heavy_imports


def test_the_collector_is_off_inside_and_a_new_import_is_frozen(tmp_path, monkeypatch):
    (tmp_path / "mopd_probe_heavy_mod.py").write_text("TABLE = [[i] for i in range(20000)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with heavy_imports():
        assert not gc.isenabled()
        import mopd_probe_heavy_mod  # noqa: F401
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + 20000  # the module's objects are out of the collector's reach
    sys.modules.pop("mopd_probe_heavy_mod")


def test_nothing_new_is_not_frozen_and_a_disabled_collector_stays_off():
    frozen = gc.get_freeze_count()
    garbage = [[] for _ in range(1000)]  # alive now: would be kept for the process's life if frozen
    with heavy_imports():
        import json  # noqa: F401  (already imported)
    assert gc.get_freeze_count() == frozen and gc.isenabled()
    del garbage
    gc.disable()
    try:
        with heavy_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()

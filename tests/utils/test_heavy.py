"""heavy_imports: the young generation's threshold raised inside the block, what a new import built collected and
frozen after it, nothing frozen when the block imported nothing new (a warm actor's rebuild: its previous engine may
still await collection), nested blocks left to the outermost."""

import gc
import json
import subprocess
import sys

from mopd_ray.utils.heavy import heavy_imports

# In a fresh interpreter (a test process has frozen its own objects already): a module of 20,000 live lists and, last,
# 2,500 pairs of instances in garbage cycles (10,000 objects with their dicts: fewer than one young generation).
PROBE = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from mopd_ray.utils.heavy import IMPORT_GEN0_THRESHOLD, heavy_imports
thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
with heavy_imports():
    inside = gc.get_threshold()[0]
    with heavy_imports():
        import mopd_probe_heavy_mod
    frozen_by_inner = gc.get_freeze_count() - frozen
out = dict(inside=inside, expected=IMPORT_GEN0_THRESHOLD, restored=gc.get_threshold() == thresholds,
           frozen_by_inner=frozen_by_inner, frozen=gc.get_freeze_count() - frozen)
gc.unfreeze()  # whatever was frozen is visible again: garbage frozen with the module would show here
out["cycles_left"] = sum(type(o).__name__ == "Cycle" for o in gc.get_objects())
print(json.dumps(out))
"""


def test_a_new_import_is_frozen_and_its_garbage_collected_first(tmp_path):
    (tmp_path / "mopd_probe_heavy_mod.py").write_text(
        "TABLE = [[i] for i in range(20000)]\n"
        "class Cycle:\n    pass\n"
        "for _ in range(2500):\n    a, b = Cycle(), Cycle(); a.b, b.a = b, a\n"
        "del a, b\n")
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["inside"] == out["expected"] and out["restored"]
    assert out["frozen_by_inner"] == 0  # the outer block freezes, not the nested one
    assert out["frozen"] >= 20000  # the module's objects are out of the collector's reach
    assert out["cycles_left"] == 0  # its garbage was collected, not frozen (kept for the process's life)


def test_a_block_that_imports_nothing_new_freezes_nothing():
    frozen = gc.get_freeze_count()
    alive = [[] for _ in range(1000)]  # would be kept for the process's life if frozen
    with heavy_imports():
        import json  # noqa: F401  (already imported)
    assert gc.get_freeze_count() == frozen
    del alive


SURVIVORS = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from mopd_ray.utils.heavy import freeze_survivors
from mopd_ray.workers.base import RoleWorker
class Cycle:
    pass
class Role(RoleWorker):
    def __init__(self):
        self.engine = [Cycle() for _ in range(2000)]
        for a, b in zip(self.engine, self.engine[1:]):
            a.b, b.a = b, a  # the freed engine's objects: a cycle
kept = [[i] for i in range(5000)]
role = Role()
frozen = gc.get_freeze_count()
role.close()  # RoleWorker.close: frees the role, then freeze_survivors
out = dict(frozen=gc.get_freeze_count() - frozen)
gc.unfreeze()
out["cycles_left"] = sum(type(o).__name__ == "Cycle" for o in gc.get_objects())
print(json.dumps(out))
"""


def test_a_closed_role_freezes_what_survives_and_not_its_freed_engine():
    """vLLM's shutdown unfreezes the process's heap; RoleWorker.close collects the freed engine, then freezes the
    survivors (the libraries, what the process keeps) so that the next engine's build does not walk them."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    out = json.loads(subprocess.run([sys.executable, "-c", SURVIVORS, root], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["frozen"] >= 5000  # the survivors (the kept lists among them) are frozen
    assert out["cycles_left"] == 0  # the freed engine's objects were collected first, not frozen

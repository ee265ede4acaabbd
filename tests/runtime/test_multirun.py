"""A Hydra sweep (`python -m mopd_ray.main -m`): each job in its own folder, driver memory flat."""

import json

import pytest

from mopd_ray.metrics import read_metrics

from ..helpers import FAST, run_main

pytestmark = pytest.mark.slow


def test_multirun_sweep_each_in_its_own_dir_and_driver_memory_flat(artifacts, tmp_path):
    """Two sweep points whose payloads differ 8x: the driver fetches the same few bytes per step. The jobs
    share one run name and the default checkpoint folder: each writes checkpoints of its own."""
    sweep = tmp_path / "sweep"
    run_main(cwd=tmp_path, args=["-m", "experiment=local_smoke", f"run.artifacts_dir={artifacts}", f"hydra.sweep.dir={sweep}",
          "rollout.n_samples_per_prompt=2,8", "rollout.max_new_tokens=16", "learner.micro_batch_size=2",
          "run.total_steps=4", "data.domains=[sort]", "learner.world_size=1",  # one teacher (self), one rank
          "teachers.models.self.backend=hf", *FAST])
    dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(dirs) == 2
    ids = [json.loads((d / "identity.json").read_text())["run_id"] for d in dirs]
    finals = sorted(tmp_path.glob("checkpoints/local_smoke/*/*/step_000004/COMPLETE"))
    assert len(finals) == 2 and len({f.parents[2] for f in finals}) == 2  # a folder per job
    assert sorted(f.parents[1].name for f in finals) == sorted(ids) and ids[0] != ids[1]
    runs = [read_metrics(d) for d in dirs]
    assert all(len(r) == 4 for r in runs)
    small, large = sorted(runs, key=lambda r: r[-1]["response_tokens"])

    def payload(rows):
        return sum(v for r in rows for k, v in r.items() if k.endswith("/payload_bytes"))

    assert payload(large) > 3 * payload(small)
    fetched_small = max(r["driver/fetched_bytes"] for r in small[1:])
    fetched_large = max(r["driver/fetched_bytes"] for r in large[1:])
    assert fetched_large < 1.5 * fetched_small + 512  # metadata only, independent of payload size
    assert fetched_large < payload(large[1:2]) / 4
    assert large[-1]["driver/rss_mb"] - large[1]["driver/rss_mb"] < 50

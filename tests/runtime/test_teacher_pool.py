"""A shared teacher pool on the real engines: teachers swapped in place on one vLLM replica score exactly
what their dedicated engines score, for every signal, over several steps of mixed routing."""

import numpy as np
import pytest
import ray

from mopd_ray.roles import make_pool_group, make_teacher_group
from mopd_ray.warm import WARM

from .conftest import compose_cfg
from .test_teachers import _batch

pytestmark = pytest.mark.slow
TEACHERS = ("add_expert", "self", "sort_expert")  # one architecture (qwen2, hidden 64 x 2 layers)
SORT_EXPERT = ["teachers.models.sort_expert.model_path=${run.artifacts_dir}/tiny/teacher_sort",
               "teachers.models.sort_expert.tiny={arch: qwen2, hidden_size: 64, num_layers: 2, num_heads: 2, "
               "num_kv_heads: 1, intermediate_size: 128, seed: 7}"]


def _call(group, replica, teacher, batch, rows, topk=0, hidden=False):
    ref = ray.put(batch)
    scores, meta = ray.get(group.actors[replica].score_parts.options(num_returns=2).remote(
        teacher, [rows], topk, hidden, ref))
    return scores, meta


def test_pooled_teachers_score_exactly_as_dedicated_engines(local_ray, artifacts):
    from mopd_ray.models.prepare import prepare_models

    cfg = compose_cfg(f"run.artifacts_dir={artifacts}", *SORT_EXPERT, "teachers.pools.shared.replicas=1",
                      "teachers.pools.shared.hidden_dtype=float32",
                      *[f"teachers.models.{t}.hidden_dtype=float32" for t in TEACHERS])
    prepare_models(cfg)
    pool = make_pool_group(cfg, "shared", list(TEACHERS))
    dedicated = {t: make_teacher_group(cfg, t) for t in TEACHERS}
    try:
        for g in (pool, *dedicated.values()):
            g.gather(g.call_all("ready"))
        batch = _batch()
        rng = np.random.default_rng(0)
        swaps = 0
        # several steps, each routing the rows to teachers at random and calling them in another order
        for step, (topk, hidden) in enumerate([(0, False), (4, False), (0, True), (0, False)]):
            route = rng.integers(0, len(TEACHERS), batch.num_rows)
            for t in rng.permutation(len(TEACHERS)):
                rows = np.nonzero(route == t)[0].astype(np.int32)
                if not len(rows):
                    continue
                name = TEACHERS[t]
                got, meta = _call(pool, 0, name, batch, rows, topk, hidden)
                want, _ = _call(dedicated[name], 0, name, batch, rows, topk, hidden)
                swaps += meta["swaps"]
                assert got.teacher == name and meta["pool"] == "shared"
                np.testing.assert_allclose(got.teacher_logprobs_RT, want.teacher_logprobs_RT, atol=1e-6, err_msg=name)
                if topk:
                    np.testing.assert_array_equal(got.topk_ids_RTK, want.topk_ids_RTK)
                    np.testing.assert_allclose(got.topk_logprobs_RTK, want.topk_logprobs_RTK, atol=1e-6)
                if hidden:
                    np.testing.assert_allclose(got.hidden_RTH, want.hidden_RTH, atol=1e-6)
        assert swaps >= 3
        # the teachers differ (a pool that never swapped would fail the comparisons above)
        a, _ = _call(pool, 0, "add_expert", batch, np.arange(3, dtype=np.int32))
        b, _ = _call(pool, 0, "sort_expert", batch, np.arange(3, dtype=np.int32))
        assert np.abs(a.teacher_logprobs_RT - b.teacher_logprobs_RT).max() > 0.01
        head = pool.gather(pool.call(0, "output_head", "sort_expert"))
        np.testing.assert_array_equal(head[0], dedicated["sort_expert"].gather(dedicated["sort_expert"].call(0, "output_head"))[0])
    finally:
        for g in (pool, *dedicated.values()):
            WARM.park(g)  # the next test's teachers take them or rebuild them in place (mopd_ray/warm.py)


def test_a_teacher_of_another_architecture_cannot_join_a_pool(artifacts):
    from mopd_ray.models.compat import check_pool_architectures

    folders = {"add_expert": f"{artifacts}/tiny/teacher_add", "reverse_expert": f"{artifacts}/tiny/teacher_reverse"}
    with pytest.raises(ValueError, match=r"teacher pool 'shared': teacher 'reverse_expert' .* has another "
                                         r"architecture .* config.json differs in \[.*'architectures'"):
        check_pool_architectures("shared", folders)
    check_pool_architectures("shared", {"add_expert": folders["add_expert"], "self": f"{artifacts}/tiny/student"})

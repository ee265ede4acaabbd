"""The cascade's pieces work: stages one after another from each other's students, every stage measured
on every domain, recovery runs with the stage checkpoints as teachers by name, over seeds, resumable.
The headline numbers belong to the benchmark (benchmarks/results/), not here."""

import json
from pathlib import Path

import pytest

from mopd_ray.cascade import markdown, recovery_variants, stage_overrides, summarize
from mopd_ray.config import ConfigError, check_cascade, validate

from ..helpers import compose_cfg


def test_cascade_config_stages_and_recovery_runs():
    cfg = compose_cfg("experiment=cascade")
    validate(cfg)
    check_cascade(cfg)
    assert [st.name for st in cfg.cascade.stages] == ["stage_add", "stage_reverse", "stage_sort", "stage_calc"]
    o = stage_overrides(cfg, 1, "/ck/stage_add/student_final", Path("/out/stages"))
    # its own domain only, from the previous stage's student, its own teacher (the domain's specialist)
    assert "model.path='/ck/stage_add/student_final'" in o and "data.domains=[reverse]" in o
    assert "teachers.routing.reverse=reverse_expert" in o and "run.total_steps=150" in o
    staged = compose_cfg("experiment=cascade", *o)
    assert list(staged.teachers.models) == ["reverse_expert"] and dict(staged.teachers.routing) == {
        "reverse": "reverse_expert"}
    dirs = {st.name: f"/out/stages/{st.name}/student_final" for st in cfg.cascade.stages}
    runs = dict(recovery_variants(cfg, dirs["stage_sort"], dirs))
    assert list(runs) == ["recover_sampled", "recover_sampled_self0.25", "recover_topk", "recover_topk_self0.25",
                          "recover_full_vocab", "recover_full_vocab_self0.25", "grpo_rewards_only"]
    rec = compose_cfg("experiment=cascade", *runs["recover_sampled_self0.25"])
    validate(rec)
    # every stage's checkpoint is the teacher of its domains, by the stage's name, with `self` beside it
    assert {n: t.model_path for n, t in rec.teachers.models.items()} == {**dirs, "self": None}
    assert [dict(r) for r in rec.teachers.routing.add] == [{"teacher": "stage_add", "weight": 1.0},
                                                           {"teacher": "self", "weight": 0.25}]
    assert rec.model.path == dirs["stage_sort"] and rec.algorithm.signal == "sampled"
    grpo = compose_cfg("experiment=cascade", *runs["grpo_rewards_only"])
    assert grpo.algorithm.signal == "none" and not grpo.teachers.models
    # the local Ray is started once for every run: as large as the largest (4 stage teachers + self)
    from mopd_ray.cascade import max_cpus
    from mopd_ray.config import resource_demand

    assert max_cpus(cfg, ["experiment=cascade"]) == resource_demand(rec)["CPU"] == resource_demand(cfg)["CPU"] + 1


def test_cascade_recovery_teachers_from_one_pool():
    """cascade.teacher_pool: every stage checkpoint and `self` on the engines of one pool (they are of one
    architecture, grown from one student); a pool the user defines keeps its settings."""
    cfg = compose_cfg("experiment=cascade", "cascade.teacher_pool=true")
    dirs = {st.name: f"/out/stages/{st.name}/student_final" for st in cfg.cascade.stages}
    runs = dict(recovery_variants(cfg, dirs["stage_sort"], dirs))
    rec = compose_cfg("experiment=cascade", *runs["recover_topk_self0.25"])
    validate(rec)
    assert {n: t.pool for n, t in rec.teachers.models.items()} == {**{n: "cascade" for n in dirs}, "self": "cascade"}
    assert rec.teachers.pools.cascade.replicas == 1
    alone = compose_cfg("experiment=cascade", *runs["recover_topk"])
    assert {n: t.pool for n, t in alone.teachers.models.items()} == {n: "cascade" for n in dirs}  # no self
    from mopd_ray.config import resource_demand

    dedicated = compose_cfg("experiment=cascade", *dict(recovery_variants(
        compose_cfg("experiment=cascade"), dirs["stage_sort"], dirs))["recover_topk_self0.25"])
    assert resource_demand(dedicated)["CPU"] - resource_demand(rec)["CPU"] == 4  # 5 teacher engines -> 1
    mine = compose_cfg("experiment=cascade", "cascade.teacher_pool=true", "teachers.pools.cascade.replicas=2")
    o = dict(recovery_variants(mine, dirs["stage_sort"], dirs))["recover_sampled"]
    assert not any(x.startswith("teachers.pools.cascade.replicas") for x in o)
    assert compose_cfg("experiment=cascade", "teachers.pools.cascade.replicas=2", *o).teachers.pools.cascade.replicas == 2


@pytest.mark.parametrize("override, key", [
    ("cascade.stages=[{name: a, domains: [add], teacher: nobody}]", "cascade.stages[0].teacher"),
    ("cascade.stages=[{name: a, domains: [add, chess]}]", "cascade.stages[0].domains"),
    ("cascade.stages=[{name: a, domains: [add]},{name: a, domains: [reverse, sort]}]", "cascade.stages[1].name"),
    ("cascade.stages=[{name: self, domains: [add, reverse, sort]}]", "cascade.stages[0].name"),
    ("cascade.stages=[{name: a, domains: [add, reverse]}]", "cascade.stages"),
    ("cascade.signals=[dense]", "cascade.signals"),
    ("cascade.self_weights=[-1.0]", "cascade.self_weights"),
    ("cascade.stages=[]", "cascade.stages"),
])
def test_cascade_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        check_cascade(compose_cfg("experiment=cascade", override))


def test_cascade_summary_spread_over_seeds():
    three = ("data.domains=[add,reverse,sort]", "cascade.stages=[{name: stage_add, domains: [add], teacher: add_expert},"
             "{name: stage_reverse, domains: [reverse], teacher: reverse_expert},"
             "{name: stage_sort, domains: [sort], teacher: sort_expert}]")
    cfg = compose_cfg("experiment=cascade", "cascade.run_seeds=[0,1]", *three)
    acc = {"student_base": {"add": 0.0, "reverse": 0.0, "sort": 0.1},
           "stage_add": {"add": 0.9, "reverse": 0.0, "sort": 0.0},
           "stage_reverse": {"add": 0.5, "reverse": 1.0, "sort": 0.0},
           "stage_sort": {"add": 0.2, "reverse": 0.4, "sort": 1.0}}
    ev = (lambda a: [{"step": 150, "eval/add/accuracy": a, "eval/reverse/accuracy": 1.0, "eval/sort/accuracy": 1.0}])
    runs = {(0, "recover_topk"): {"eval": ev(0.8), "step_s": 1.0}, (1, "recover_topk"): {"eval": ev(0.6), "step_s": 2.0}}
    s = summarize(cfg, {"accuracy": {}}, acc, runs)
    assert s["forgotten"]["add"] == pytest.approx(0.7) and s["forgotten"]["sort"] == 0.0
    assert s["recovery"]["recover_topk"]["domains"]["add"]["mean"] == pytest.approx(0.7)
    assert s["recovery"]["recover_topk"]["domains"]["add"]["pm"] == pytest.approx(0.1)
    table = markdown(s, cfg)
    assert "| recover_topk | 70.0 +- 10.0 | 100.0 +- 0.0 | 100.0 +- 0.0 | 90.0 |" in table
    assert "| after_stage_reverse | 50.0 | 100.0 | 0.0 | 50.0 |" in table and "add 90.0 -> 20.0" in table


def check_a_miniature_cascade(tmp_path, demo_overrides: list) -> None:
    """Run by the demonstration's slow test, on its bootstrap: a distilled stage then a GRPO stage, each
    measured on every domain; recovery with the stage checkpoints (and `self`) as teachers, served by one
    pooled engine, over two seeds; a second launch reuses every finished run and reruns the one that did
    not finish."""
    from mopd_ray.cascade import run_cascade

    out = tmp_path / "cascade"
    overrides = [*[o for o in demo_overrides if not o.startswith(("run.output_dir=", "run.eval_pass_k="))],
                 f"run.output_dir={out}", "run.eval_pass_k=0",
                 "cascade.stages=[{name: first, domains: [reverse, sort], teacher: reverse_expert, steps: 2},"
                 "{name: second, domains: [calc], steps: 2}]",
                 "cascade.signals=[sampled]", "cascade.self_weights=[0.5]", "cascade.recovery_steps=2",
                 "cascade.run_seeds=[0,1]", "cascade.grpo_baseline=false",
                 "cascade.teacher_pool=true"]  # the recovery's three teachers on one engine
    summary = run_cascade(overrides)
    cfg_of = (lambda d: json.loads((out / d / "run.json").read_text())["config"])  # the run's resolved config
    first, second = cfg_of("stages/first"), cfg_of("stages/second")
    assert first["model"]["path"].endswith("art/demo/seed0/student_base") and first["data"]["domains"] == ["reverse", "sort"]
    assert second["model"]["path"] == str(out / "stages/first/student_final") and second["data"]["domains"] == ["calc"]
    assert second["algorithm"]["signal"] == "none" and second["teachers"]["models"] == {}  # GRPO: no teacher
    acc = json.loads((out / "stages/accuracy.json").read_text())["accuracy"]
    assert set(acc) == {"student_base", "first", "second"} and all(set(a) == {"reverse", "sort", "calc"} for a in acc.values())
    for seed in (0, 1):
        rec = cfg_of(f"seed{seed}/recover_sampled_self0.5")
        assert rec["run"]["seed"] == seed and rec["model"]["path"] == str(out / "stages/second/student_final")
        assert rec["teachers"]["models"]["first"]["model_path"] == str(out / "stages/first/student_final")
        assert rec["teachers"]["routing"]["calc"] == [{"teacher": "second", "weight": 1.0}, {"teacher": "self", "weight": 0.5}]
        assert {n: t["pool"] for n, t in rec["teachers"]["models"].items()} == dict.fromkeys(("first", "second", "self"), "cascade")
        steps = [json.loads(x) for x in (out / f"seed{seed}/recover_sampled_self0.5/metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2 and {"teacher/first/reverse_kl", "teacher/self/reverse_kl"} <= set(steps[-1])
    r = summary["recovery"]["recover_sampled_self0.5"]
    assert set(r["seeds"]) == {0, 1} and r["domains"]["reverse"]["n"] == 2
    assert "recover_sampled_self0.5" in (out / "results.md").read_text() and (out / "accuracy.png").exists()
    # a second launch reuses every stage, the stage measurements and every finished recovery run, and
    # reruns the one that did not finish
    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("*/*/run.json"), out / "stages/accuracy.json"]}
    assert len(stamps) == 5
    unfinished = out / "seed1/recover_sampled_self0.5/run.json"
    unfinished.unlink()
    run_cascade(overrides)
    assert unfinished.exists() and all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != unfinished)

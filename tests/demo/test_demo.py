"""The demonstration's pieces work: bootstrap with the project's learner, every comparison run, the
table and the plot. Headline numbers belong to the benchmark (benchmarks/run_demo.sh), not here."""

import json

import pytest

from mopd_ray.demo import markdown_table, plot, summarize, variants
from mopd_ray.evaluate import merge_results, pass_at_k

from ..helpers import compose_cfg


def test_eval_subset_takes_every_domain_equally():
    from mopd_ray.evaluate import per_domain_subset

    rows = [{"domain": d, "i": i} for d, n in (("add", 5), ("reverse", 5), ("sort", 1)) for i in range(n)]
    got = per_domain_subset(rows, 6)
    assert [(r["domain"], r["i"]) for r in got] == [("add", 0), ("add", 1), ("add", 2), ("reverse", 0),
                                                    ("reverse", 1), ("sort", 0)]
    assert per_domain_subset(rows, 0) == rows and per_domain_subset(rows, 99) == rows
    assert len(per_domain_subset(rows, 10)) == 10  # a short domain's share goes to the others


def test_pass_at_k_and_merge():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    merged = merge_results([{"add": {"accuracy": 1.0, "n": 3}}, {"add": {"accuracy": 0.0, "n": 1}}])
    assert merged["add"] == {"accuracy": 0.75, "n": 4}


def test_variants_cover_signals_and_baselines():
    assert [n for n, _ in variants(compose_cfg("experiment=demo"))] == ["mopd_topk", "single_teacher_reverse",
                                                                        "grpo_rewards_only"]
    cfg = compose_cfg("experiment=demo_full")
    names = [n for n, _ in variants(cfg)]
    assert names == ["mopd_topk", "mopd_full_vocab", "mopd_sampled", "single_teacher_add", "grpo_rewards_only"]
    assert cfg.run.total_steps == 1500 and cfg.learner.lr_schedule == "cosine"
    single = dict(variants(cfg))["single_teacher_add"]
    assert "teachers.routing.sort=add_expert" in single and "teachers.routing.reverse=add_expert" in single
    # each signal's own settings follow it into the seesaw baseline; GRPO gets its own overrides
    cfg = compose_cfg("experiment=demo_full", "+demo.signal_overrides.sampled=['algorithm.kl_gamma=1.0']",
                      "demo.single_teacher_signal=sampled", "demo.grpo_overrides=['learner.lr=1e-4']")
    v = dict(variants(cfg))
    assert v["mopd_sampled"] == ["algorithm.signal=sampled", "algorithm.kl_gamma=1.0"]
    assert v["single_teacher_add"][:2] == ["algorithm.signal=sampled", "algorithm.kl_gamma=1.0"]
    assert v["grpo_rewards_only"][-1] == "learner.lr=1e-4"


def test_demo_signals_are_checked():
    from mopd_ray.config import ConfigError, validate

    with pytest.raises(ConfigError, match="demo.signals"):
        validate(compose_cfg("experiment=demo", "demo.signals=[topk,sampeld]"))
    with pytest.raises(ConfigError, match="demo.single_teacher_signal"):
        validate(compose_cfg("experiment=demo", "demo.single_teacher_signal=dense"))


def test_summary_table_and_plot(tmp_path):
    manifest = {"accuracy": {"student_base": {"add": 0.0, "sort": 0.1},
                             "teacher_add": {"add": 0.9, "sort": 0.0}, "teacher_sort": {"add": 0.0, "sort": 1.0}}}
    runs = {"mopd_full_vocab": {"eval": [{"step": 0, "eval/add/accuracy": 0.0, "eval/sort/accuracy": 0.1},
                                         {"step": 10, "eval/add/accuracy": 0.85, "eval/sort/accuracy": 0.95}],
                                "step_s": 0.5, "wall_s": 10}}
    s = summarize(manifest, runs, ["add", "sort"])
    assert s["fraction_of_teacher"]["mopd_full_vocab"]["add"] == pytest.approx(0.85 / 0.9)
    table = markdown_table(s, ["add", "sort"], 10, 0)
    assert "| mopd_full_vocab | 85.0 | 95.0 | 90.0 | 0.50 s |" in table and "| teacher_add | 90.0 | 0.0 |" in table
    plot(runs, s, ["add", "sort"], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bootstrap_and_every_run_of_the_demo_and_the_cascade(tmp_path):
    """A miniature demonstration end to end: bootstrap (few SFT steps), then MOPD (top-k here; the other
    signals run end to end in tests/runtime), its evaluation, table and plot; then a miniature cascade from
    the same bootstrap (tests/demo/test_cascade.py). The baselines are runs of the same path with other
    overrides (test_variants_cover_signals_and_baselines); GRPO runs end to end as the cascade's second
    stage, so they are not run again here."""
    from mopd_ray.demo import run_demo

    overrides = [f"run.artifacts_dir={tmp_path}/art", f"run.output_dir={tmp_path}/out", f"run.checkpoint_dir={tmp_path}/ck",
                 "demo.base_steps=3",
                 "demo.teacher_steps=4", "demo.batch=8", "demo.model.hidden_size=64", "demo.model.num_layers=1",
                 "demo.model.num_heads=2", "demo.model.num_kv_heads=1", "demo.model.intermediate_size=64",
                 "data.num_train_per_domain=50", "data.num_eval_per_domain=6", "data.prompts_per_step=4",
                 "rollout.n_samples_per_prompt=2", "learner.micro_batch_size=4", "learner.world_size=1", "run.total_steps=2",
                 "run.eval_every=2", "run.eval_pass_k=2", "cluster.include_dashboard=false",
                 "logging.wandb_mode=disabled", "logging.progress_bar=false", "demo.signals=[topk]",
                 "demo.baselines=false",
                 # the miniature cascade below runs from this bootstrap: its domains and base recipe (not the
                 # full study's four) pinned here
                 "data.domains=[reverse,sort,calc]", "demo.base_tool_use=true"]
    summary = run_demo(overrides)
    manifest = json.loads((tmp_path / "art/demo/seed0/manifest.json").read_text())
    assert set(manifest["paths"]) == {"student_base", "teacher_reverse", "teacher_sort", "teacher_calc"}
    assert set(summary["final_accuracy"]) == {"student_before", "teacher_reverse", "teacher_sort", "teacher_calc",
                                              "mopd_topk"}
    assert set(summary["final_accuracy"]["mopd_topk"]) == {"reverse", "sort", "calc"}  # the tool domain too
    results = json.loads((tmp_path / "out/results.json").read_text())
    for name, run in results["runs"].items():
        assert [e["step"] for e in run["eval"]] == [0, 2], name
    assert (tmp_path / "out/accuracy.png").exists() and "mopd_topk" in (tmp_path / "out/results.md").read_text()
    # a second call reuses the cached bootstrap
    stamp = (tmp_path / "art/demo/seed0/manifest.json").stat().st_mtime_ns
    from mopd_ray.bootstrap import bootstrap
    from mopd_ray.demo import _compose

    bootstrap(_compose(overrides))
    assert (tmp_path / "art/demo/seed0/manifest.json").stat().st_mtime_ns == stamp
    # the last teacher trained again from the same base and seed, in a fresh learner group, is
    # byte-identical to the bootstrap's, which came last out of one group reloaded for each model
    from mopd_ray.bootstrap import sft
    from mopd_ray.data.domains import generate_split

    from mopd_ray.cluster import init_ray
    from mopd_ray.config import resource_demand

    cfg = _compose([*overrides, "cluster.reuse_engines=false"])  # a fresh group, not a warm one
    init_ray(cfg.cluster, resource_demand(cfg)["CPU"])
    d, seed0 = cfg.demo, tmp_path / "art/demo/seed0"
    domains = list(cfg.data.domains)
    rows = [r for r in generate_split(domains, cfg.data.num_train_per_domain, cfg.data.seed, "train")
            if r["domain"] == domains[-1]]
    sft(cfg, str(seed0 / "student_base"), str(tmp_path / "again"), rows, d.teacher_steps, d.teacher_lr, d.batch,
        d.seed + len(domains), tool_use=True)
    assert (tmp_path / "again/model.safetensors").read_bytes() == \
        (seed0 / f"teacher_{domains[-1]}/model.safetensors").read_bytes()
    # the cascade from the same bootstrap: its stages, recovery runs over seeds, and resume
    from .test_cascade import check_a_miniature_cascade

    check_a_miniature_cascade(tmp_path, overrides)


def test_bootstrap_recipe_ignores_comparison_settings():
    """Changing which runs the demo compares must not rebuild the teachers; changing their recipe must."""
    from mopd_ray.bootstrap import recipe_of

    base = recipe_of(compose_cfg("experiment=demo"))
    assert recipe_of(compose_cfg("experiment=demo", "demo.signals=[sampled]", "demo.baselines=false",
                                 "run.total_steps=7")) == base
    assert recipe_of(compose_cfg("experiment=demo", "demo.teacher_steps=10")) != base
    assert recipe_of(compose_cfg("experiment=demo", "data.num_eval_per_domain=7")) != base
    # the full study and the cascade share one bootstrap (the cascade's constant learning rate is for its runs;
    # the bootstrap pins its own schedule); the quick demonstration has its own; learner settings the SFT uses
    # are keyed
    full = recipe_of(compose_cfg("experiment=demo_full"))
    assert recipe_of(compose_cfg("experiment=cascade")) == full != base
    assert recipe_of(compose_cfg("experiment=demo", "demo.base_tool_use=false")) != base
    assert recipe_of(compose_cfg("experiment=demo", "learner.world_size=1")) != base
    assert recipe_of(compose_cfg("experiment=demo", "learner.betas=[0.9,0.95]")) != base


def test_the_base_student_sees_tool_calls_only_where_the_recipe_says():
    """The quick demo's base student is fine-tuned on the tool domain's demonstrated episodes, the full study's on
    bare answers; every expert on its own domain's rows (calc's expert on its episodes) from the base student."""
    from pathlib import Path

    from mopd_ray.bootstrap import sft_plan
    from mopd_ray.data.domains import generate_split

    for experiment, base_tools in (("demo", True), ("demo_full", False)):
        cfg = compose_cfg(f"experiment={experiment}")
        train = generate_split(list(cfg.data.domains), 4, 0, "train")
        plan = sft_plan(cfg, Path("/out"), train)
        assert [j["name"] for j in plan] == ["student_base", *[f"teacher_{d}" for d in cfg.data.domains]]
        base, experts = plan[0], plan[1:]
        assert base["tool_use"] is base_tools and base["rows"] == train and base["init"] == "/out/init"
        assert base["steps"] == cfg.demo.base_steps
        for job, dom in zip(experts, cfg.data.domains):
            assert job["tool_use"] and job["init"] == "/out/student_base" and job["steps"] == cfg.demo.teacher_steps
            assert {r["domain"] for r in job["rows"]} == {dom}

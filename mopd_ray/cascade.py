"""The cascade: a sequential pipeline forgets, MOPD from its stage checkpoints recovers.
``python -m mopd_ray.cascade [Hydra overrides]`` (``experiment=cascade`` unless another is named).

As GLM-5 and Nemotron-Cascade 2 use MOPD:
1. Bootstrap (cached, the demonstration's): a weak base student and one specialist per domain.
2. Stages (``cascade.stages``), in order, each from the previous stage's final student, each trained on
   its own domains only: by on-policy distillation from the stage's teacher, or by GRPO on the domains'
   rewards when it names none. Every stage's final student is exported and measured on every domain:
   what the pipeline learned and what it forgot along the way.
3. Recovery: MOPD from the last stage's student, the teacher of each domain being the checkpoint of the
   stage that trained it (by the stage's name), once per signal (``cascade.signals``) and per weight of
   the ``self`` teacher (``cascade.self_weights``), repeated over ``cascade.run_seeds``; beside it
   reward-only GRPO from the same student. The teachers are close to the student here (grown from it),
   which is the setting the sampled-token signal is used in.
4. results.md / results.json / accuracy.png in the output folder. Every run is resumable (a run that
   finished with the same config is reused), so an interrupted cascade continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from .config import check_cascade, compose_config, to_container
from .demo import cell, command_line, run_identity, run_variants, spread

log = logging.getLogger("mopd_ray.cascade")


def _compose(overrides: list):
    return compose_config(overrides if _chosen(overrides) else ["experiment=cascade", *overrides])


def _quote(path) -> str:
    return str(path).replace("'", "\\'")


def stage_overrides(cfg, index: int, init_path: str, out: Path) -> list:
    """Hydra overrides of stage ``index``'s run: its domains only, from ``init_path``, its own teacher."""
    st = cfg.cascade.stages[index]
    o = [f"model.path='{_quote(init_path)}'", f"data.domains=[{','.join(st.domains)}]",
         f"run.total_steps={st.steps}", f"run.checkpoint_dir='{_quote(out / st.name / 'checkpoints')}'",
         "teachers=empty"]
    if st.teacher is not None:
        t = cfg.teachers.models[st.teacher]
        o += [f"teachers.models.{st.teacher}.{k}={v}" for k, v in to_container(t).items()
              if k in ("model_path", "backend", "dtype", "max_model_len") and v is not None]
        o += [f"teachers.routing.{dom}={st.teacher}" for dom in st.domains]
    else:
        o += grpo_overrides(cfg)
    return [*o, *st.overrides]


def grpo_overrides(cfg) -> list:
    """Reward-only GRPO, as the demonstration's baseline: the same rows a step, 4 samples per prompt."""
    cells = cfg.learner.world_size * cfg.learner.mini_batches_per_step
    prompts = max(cells, cfg.data.prompts_per_step // 4 // cells * cells)
    return ["algorithm.signal=none", "algorithm.alpha=1.0", f"data.prompts_per_step={prompts}",
            "rollout.n_samples_per_prompt=4", *cfg.demo.grpo_overrides]


def pool_overrides(cfg, members: list) -> list:
    """``members`` served by the pool ``teachers.pools.cascade`` (cascade.teacher_pool); one replica unless
    the user's overrides define the pool (their settings then apply)."""
    defined = "cascade" in cfg.teachers.pools
    return [*([] if defined else ["teachers.pools.cascade.replicas=1"]),
            *(f"teachers.models.{m}.pool=cascade" for m in members)]


def recovery_variants(cfg, student: str, stage_dirs: dict) -> list:
    """(name, overrides) of the recovery runs: MOPD per signal and self weight, and the GRPO baseline."""
    cc = cfg.cascade
    common = [f"model.path='{_quote(student)}'", f"run.total_steps={cc.recovery_steps}", "teachers=empty"]
    common += [f"teachers.models.{st.name}.model_path='{_quote(stage_dirs[st.name])}'" for st in cc.stages]
    out = []
    for sig in cc.signals:
        for w in cc.self_weights:
            routes = []
            for st in cc.stages:
                for dom in st.domains:
                    routes.append(f"teachers.routing.{dom}={st.name}" if w == 0 else
                                  f"teachers.routing.{dom}=[{{teacher:{st.name},weight:1.0}},{{teacher:self,weight:{w}}}]")
            extra = ["teachers.models.self.weight=1.0"] if w > 0 else []
            if cc.teacher_pool:
                extra += pool_overrides(cfg, [*(st.name for st in cc.stages), *(["self"] if w > 0 else [])])
            name = f"recover_{sig}" + (f"_self{w:g}" if w > 0 else "")
            out.append((name, [*common, *extra, *routes, f"algorithm.signal={sig}", *cc.signal_overrides.get(sig, [])]))
    if cc.grpo_baseline:
        out.append(("grpo_rewards_only", [f"model.path='{_quote(student)}'", f"run.total_steps={cc.recovery_steps}",
                                          "teachers=empty", *grpo_overrides(cfg)]))
    return out


def run_stages(overrides: list, cfg, base: str, out: Path) -> tuple[dict, dict]:
    """Train the stages in order into out/stages/<name>/; returns (student folder per stage, accuracy of
    the base and of every stage's student on every domain, cached in out/stages/accuracy.json)."""
    from .bootstrap import held_out_accuracy

    sdir = out / "stages"
    paths, identities, init = {}, [], base
    for i, st in enumerate(cfg.cascade.stages):
        extra = stage_overrides(cfg, i, init, sdir)
        run_variants(overrides, [(st.name, extra)], sdir)
        init = str(sdir / st.name / "student_final")
        paths[st.name] = init
        vcfg = _compose([*overrides, *extra, f"run.name={st.name}"])
        identities.append(run_identity(vcfg))
    cache = sdir / "accuracy.json"
    if cache.exists():
        done = json.loads(cache.read_text())
        if done.get("identities") == identities:
            return paths, done["accuracy"]
    log.info("cascade: measuring the base student and every stage's student on every domain")
    accuracy = held_out_accuracy(cfg, {"student_base": base, **paths})
    cache.write_text(json.dumps({"identities": identities, "accuracy": accuracy}, indent=1))
    return paths, accuracy


def _chosen(overrides: list) -> bool:
    return any(o.lstrip("+~").startswith("experiment=") for o in overrides)


def summarize(cfg, manifest: dict, stage_acc: dict, runs: dict) -> dict:
    """Per-domain accuracy of the specialists, the base, every stage, and each recovery run (mean over
    seeds and half the min-max range), plus what the pipeline lost and what recovery regained."""
    domains = list(cfg.data.domains)
    stages = cfg.cascade.stages
    # each domain's best: the stage that trained it, at its end
    trained = {dom: stage_acc[st.name][dom] for st in stages for dom in st.domains}
    last = stage_acc[stages[-1].name]
    rows = {f"teacher_{d}": manifest["accuracy"].get(f"teacher_{d}", {}) for d in domains}
    rows["student_base"] = stage_acc["student_base"]
    rows.update({f"after_{st.name}": stage_acc[st.name] for st in stages})
    by_name: dict = {}
    for (seed, name), r in runs.items():
        final = r["eval"][-1] if r["eval"] else {}
        by_name.setdefault(name, {}).setdefault("seeds", {})[seed] = {
            d: final.get(f"eval/{d}/accuracy") for d in domains}
        by_name[name].setdefault("step_s", []).append(r["step_s"])
    recovery = {}
    for name, r in by_name.items():
        per = {}
        for d in domains:
            mean, half, n = spread([s[d] for s in r["seeds"].values()])
            per[d] = {"mean": mean, "pm": half, "n": n}
        recovery[name] = {"domains": per, "seeds": r["seeds"], "step_s": statistics.mean(r["step_s"])}
    return {"domains": domains, "fixed": rows, "stage_trained": trained, "after_pipeline": last,
            "forgotten": {d: trained[d] - last[d] for d in domains}, "recovery": recovery,
            "run_seeds": list(cfg.cascade.run_seeds)}


def markdown(summary: dict, cfg) -> str:
    domains = summary["domains"]
    cc = cfg.cascade
    how = "; ".join(f"{st.name}: {'+'.join(st.domains)}, "
                    + (f"distilled from {st.teacher}" if st.teacher else "GRPO") + f", {st.steps} steps"
                    for st in cc.stages)
    lines = [f"Held-out greedy accuracy (%). Stages trained one after another on their own domains ({how}); "
             f"recovery runs {cc.recovery_steps} steps from the last stage's student, mean +- half the range over "
             f"run seeds {list(cc.run_seeds)}.", "",
             "| model | " + " | ".join(domains) + " | mean |", "|" + "---|" * (len(domains) + 2)]
    for name, acc in summary["fixed"].items():
        vals = [acc.get(d) for d in domains]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals)
                     + f" | {100 * sum(v or 0 for v in vals) / len(vals):.1f} |")
    for name, r in summary["recovery"].items():
        cells = [cell(r["domains"][d]["mean"], r["domains"][d]["pm"], r["domains"][d]["n"]) for d in domains]
        means = [r["domains"][d]["mean"] for d in domains if r["domains"][d]["mean"] is not None]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * sum(means) / max(len(means), 1):.1f} |")
    lines += ["", "forgotten by the pipeline (end of the stage that trained it -> after the last stage): "
              + ", ".join(f"{d} {100 * summary['stage_trained'][d]:.1f} -> {100 * summary['after_pipeline'][d]:.1f}"
                          for d in domains)]
    return "\n".join(lines)


def plot(summary: dict, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = summary["domains"]
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), sharey=True)
    names = sorted({name for _, name in runs})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for ax, dom in zip(axes, domains):
        for (seed, name), r in sorted(runs.items()):
            pts = [(e["step"], e.get(f"eval/{dom}/accuracy")) for e in r["eval"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, c=colors[name], alpha=0.8,
                    label=name if seed == summary["run_seeds"][0] else None)
        ax.axhline(summary["stage_trained"][dom], ls="--", c="k", lw=1, label="stage teacher")
        ax.axhline(summary["after_pipeline"][dom], ls=":", c="grey", lw=1, label="after the pipeline")
        ax.set_title(f"{dom}: recovery from the last stage")
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("held-out greedy accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def max_cpus(cfg, overrides: list) -> float:
    """The most CPUs any run of the cascade asks for (the local Ray is started once, for all of them)."""
    from .config import resource_demand

    dirs = {st.name: f"/{st.name}" for st in cfg.cascade.stages}
    runs = [stage_overrides(cfg, i, "/init", Path("/stages")) for i in range(len(cfg.cascade.stages))]
    runs += [o for _, o in recovery_variants(cfg, "/student", dirs)]
    return max(resource_demand(_compose([*overrides, *o]))["CPU"] for o in runs)


def run_cascade(overrides: list) -> dict:
    from .demo import prepare

    overrides = overrides if _chosen(overrides) else ["experiment=cascade", *overrides]
    cfg = _compose(overrides)
    check_cascade(cfg)  # before the bootstrap: a bad stage list fails in seconds
    cfg, out, manifest = prepare(overrides, cpus=max_cpus(cfg, overrides))
    base = manifest["paths"]["student_base"]
    t0 = time.time()
    stage_dirs, stage_acc = run_stages(overrides, cfg, base, out)
    student = stage_dirs[cfg.cascade.stages[-1].name]
    runs = {}
    for seed in cfg.cascade.run_seeds:
        got = run_variants(overrides, [(n, [*o, f"run.seed={seed}"]) for n, o in recovery_variants(cfg, student, stage_dirs)],
                           out / f"seed{seed}")
        runs.update({(seed, name): r for name, r in got.items()})
    summary = summarize(cfg, manifest, stage_acc, runs)
    summary["command"] = "python -m mopd_ray.cascade " + " ".join(overrides)
    summary["wall_s"] = time.time() - t0
    table = markdown(summary, cfg)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"summary": summary, "runs": {f"seed{s}/{n}": r for (s, n), r in runs.items()}}, indent=1))
    plot(summary, runs, out / "accuracy.png")
    print("\n" + table)
    print(f"\nresults: {out}/results.md, {out}/results.json, {out}/accuracy.png")
    return summary


def main() -> None:
    command_line(run_cascade)


if __name__ == "__main__":
    main()

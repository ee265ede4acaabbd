"""The demonstration: does MOPD merge the experts? ``python -m mopd_ray.demo [Hydra overrides]``.

1. Bootstrap (cached): a weak base student and one specialist teacher per domain (mopd_ray.bootstrap).
2. Runs, each from the same base student for the same number of steps, through the same runtime:
   - MOPD with all domain teachers, once per signal in ``demo.signals`` (topk, full_vocab, sampled);
   - single-teacher on-policy distillation: every prompt to one domain expert (the seesaw baseline);
   - GRPO with verifiable rewards only (no teacher).
3. A table (results.md), the figures (results.json) and a plot (accuracy.png) of held-out per-domain
   greedy accuracy over steps, with each teacher's accuracy on its own domain as the bar to reach.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

from .config import compose_config, route_of, validate

log = logging.getLogger("mopd_ray.demo")


def _compose(overrides: list):
    """The demo config: experiment=demo (the quick default) unless the overrides pick another experiment."""
    chosen = any(o.lstrip("+~").startswith("experiment=") for o in overrides)
    return compose_config(overrides if chosen else ["experiment=demo", *overrides])


def variants(cfg) -> list:
    """(name, overrides) of every run the demonstration compares."""
    d = cfg.demo
    out = [(f"mopd_{s}", [f"algorithm.signal={s}", *d.signal_overrides.get(s, [])]) for s in d.signals]
    if d.baselines:
        sig = d.single_teacher_signal or d.signals[0]
        expert = route_of(cfg, d.single_teacher)[0][0]  # the domain's (first) teacher
        route_all = [f"teachers.routing.{dom}={expert}" for dom in cfg.data.domains]
        out.append((f"single_teacher_{d.single_teacher}",
                    [f"algorithm.signal={sig}", *d.signal_overrides.get(sig, []), *route_all]))
        cells = cfg.learner.world_size * cfg.learner.mini_batches_per_step  # whole prompts per rank
        prompts = max(cells, cfg.data.prompts_per_step // 4 // cells * cells)
        groups = [f"data.prompts_per_step={prompts}", "rollout.n_samples_per_prompt=4"]
        out.append(("grpo_rewards_only", ["algorithm.signal=none", "algorithm.alpha=1.0", *groups,
                                          *d.grpo_overrides]))
    return out


def _read_jsonl(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def merge_seeds(runs_by_seed: dict) -> dict:
    """One entry per run name from {seed: {name: run}}: the eval curve averaged over seeds (step by
    step), mean step time, total wall time, and ``seeds``: each seed's final eval."""
    merged: dict = {}
    for seed, runs in runs_by_seed.items():
        for name, r in runs.items():
            m = merged.setdefault(name, {"curves": [], "step_s": [], "wall_s": 0.0, "seeds": {},
                                         "overrides": r.get("overrides")})
            m["curves"].append(r["eval"])
            m["step_s"].append(r["step_s"])
            m["wall_s"] += r["wall_s"]
            m["seeds"][seed] = r["eval"][-1] if r["eval"] else {}
    for m in merged.values():
        curves = m.pop("curves")
        steps = sorted(set.intersection(*[{e["step"] for e in c} for c in curves])) if curves else []
        m["eval"] = []
        for st in steps:
            at = [next(e for e in c if e["step"] == st) for c in curves]
            keys = set.intersection(*[{k for k, v in e.items() if isinstance(v, (int, float))} for e in at])
            m["eval"].append({k: (st if k == "step" else statistics.mean(e[k] for e in at)) for k in keys})
        m["step_s"] = statistics.mean(m["step_s"])
    return merged


def spread(values: list) -> tuple:
    """(mean, half the min-max range, n) of the values that are not None; (None, None, 0) if none are."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0, len(vals)


def cell(mean, half, n) -> str:
    """A table cell in percent: the mean, and +- half the range over seeds when there are several."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" +- {100 * half:.1f}" if n > 1 else "")


def summarize(manifest: dict, runs: dict, domains: list) -> dict:
    """Final per-domain accuracy of every run (the mean over seeds for merged runs), the teachers, the
    base student; MOPD vs teachers; ``spread``: half the min-max range over seeds and their number."""
    teacher_acc = {dom: manifest["accuracy"][f"teacher_{dom}"][dom] for dom in domains}
    table = {f"teacher_{dom}": manifest["accuracy"][f"teacher_{dom}"] for dom in domains}
    table["student_before"] = manifest["accuracy"]["student_base"]
    spreads = {}
    for name, r in runs.items():
        finals = list(r["seeds"].values()) if "seeds" in r else [r["eval"][-1] if r["eval"] else {}]
        stats = {dom: spread([f.get(f"eval/{dom}/accuracy") for f in finals]) for dom in domains}
        table[name] = {dom: stats[dom][0] for dom in domains}
        spreads[name] = {dom: {"pm": stats[dom][1], "n": stats[dom][2]} for dom in domains}
    reached = {name: {dom: (table[name][dom] or 0.0) / max(teacher_acc[dom], 1e-9) for dom in domains}
               for name in runs}
    return {"teacher_on_own_domain": teacher_acc, "final_accuracy": table, "fraction_of_teacher": reached,
            "spread": spreads, "step_s": {name: r["step_s"] for name, r in runs.items()},
            "wall_s": {name: r["wall_s"] for name, r in runs.items()}}


def markdown_table(summary: dict, domains: list, steps: int, seed: int, run_seed="0") -> str:
    many = isinstance(run_seed, str) and "," in run_seed
    head = (f"| model ({steps} steps, bootstrap seed {seed}, run seed{'s' if many else ''} {run_seed}"
            + (", mean +- half the range" if many else "") + ") | " + " | ".join(domains)
            + " | mean | step time |")
    lines = [head, "|" + "---|" * (len(domains) + 3)]
    for name, accs in summary["final_accuracy"].items():
        vals = [accs.get(d) for d in domains]
        mean = sum(v or 0.0 for v in vals) / len(vals)
        st = summary["step_s"].get(name)
        sp = summary.get("spread", {}).get(name, {})
        lines.append(f"| {name} | " + " | ".join(cell(v, sp.get(d, {}).get("pm"), sp.get(d, {}).get("n", 1))
                                                for d, v in zip(domains, vals))
                     + f" | {100 * mean:.1f} | " + ("-" if st is None else f"{st:.2f} s") + " |")
    return "\n".join(lines)


def plot(runs: dict, summary: dict, domains: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), sharey=True)
    for ax, dom in zip(axes, domains):
        for name, r in runs.items():
            pts = [(e["step"], e.get(f"eval/{dom}/accuracy")) for e in r["eval"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        t = summary["teacher_on_own_domain"][dom]
        ax.axhline(t, ls="--", c="k", lw=1, label=f"teacher_{dom}")
        ax.axhline(0.9 * t, ls=":", c="grey", lw=1, label="90% of teacher")
        ax.set_title(f"{dom}: held-out greedy accuracy")
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Settings that change how a run is shown or where it writes, not what it computes.
_PRESENTATION = {"logging": ("progress_bar", "wandb_mode", "project", "entity"),
                 "cluster": ("include_dashboard", "dashboard_host", "placement_timeout_s", "call_timeout_s"),
                 "run": ("output_dir",)}


def run_identity(vcfg) -> dict:
    """The resolved config of one run minus the demo and cascade sections (which runs to compare, not how one runs)
    and presentation settings: two runs with equal identities compute the same thing."""
    from .config import to_container

    c = to_container(vcfg)
    c.pop("demo", None)
    c.pop("cascade", None)
    for section, keys in _PRESENTATION.items():
        for k in keys:
            c.get(section, {}).pop(k, None)
    return c


def finished_run(run_dir: Path, extra: list) -> dict | None:
    """The eval curve and timings of a run that finished in run_dir (None if it did not)."""
    record = run_dir / "run.json"
    if not record.exists():
        return None
    done = json.loads(record.read_text())
    return {"eval": _read_jsonl(run_dir / "eval.jsonl"), "wall_s": done["wall_s"], "step_s": done["step_s"],
            "overrides": extra}


def run_variants(overrides: list, runs_to_do: list, out: Path) -> dict:
    """Run every (name, extra overrides) into out/<name>/, each from the same base student.

    A run that already finished with the same resolved config (out/<name>/run.json, see run_identity)
    is reused, so an interrupted demonstration or study continues where it stopped instead of starting
    again, and a changed setting reruns exactly the runs it changes.
    """
    from .orchestrator import Orchestrator

    runs = {}
    for name, extra in runs_to_do:
        vcfg = _compose([*overrides, *extra, f"run.name={name}"])
        validate(vcfg)
        run_dir = out / name
        record = run_dir / "run.json"
        want = {"config": run_identity(vcfg)}
        if record.exists():
            done = json.loads(record.read_text())
            if done.get("config") == want["config"]:
                log.info("demo: run %s already finished in %s; reusing it", name, run_dir)
                runs[name] = finished_run(run_dir, extra)
                continue
            log.info("demo: %s holds a run with another config; running %s again", record, name)
            record.unlink()
        if run_dir.exists():  # an unfinished attempt: its logs would mix with the new run's
            for f in ("metrics.jsonl", "eval.jsonl"):
                (run_dir / f).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("demo: run %s (%s)", name, " ".join(extra))
        t0 = time.time()
        Orchestrator(vcfg, str(run_dir)).run()
        steps = _read_jsonl(run_dir / "metrics.jsonl")
        runs[name] = {"eval": _read_jsonl(run_dir / "eval.jsonl"), "wall_s": time.time() - t0,
                      "step_s": sum(s["step_s"] for s in steps[1:]) / max(len(steps) - 1, 1), "overrides": extra}
        record.write_text(json.dumps({**want, "overrides": [*overrides, *extra], "wall_s": runs[name]["wall_s"],
                                      "step_s": runs[name]["step_s"]}))
    return runs


def write_report(out: Path, manifest: dict, runs: dict, domains: list, steps: int, seed: int,
                 command: str, run_seed="0") -> dict:
    summary = summarize(manifest, runs, domains)
    summary["command"] = command
    summary["bootstrap_s"] = manifest["seconds"]
    summary["seeds"] = {"bootstrap (demo.seed)": seed, "run (run.seed)": run_seed}
    table = markdown_table(summary, domains, steps, seed, run_seed)
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    (out / "results.md").write_text(table + "\n")
    plot(runs, summary, domains, out / "accuracy.png")
    print("\n" + table)
    print("\nreached, as a fraction of each teacher's accuracy on its own domain:")
    for name, fr in summary["fraction_of_teacher"].items():
        print(f"  {name:<28} " + "  ".join(f"{d} {100 * v:.0f}%" for d, v in fr.items()))
    print(f"\nresults: {out}/results.md, {out}/results.json, {out}/accuracy.png")
    return summary


def prepare(overrides: list, cpus: float | None = None):
    """Compose and validate the demo config, start Ray (with ``cpus``, else what this config's roles ask
    for), bootstrap (cached); returns (cfg, out, manifest)."""
    from .bootstrap import bootstrap
    from .cluster import init_ray
    from .config import resource_demand

    cfg = _compose(overrides)
    validate(cfg)
    out = Path(cfg.run.output_dir if cfg.run.output_dir != "." else f"outputs/demo/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.cluster, max(cpus or 0.0, resource_demand(cfg)["CPU"]))
    return cfg, out, bootstrap(cfg)


def run_demo(overrides: list) -> dict:
    cfg, out, manifest = prepare(overrides)
    seeds = list(cfg.demo.run_seeds)
    if seeds:
        runs = merge_seeds({s: run_variants([*overrides, f"run.seed={s}"], variants(cfg), out / f"seed{s}")
                            for s in seeds})
    else:
        runs = run_variants(overrides, variants(cfg), out)
    return write_report(out, manifest, runs, list(cfg.data.domains), cfg.run.total_steps, cfg.demo.seed,
                        "python -m mopd_ray.demo " + " ".join(overrides),
                        ", ".join(map(str, seeds)) if seeds else cfg.run.seed)


def command_line(run) -> None:
    """``run(sys.argv[1:])`` with the quiet console (unless logging.verbose=true); a configuration
    error is logged and exits 2."""
    from .config import ConfigError
    from .console import configure, skip_exit_collection

    configure(any(o.strip() in ("logging.verbose=true", "logging.verbose=True") for o in sys.argv[1:]))
    try:
        run(sys.argv[1:])
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    finally:
        skip_exit_collection()


def main() -> None:
    command_line(run_demo)


if __name__ == "__main__":
    main()

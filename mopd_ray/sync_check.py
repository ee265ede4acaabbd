"""After every weight sync: the rollout engines serve the weights the learner trained.

A sync can complete without error and still leave an engine on other weights: a layer whose tensors
arrive under a name the engine does not map, a tied head or a prepacked kernel that vLLM's reload does
not process again (found here: Gemma 3 and tied Qwen3 heads, Qwen3-MoE experts on CPU). The rollouts
would then come from a policy the learner never trained, and the mismatch gate would absorb the
difference as off-policy noise. So after every sync the engines and the learner score the pre-flight's
probe sequences (three short student-rendered conversations), and a mean difference above the
tolerance stops the run with the engine modules that received no or part of their tensors.

Cost per sync: one forward of the probe on every learner rank and one prompt-log-prob request per
engine (milliseconds at the probe's ~60 tokens).
"""

from __future__ import annotations

import time

from .preflight import gap, tolerance


class WeightSyncCheckError(RuntimeError):
    pass


def check_engines(cfg, learners, rollout, version: int) -> dict:
    """Compare every rollout engine with the learner on the probe. Returns {"probe_gap", "check_s"};
    raises WeightSyncCheckError naming the replica, the gap and the modules that did not load."""
    t0 = time.perf_counter()
    probes = getattr(rollout, "sync_probes", None)
    if probes is None:
        probes = rollout.sync_probes = rollout.gather([rollout.call(0, "probe_sequences")], "probe sequences")[0]
    learner_refs = learners.call_all("compute_logprobs", probes, 1.0)  # collective under ZeRO-3
    reports = rollout.gather(rollout.call_all("sync_report", probes), "post-sync probe (rollout)")
    learner = learners.gather(learner_refs, "post-sync probe (learner)")[0]
    ro = cfg.rollout
    tol = ro.weight_sync_check_tolerance
    tol = tolerance(cfg, ro.dtype, cfg.learner.dtype) if tol is None else float(tol)
    worst = 0.0
    for i, rep in enumerate(reports):
        mean, mx = gap(rep["logprobs"], learner)
        worst = max(worst, mean)
        if mean > tol:
            raise WeightSyncCheckError(_message(i, version, mean, mx, tol, rep))
    return {"probe_gap": worst, "check_s": time.perf_counter() - t0}


def _message(replica: int, version: int, mean: float, mx: float, tol: float, rep: dict) -> str:
    incomplete = rep.get("incomplete") or []
    if incomplete:
        shown = ", ".join(f"{n} ({got}/{want} elements)" for n, got, want in incomplete[:8])
        more = f" and {len(incomplete) - 8} more" if len(incomplete) > 8 else ""
        where = f"engine modules that did not receive all their tensors: {shown}{more}"
    else:
        where = ("every engine module received its tensors, so a layer's post-load processing differs from the "
                 "start-up load (a fused, packed or tied layer that vLLM does not process again on a reload)")
    return (f"after weight sync {version}, rollout replica {replica} ({rep.get('architecture', '?')}) does not serve "
            f"the learner's weights: their log-probs of the probe sequences differ by {mean:.3g} nats per token on "
            f"average (max {mx:.3g}; tolerance {tol:g}); {where}. Rollouts would come from a policy the learner never "
            "trained. See README 'Supported models' for this architecture; rollout.weight_sync=object_store takes "
            "another load path; raise rollout.weight_sync_check_tolerance if the difference is understood "
            "(rollout.check_weight_sync=false turns the check off)")

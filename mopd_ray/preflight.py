"""Pre-flight checks of teachers and the student, after the engines are up and before step 0.

Each check either fails with a message naming the teacher (and replica), what differs and the fix,
or the run starts with one summary line:

- tokenizer: equal token-to-id maps, vocabulary padding reported (models/compat.py);
- end of turn: the student and every teacher end a response with the same ids (a base student with
  an instruct teacher ran away in length: ms-swift #9526);
- chat template: prompts are rendered once with the *student's* template and every teacher scores
  exactly those ids; a teacher folder whose own template renders a probe conversation differently
  fails (renderer mismatch: tinker-cookbook #796), unless the teacher says it was trained on the
  student's format (``skip_checks=[template]``);
- log-prob probe: a few fixed sequences scored by every teacher replica's engine agree with a
  transformers forward of the teacher's folder and with the other replicas (replicas that disagreed
  by more than the distillation signal: SkyRL #2256), and the student's rollout engines agree with the
  learner.
"""

from __future__ import annotations

import logging

import numpy as np

from .models.compat import TokenizerMismatchError, check_compatible

log = logging.getLogger(__name__)

PROBES = (("What is 12 + 30?", "42"), ("Sort the digits 9 1 5 3.", "1359"), ("Reverse 'delta'.", "atled"))


class PreflightError(RuntimeError):
    pass


def probe_sequences(tokenizer, stop_ids: list) -> list:
    """Student-rendered probe prompts, each with a short response and the student's end-of-turn id."""
    from .data.prompts import render

    end = stop_ids[:1]
    return [render(tokenizer, q) + tokenizer(a, add_special_tokens=False)["input_ids"] + end for q, a in PROBES]


def gap(a: list, b: list) -> tuple:
    """(mean, max) |difference| of two sets of per-token log-probs, over positions 1.. of each sequence."""
    d = np.concatenate([np.abs(np.asarray(x[1:], np.float64) - np.asarray(y[1:], np.float64)) for x, y in zip(a, b)])
    return float(d.mean()), float(d.max())


def tolerance(cfg, *dtypes: str) -> float:
    tol = cfg.teachers.preflight.logprob_tolerance
    if tol is not None:
        return float(tol)
    return 1e-3 if all(d == "float32" for d in dtypes) else 5e-2


def run(cfg, roles, student_fp: dict, tokenizer) -> str:
    """Every check; returns the summary line, raises TokenizerMismatchError / PreflightError."""
    from .roles import teacher_model_path

    notes, worst = [], {"reference": 0.0, "replicas": 0.0}
    skipped_ref = []
    probes = probe_sequences(tokenizer, student_fp["stop_ids"] or [tokenizer.eos_token_id])
    probe_on = cfg.teachers.preflight.enabled
    for name, group in roles.teachers.items():
        t = cfg.teachers.models[name]
        label = f"{name} ({teacher_model_path(cfg, name)})"
        fp = group.gather(group.call(0, "fingerprint"), "fingerprint")
        notes += check_compatible(student_fp, cfg.model.path, fp, label, t.skip_checks)
        if t.skip_checks:
            notes.append(f"{name}: skipped {', '.join(t.skip_checks)} (teachers.models.{name}.skip_checks)")
        if not probe_on or "probe" in t.skip_checks:
            continue
        max_bytes = int(cfg.teachers.preflight.reference_max_gb * 2**30)
        scored = group.gather([group.call(i, "probe_logprobs", probes) for i in range(len(group))], "probe_logprobs")
        ref = group.gather(group.call(0, "reference_logprobs", probes, max_bytes), "reference_logprobs")
        tol = tolerance(cfg, t.dtype)
        if isinstance(ref, str):
            skipped_ref.append(f"{name}: {ref}")
        else:
            for i, lp in enumerate(scored):
                mean, mx = gap(lp, ref)
                worst["reference"] = max(worst["reference"], mean)
                if mean > tol:
                    raise PreflightError(
                        f"teacher '{name}' replica {i}: its engine's log-probs of the probe sequences differ from a "
                        f"transformers forward of {teacher_model_path(cfg, name)} by {mean:.3g} nats per token on "
                        f"average (max {mx:.3g}; tolerance {tol:g}, teachers.preflight.logprob_tolerance): the "
                        "engine does not serve the folder's model (weights loaded wrong, another dtype or "
                        f"quantisation, a kernel bug). Check teachers.models.{name} (dtype, backend) and that "
                        "replica's node, or raise the tolerance if the difference is understood")
        for i in range(1, len(scored)):
            mean, mx = gap(scored[i], scored[0])
            worst["replicas"] = max(worst["replicas"], mean)
            if mean > tol:
                raise PreflightError(
                    f"teacher '{name}' replica {i} disagrees with replica 0 by {mean:.3g} nats per token on the probe "
                    f"sequences (max {mx:.3g}; tolerance {tol:g}): the replicas do not serve the same model, so the "
                    "distillation signal would depend on which replica scored a row (SkyRL #2256). Check that "
                    f"replica's node (weights, dtype, GPU), or remove it (teachers.models.{name}.replicas)")
    student = ""
    if probe_on:
        engines = roles.rollout.gather(roles.rollout.call_all("score_logprobs", probes), "score_logprobs")
        learner = roles.learners.gather(roles.learners.call_all("compute_logprobs", probes), "compute_logprobs")[0]
        tol = tolerance(cfg, cfg.rollout.dtype, cfg.learner.dtype)
        gaps = [gap(e, learner) for e in engines]
        for i, (mean, mx) in enumerate(gaps):
            if mean > tol:
                raise PreflightError(
                    f"the student's rollout replica {i} and the learner disagree on the probe sequences by {mean:.3g} "
                    f"nats per token (max {mx:.3g}; tolerance {tol:g}): rollouts would be off-policy from the first "
                    "step. Check rollout.dtype / learner.dtype and model.path, or raise "
                    "teachers.preflight.logprob_tolerance if the difference is understood")
        student = f", student engine vs learner {max(m for m, _ in gaps):.1e}"
    n_rep = sum(len(g) for g in roles.teachers.values())
    line = (f"pre-flight: {len(roles.teachers)} teacher(s), {n_rep} replica(s): vocabularies, end-of-turn ids "
            f"{student_fp['stop_ids']} and chat templates equal")
    if probe_on:
        line += (f"; probe log-probs agree (mean |diff| per token: vs transformers {worst['reference']:.1e}, "
                 f"between replicas {worst['replicas']:.1e}{student})")
    for extra in notes + [f"no transformers reference for {s}" for s in skipped_ref]:
        line += f"; {extra}"
    return line


__all__ = ["PreflightError", "TokenizerMismatchError", "run", "probe_sequences", "gap", "tolerance"]

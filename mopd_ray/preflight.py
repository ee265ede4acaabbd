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
import time

import numpy as np

from .models.compat import TokenizerMismatchError, architecture_of, check_compatible

log = logging.getLogger(__name__)

PROBES = (("What is 12 + 30?", "42"), ("Sort the digits 9 1 5 3.", "1359"), ("Reverse 'delta'.", "atled"))


class PreflightError(RuntimeError):
    pass


def probe_sequences(tokenizer, stop_ids: list) -> list:
    """Student-rendered probe prompts, each with a short response and the student's end-of-turn id."""
    from .data.prompts import render

    end = stop_ids[:1]
    ids = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    probes = [render(tokenizer, q) + ids(a) + end for q, a in PROBES]
    return probes + multi_turn_probe(tokenizer, stop_ids, ids)


def multi_turn_probe(tokenizer, stop_ids: list, ids) -> list:
    """A conversation with a tool turn, as multi-turn rollouts build it (mopd_ray/envs/chat.py): the student's
    ids as generated and the tool turn appended; none when the template has no tool role."""
    from .envs.chat import ChatTemplateError, TurnRenderer

    try:
        turn = TurnRenderer(tokenizer, stop_ids).turn_ids([{"role": "tool", "content": "42"}])
    except ChatTemplateError:
        return []
    end = stop_ids[:1]
    from .data.prompts import render

    return [render(tokenizer, PROBES[0][0]) + ids("calc(12,30)") + end + turn + ids("42") + end]


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
    t0 = time.perf_counter()
    probes = probe_sequences(tokenizer, student_fp["stop_ids"] or [tokenizer.eos_token_id])
    on = cfg.teachers.preflight.enabled
    # every engine call at once (they answer in parallel), then each check in turn
    student_refs = (roles.rollout.call_all("score_logprobs", probes),
                    roles.learners.call_all("compute_logprobs", probes, 1.0)) if on else None
    found = check_teachers(cfg, roles.teachers, student_fp, probes)
    groups = list({id(g): g for g in roles.teachers.values()}.values())  # a pool counted once
    line = (f"pre-flight: {len(roles.teachers)} teacher(s), {sum(len(g) for g in groups)} "
            f"replica(s): vocabularies, end-of-turn ids {student_fp['stop_ids']} and chat templates equal")
    if on:
        student = check_student(cfg, roles, student_refs)
        line += (f"; probe log-probs agree (mean |diff| per token: vs transformers {found['reference']:.1e}, "
                 f"between replicas {found['replicas']:.1e}, student engine vs learner {student:.1e})")
    from .config import teacher_model_path
    from .models.compat import unverified

    trust = cfg.model.trust_remote_code
    notes = [unverified("the student", cfg.model.path, trust),
             *(unverified(f"teacher '{n}'", teacher_model_path(cfg, n), trust) for n in roles.teachers),
             packing_note(cfg, getattr(roles, "learner_setup", None))]
    for extra in [*found["notes"], *(n for n in notes if n)]:
        line += f"; {extra}"
    return line + f" ({time.perf_counter() - t0:.1f} s)"


def packing_note(cfg, learner_setup) -> str | None:
    """The learners' packing check (workers/packing.py): a student that does not pack trains on
    length-sorted padded micro-batches, and the summary says so."""
    ln = cfg.learner
    if not (ln.max_tokens_per_micro_batch and ln.packing and learner_setup) or learner_setup[0].get("packing"):
        return None
    return (f"the student's architecture does not pack rows into one sequence (packed vs padded hidden states differ "
            f"by {learner_setup[0].get('packing_gap', float('nan')):.1e} of their scale): its micro-batches are "
            "length-sorted and padded instead (learner.packing=false silences this)")


def check_teachers(cfg, teachers: dict, student_fp: dict, probes: list) -> dict:
    """Tokenizer, end-of-turn and template checks of every teacher, and the probe of each replica against
    a transformers forward of its folder and against replica 0. Returns the worst gaps and notes."""
    from .config import resolved_signal, teacher_model_path

    pf = cfg.teachers.preflight
    max_bytes = int(pf.reference_max_gb * 2**30)
    calls = {}
    for name, group in teachers.items():
        probe = pf.enabled and "probe" not in cfg.teachers.models[name].skip_checks
        full = probe and resolved_signal(cfg, name) == "full_vocab"
        calls[name] = (group.call(0, "fingerprint", name),
                       [group.call(i, "probe_logprobs", probes, name) for i in range(len(group))] if probe else None,
                       group.call(0, "reference_logprobs", probes, max_bytes, name) if probe else None,
                       group.call(0, "head_logprobs", probes, name) if full else None)
    from .models.compat import run_stop_ids

    run_stop = run_stop_ids(cfg)
    out = {"reference": 0.0, "replicas": 0.0, "notes": []}
    for name, group in teachers.items():
        t, path = cfg.teachers.models[name], teacher_model_path(cfg, name)
        fp_ref, probe_refs, ref_ref, head_ref = calls[name]
        out["notes"] += check_compatible(student_fp, cfg.model.path, group.gather(fp_ref, "fingerprint"),
                                         f"{name} ({path})", t.skip_checks, run_stop)
        if t.skip_checks:
            out["notes"].append(f"{name}: skipped {', '.join(t.skip_checks)} (teachers.models.{name}.skip_checks)")
        if probe_refs is None:
            continue
        scored = group.gather(probe_refs, "probe_logprobs")
        ref = group.gather(ref_ref, "reference_logprobs")
        tol = tolerance(cfg, t.dtype)
        if isinstance(ref, str):
            out["notes"].append(f"no transformers reference for {name}: {ref}")
        else:
            for i, lp in enumerate(scored):
                mean, mx = gap(lp, ref)
                out["reference"] = max(out["reference"], mean)
                if mean > tol:
                    raise PreflightError(
                        f"teacher '{name}' replica {i} ({architecture_of(path)}): its engine's log-probs of the probe "
                        "sequences differ from a "
                        f"transformers forward of {path} by {mean:.3g} nats per token on average (max {mx:.3g}; "
                        f"tolerance {tol:g}, teachers.preflight.logprob_tolerance): the engine does not serve the "
                        "folder's model (weights loaded wrong, another dtype or quantisation, a kernel bug). Check "
                        f"teachers.models.{name} (dtype, backend) and that replica's node, or raise the tolerance "
                        "if the difference is understood")
        if head_ref is not None:
            check_head(name, path, group.gather(head_ref, "head_logprobs"), scored[0], tolerance(cfg, "float32"), out)
        for i in range(1, len(scored)):
            mean, mx = gap(scored[i], scored[0])
            out["replicas"] = max(out["replicas"], mean)
            if mean > tol:
                raise PreflightError(
                    f"teacher '{name}' replica {i} disagrees with replica 0 by {mean:.3g} nats per token on the probe "
                    f"sequences (max {mx:.3g}; tolerance {tol:g}): the replicas do not serve the same model, so the "
                    "distillation signal would depend on which replica scored a row (SkyRL #2256). Check that "
                    f"replica's node (weights, dtype, GPU), or remove it (teachers.models.{name}.replicas)")
    return out


def check_head(name: str, path: str, rebuilt, engine: list, tol: float, out: dict) -> None:
    """A full-vocabulary teacher: the learner rebuilds its distribution from hidden states x the folder's head
    (and the family's logit post-processing); it must be the engine's own (Gemma 2's soft-cap, missed, gave
    a different teacher distribution with no error: issue 32)."""
    if isinstance(rebuilt, str):
        out["notes"].append(f"{name}: full-vocab head not compared ({rebuilt})")
        return
    mean, mx = gap(rebuilt, engine)
    out["head"] = max(out.get("head", 0.0), mean)
    if mean > tol:
        raise PreflightError(
            f"teacher '{name}' ({architecture_of(path)}): the full-vocabulary distribution the learner rebuilds (its "
            "last hidden states x the "
            f"output head of {path}, with the logit scale / soft-cap of its config.json) differs from its engine's "
            f"log-probs by {mean:.3g} nats per token on the probe (max {mx:.3g}; tolerance {tol:g}): its architecture "
            "transforms the logits after the head in a way the project does not apply, so the loss would distil "
            f"another distribution. Use teachers.models.{name}.signal=topk (or sampled) for this teacher")


def check_student(cfg, roles, refs) -> float:
    """The student's rollout engines against the learner on the probe; returns the worst mean gap."""
    engines = roles.rollout.gather(refs[0], "score_logprobs")
    learner = roles.learners.gather(refs[1], "compute_logprobs")[0]  # collective under ZeRO-3: every rank ran
    tol = tolerance(cfg, cfg.rollout.dtype, cfg.learner.dtype)
    worst = 0.0
    for i, e in enumerate(engines):
        mean, mx = gap(e, learner)
        worst = max(worst, mean)
        if mean > tol:
            raise PreflightError(
                f"the student's rollout replica {i} and the learner ({architecture_of(cfg.model.path)}) disagree on "
                f"the probe sequences by {mean:.3g} "
                f"nats per token (max {mx:.3g}; tolerance {tol:g}): rollouts would be off-policy from the first "
                "step. Check rollout.dtype / learner.dtype and model.path, or raise "
                "teachers.preflight.logprob_tolerance if the difference is understood")
    return worst

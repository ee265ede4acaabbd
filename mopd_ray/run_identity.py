"""Which run a checkpoint belongs to, and which checkpoint (if any) a launch may start from.

Every run has an id (new for ``run.resume=never``; inherited when it continues) and a fingerprint of
what makes its state meaningful: the student and its architecture, the data and routing, the signal,
the teachers, the learner layout the DeepSpeed state was written for. A run writes its checkpoints
under ``<run.checkpoint_dir>/<run id>/`` and every checkpoint records both, so:

- a fresh run never touches another run's checkpoints, whatever directory they share (the default
  name, the jobs of a sweep, a second launch of the same command);
- ``run.resume=auto`` continues the same run only (``run.id``, else the newest run with this
  fingerprint); checkpoints of other fingerprints are refused with the differences listed;
- ``run.resume=<path>`` takes the named checkpoint whatever wrote it (a fork gets a new id);
- in-job recovery loads the newest checkpoint of its own id, or the run's own starting state.

Settings outside the fingerprint (learning rate, steps, logging, ...) may change between launches of
one run: they are listed when a run continues, not refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from .models.compat import architecture_hash

log = logging.getLogger(__name__)

# resolved-config keys whose change between launches of one run is expected and not worth a line
_EXPECTED_CHANGES = ("run.resume", "run.id", "run.output_dir", "run.steps_per_launch", "logging.", "cluster.address")


class RunIdentityError(ValueError):
    """A launch would start from state that is not this run's (or cannot tell which run is meant)."""


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    fingerprint: str
    parts: dict = field(repr=False)
    parent: Optional[str] = None  # the checkpoint a fork started from (run.resume=<path> of another run)

    def record(self) -> dict:
        return {"run_id": self.run_id, "fingerprint": self.fingerprint, "parts": self.parts, "parent": self.parent}


@dataclass(frozen=True)
class RunStart:
    """What a launch does: its identity, the checkpoint it starts from (None: the initial student) and
    the directory its own checkpoints go to."""

    identity: RunIdentity
    resume_from: Optional[Path]
    root: Path


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _abs(path: Optional[str]) -> Optional[str]:
    return None if path in (None, "") else str(Path(path).expanduser().resolve())


def fingerprint_parts(cfg) -> dict:
    """The settings a run's state is only meaningful with, as a small nested dict."""
    from .config import SELF_TEACHER, resolved_signal, routes, teacher_model_path

    d, a = cfg.data, cfg.algorithm
    teachers = {}
    for name, t in cfg.teachers.models.items():
        path = teacher_model_path(cfg, name)
        teachers[name] = {"model": "self (the initial student)" if name == SELF_TEACHER and not t.model_path
                          else _abs(path), "architecture": architecture_hash(path), "weight": float(t.weight),
                          "signal": resolved_signal(cfg, name)}
    return {
        "student": {"model": _abs(cfg.model.path), "architecture": architecture_hash(cfg.model.path)},
        "data": {"train_path": _abs(d.train_path), "eval_path": _abs(d.eval_path), "domains": list(d.domains),
                 "num_train_per_domain": d.num_train_per_domain, "prompts_per_step": d.prompts_per_step,
                 "max_prompt_len": d.max_prompt_len, "shuffle": d.shuffle, "seed": d.seed,
                 "keys": [d.prompt_key, d.domain_key, d.answer_key],
                 "rewards": dict(d.rewards), "train_rewards": dict(d.train_rewards)},
        "routing": {dom: [[n, float(w)] for n, w in r] for dom, r in routes(cfg).items()},
        "signal": {"signal": a.signal, "alpha": float(a.alpha), "advantage": a.advantage, "topk": a.topk,
                   "topk_divergence": a.topk_divergence, "combine": cfg.teachers.combine},
        "teachers": teachers,
        "learner": {"world_size": cfg.learner.world_size, "zero_stage": cfg.learner.zero_stage},
    }


def fingerprint_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(saved: dict, current: dict, limit: int = 12) -> list:
    """``key: <saved> -> <current>`` for every setting that differs (at most ``limit`` lines)."""
    a, b = _flat(saved), _flat(current)
    lines = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
             if a.get(k, "<unset>") != b.get(k, "<unset>")]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def identity_of(path: Path) -> Optional[dict]:
    """The identity a checkpoint records (None: written before run ids, or by another tool)."""
    try:
        return ckpt.load_state(path).get("identity")
    except (OSError, ValueError):
        return None


@dataclass
class _Run:
    run_id: Optional[str]  # None: checkpoints directly in the directory, with no identity
    latest: Path
    identity: Optional[dict]


def runs_in(base: Path) -> list:
    """Every run with a complete checkpoint under ``base``, newest checkpoint write first."""
    found = []
    legacy = ckpt.find_latest(base, quiet=True)
    if legacy is not None:
        found.append(_Run(None, legacy, identity_of(legacy)))
    if base.is_dir():
        for d in base.iterdir():
            if d.is_dir() and not ckpt.is_step_dir(d):
                latest = ckpt.find_latest(d, quiet=True)
                if latest is not None:
                    found.append(_Run(d.name, latest, identity_of(latest)))
    return sorted(found, key=lambda r: (r.latest / ckpt.MARKER).stat().st_mtime, reverse=True)


def _ways_out(base: Path) -> str:
    return (f"to take a checkpoint anyway, name it: run.resume=<its step_NNNNNN folder>; to start a new run, use "
            f"run.resume=never (it writes under {base}/<new run id>/), or another run.name / run.checkpoint_dir")


def _refusal(base: Path, other: _Run, parts: dict) -> RunIdentityError:
    if other.identity is None:
        why = "it records no run identity (written before run ids, or by another tool)"
    else:
        why = "its run differs from this one in:\n    " + "\n    ".join(differences(other.identity["parts"], parts))
    return RunIdentityError(f"run.resume=auto: {base} holds no checkpoint of this run; the newest there, "
                            f"{other.latest}, is another run's ({why})\n  {_ways_out(base)}")


def plan_run(cfg) -> RunStart:
    """The run's identity and starting point from run.resume, run.id and run.checkpoint_dir.

    Raises RunIdentityError (nothing started, nothing written) when the launch would adopt another run's
    state without the user naming it."""
    base = Path(cfg.run.checkpoint_dir).expanduser().resolve()
    parts = fingerprint_parts(cfg)
    fp = fingerprint_of(parts)
    resume, wanted = cfg.run.resume, cfg.run.get("id")
    if resume in (None, "", "never"):
        rid = wanted or new_run_id()
        if wanted and ckpt.find_latest(base / rid, quiet=True) is not None:
            raise RunIdentityError(f"run.id={rid} already has checkpoints in {base / rid} and run.resume=never would "
                                   f"write over them: continue it with run.resume=auto, or give a new run.id")
        others = [r for r in runs_in(base) if r.run_id != rid]
        if others:
            log.info("%s holds checkpoints of %d other run(s); this run (%s) writes under its own folder %s",
                     base, len(others), rid, base / rid)
        return RunStart(RunIdentity(rid, fp, parts), None, base / rid)
    if resume == "auto":
        runs = runs_in(base)
        if wanted:
            mine = [r for r in runs if r.run_id == wanted]
            if not mine:
                log.info("run.resume=auto: no checkpoint of run %s in %s; starting it from step 0", wanted, base)
                return RunStart(RunIdentity(wanted, fp, parts), None, base / wanted)
            if (mine[0].identity or {}).get("fingerprint") != fp:
                raise _refusal(base, mine[0], parts)
            return _continue(cfg, mine[0], fp, parts, base)
        same = [r for r in runs if r.identity and r.identity.get("fingerprint") == fp and r.run_id]
        if same:
            if len(same) > 1:
                log.warning("run.resume=auto: %d runs in %s match this config; continuing the newest, %s (set run.id "
                            "to choose: %s)", len(same), base, same[0].run_id, ", ".join(r.run_id for r in same))
            return _continue(cfg, same[0], fp, parts, base)
        if runs:
            raise _refusal(base, runs[0], parts)
        rid = new_run_id()
        log.info("run.resume=auto: no complete checkpoint in %s; starting run %s from step 0", base, rid)
        return RunStart(RunIdentity(rid, fp, parts), None, base / rid)
    path = ckpt.resolve_resume(resume, base)
    saved = identity_of(path)
    if saved and saved.get("fingerprint") == fp:
        return RunStart(RunIdentity(saved["run_id"], fp, parts), path, base / saved["run_id"])
    rid = wanted or new_run_id()
    diff = differences(saved["parts"], parts) if saved else ["(the checkpoint records no run identity)"]
    log.warning("run.resume=%s: starting new run %s from another run's checkpoint, as named; it differs in:\n    %s",
                path, rid, "\n    ".join(diff))
    return RunStart(RunIdentity(rid, fp, parts, parent=str(path)), path, base / rid)


def _continue(cfg, run: _Run, fp: str, parts: dict, base: Path) -> RunStart:
    from .config import to_container

    changed = [line for line in differences(ckpt.load_state(run.latest).get("config", {}), to_container(cfg), 40)
               if not line.startswith(_EXPECTED_CHANGES)]
    log.info("run.resume=auto: continuing run %s from %s%s", run.run_id, run.latest,
             "; settings changed since it was written:\n    " + "\n    ".join(changed) if changed else "")
    parent = (run.identity or {}).get("parent")
    return RunStart(RunIdentity(run.run_id, fp, parts, parent=parent), run.latest, base / run.run_id)

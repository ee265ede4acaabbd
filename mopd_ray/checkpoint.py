"""Atomic, resumable checkpoints of a whole run.

Layout of ``<run.checkpoint_dir>/<run id>/step_000010/`` (a run's own folder: mopd_ray/run_identity.py):
  learner/        DeepSpeed state of every rank (weights, optimizer, LR schedule), written collectively
  student/        transformers-format export (safetensors) that transformers and vLLM load as is
  state.json      run state: step, data-sampler position, RNG states, counters, the resolved config, and
                  the run's identity (run id and fingerprint)
  COMPLETE        written last: a folder without it is partial and never loaded

Writes go to ``step_000010.tmp-<id>/``, which is renamed into place before the marker is written,
so a crash at any point leaves either a complete checkpoint or one that resume skips with a warning.
Secrets (keys named *api_key*, *token*, ...) are redacted from the saved config.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def is_step_dir(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name))


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def begin(root: str | Path, step: int) -> Path:
    tmp = Path(root) / f"step_{step:06d}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, state: dict, keep: int = 0) -> Path:
    """Write state.json, rename the temporary folder into place, then the completion marker."""
    from .metrics import redact

    (tmp / "state.json").write_text(json.dumps(redact(state), indent=1, default=str))
    final = step_dir(tmp.parent, step)
    if final.exists():  # a previous partial attempt at this step
        shutil.rmtree(final)
    tmp.rename(final)
    (final / MARKER).write_text(str(step))
    if keep > 0:  # older checkpoints of this run only (the folder is the run's; the id is checked too)
        run_id = (state.get("identity") or {}).get("run_id")
        mine = [p for p in complete_checkpoints(final.parent)
                if (load_state(p).get("identity") or {}).get("run_id") == run_id]
        for old in mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _valid(path: Path) -> Optional[str]:
    """None when the checkpoint is loadable, else why not."""
    if not (path / MARKER).exists():
        return "no completion marker (the write did not finish)"
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({e})"
    if state.get("step") != int(_STEP_DIR.match(path.name).group(1)):
        return "state.json does not match the folder's step"
    if not (path / "learner").is_dir() or not any((path / "learner").iterdir()):
        return "learner state missing"
    return None


def complete_checkpoints(root: str | Path) -> list:
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)),
                   key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
    return [p for p in found if _valid(p) is None]


def find_latest(root: str | Path, run_id: Optional[str] = None, quiet: bool = False) -> Optional[Path]:
    """The newest complete checkpoint directly in ``root`` (of run ``run_id`` only, when given); partial,
    corrupt and other runs' ones are skipped with a warning (``quiet``: without)."""
    root = Path(root)
    if not root.is_dir():
        return None
    warn = log.debug if quiet else log.warning
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)),
                        key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)
    for p in root.iterdir():
        if ".tmp-" in p.name:
            warn("ignoring unfinished checkpoint write %s", p)
    for p in candidates:
        why = _valid(p)
        if why is None and run_id is not None and (load_state(p).get("identity") or {}).get("run_id") != run_id:
            why = f"written by another run, not by run {run_id}"
        if why is None:
            return p
        warn("skipping checkpoint %s: %s", p, why)
    return None


def resolve_resume(resume: str, root: str | Path) -> Optional[Path]:
    """run.resume=<path>: that checkpoint, checked (run.resume=auto is mopd_ray.run_identity.plan_run's)."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        raise ValueError("run.resume=auto is resolved by mopd_ray.run_identity.plan_run (this run's checkpoints only)")
    p = Path(resume).expanduser().resolve()
    why = _valid(p) if p.is_dir() and _STEP_DIR.match(p.name) else f"{p} is not a step_NNNNNN checkpoint folder"
    if why:
        raise ValueError(f"run.resume={resume}: cannot resume from it: {why}; use run.resume=auto to continue this "
                         "run from its newest complete checkpoint")
    return p


def load_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())

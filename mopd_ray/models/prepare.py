"""Make sure every model a run names exists: build the tiny ones the config describes, check the rest."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import SELF_TEACHER
from .tiny import ensure_tiny_model

log = logging.getLogger(__name__)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def prepare_models(cfg) -> dict[str, str]:
    """Return {role: model path} for the student and every teacher, building tiny models as needed."""
    paths = {}
    jobs = [("student", cfg.model.path, cfg.model.tiny)]
    for name, t in cfg.teachers.models.items():
        if name == SELF_TEACHER and not t.model_path:
            paths[f"teacher:{name}"] = cfg.model.path  # the initial student, frozen
            continue
        jobs.append((f"teacher:{name}", t.model_path, t.tiny))
    for role, path, tiny in jobs:
        if tiny is not None:
            p, built = ensure_tiny_model(path, tiny, cfg.model.tokenizer_seed)
            log.info("%s: %s tiny model at %s", role, "built" if built else "reusing", p)
        elif _looks_local(path) and not Path(path, "config.json").exists():
            raise FileNotFoundError(f"{role}: model folder {path!r} has no config.json; give a transformers-format "
                                    "folder, or a 'tiny' spec to build one")
        paths[role] = str(path)
    return paths

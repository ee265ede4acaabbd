"""Make sure every model a run names exists: build the tiny ones the config describes, check the rest."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import SELF_TEACHER
from .tiny import ensure_tiny_model

log = logging.getLogger(__name__)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def check_model_folder(role: str, path: str, trust_remote_code: bool) -> None:
    """A causal LM with safetensors weights; anything else is an error that says what is wrong."""
    import json

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = Path(path, "config.json")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{role}: {config_file} is not valid JSON ({e}); restore the model folder's config.json "
                         "(e.g. save_pretrained writes it)") from None
    if raw.get("auto_map") and not trust_remote_code:
        raise ValueError(f"{role}: model folder {path!r} needs custom code (auto_map in config.json), which is not run "
                         "unless you set model.trust_remote_code=true; only do that for code you trust")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{role}: {path!r} is not a model folder transformers can read: {e}") from None
    archs = config.architectures or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal_arch)) \
            and not trust_remote_code:
        raise ValueError(f"{role}: {path!r} holds a '{config.model_type}' model ({config.architectures}), not a causal "
                         "language model; give a decoder-only LM folder (e.g. Qwen2ForCausalLM, LlamaForCausalLM)")
    if not list(Path(path).glob("*.safetensors")):
        raise ValueError(f"{role}: {path!r} has no .safetensors weights; pickled checkpoints (.bin/.pt) are not loaded "
                         "(they can run code): convert with save_pretrained(..., safe_serialization=True)")


def hub_id_message(role: str, repo: str) -> str:
    """A model given as a hub id: the workers run offline (HF_HUB_OFFLINE=1) on nodes that may not share a
    cache, so each would fail late, or download its own copy. Refused before any engine starts."""
    key = "model.path" if role == "student" else f"teachers.models.{role.split(':', 1)[1]}.model_path"
    return (f"{role}: {repo!r} is not a folder here (a model hub id?). Workers load models from a folder that every "
            "node sees at the same path, without downloading: fetch it once onto shared storage, e.g. "
            f"`huggingface-cli download {repo} --local-dir /shared/models/{repo.split('/')[-1]}`, and set "
            f"{key}=/shared/models/{repo.split('/')[-1]}")


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
            log.log(logging.INFO if built else logging.DEBUG, "%s: %s tiny model at %s", role,
                    "built" if built else "reusing", p)
        elif _looks_local(path) and not Path(path, "config.json").exists():
            raise FileNotFoundError(f"{role}: model folder {path!r} has no config.json; give a transformers-format "
                                    "folder, or a 'tiny' spec to build one")
        elif not _looks_local(path):
            raise FileNotFoundError(hub_id_message(role, str(path)))
        if Path(path, "config.json").exists():
            check_model_folder(role, str(path), cfg.model.trust_remote_code)
        paths[role] = str(path)
    return paths

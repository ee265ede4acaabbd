"""Tokenizer compatibility between student and teachers, checked before any work: token-to-id maps,
end-of-turn ids and chat templates (the rest of the pre-flight checks: mopd_ray/preflight.py).

Student ids fed to a teacher with another vocabulary give nonsense log-probs silently (TRL #4562),
so the token-to-id maps must be equal. A teacher whose embedding has more rows than the tokenizer
(padding, as Qwen2.5-7B's 152,064 vs 3B's 151,936) is fine: padded rows are in no distribution
(``token_rows``: the engines mask them, the learner and the references cut the logits there).
"""

from __future__ import annotations

import functools
import hashlib
import json


class TokenizerMismatchError(ValueError):
    pass


# A fixed conversation both chat templates render: the ids must be equal (the teacher scores the
# student's rendering, so a teacher trained on another format would see text it never saw: a renderer
# mismatch biased teacher log-probs by 0.287 nats per token at tinker-cookbook #796).
PROBE_CONVERSATION = [{"role": "user", "content": "What is 12 + 30?"}]
# a multi-turn probe (agentic runs: assistant and tool turns), rendered by every folder's template too
PROBE_TURNS = PROBE_CONVERSATION + [{"role": "assistant", "content": "calc(12,30)"}, {"role": "tool", "content": "42"}]


def stop_ids(tokenizer, model_path: str | None = None) -> list:
    """The ids that end a response: the tokenizer's EOS plus generation_config.json's eos_token_id(s)."""
    from pathlib import Path

    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    gen = Path(model_path, "generation_config.json") if model_path else None
    if gen is not None and gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
    return sorted(ids)


def run_stop_ids(cfg) -> list:
    """``rollout.stop_token_ids``, or (null) the union of the end-of-turn ids of the student's folder and every
    teacher folder visible here; folders not visible on the driver add nothing (their workers check theirs)."""
    from pathlib import Path

    from ..config import teacher_model_path

    if cfg.rollout.stop_token_ids is not None:
        return sorted({int(i) for i in cfg.rollout.stop_token_ids})
    paths = [cfg.model.path] + [teacher_model_path(cfg, n) for n in sorted(cfg.teachers.models)]
    ids: set = set()
    for path in dict.fromkeys(p for p in paths if p and Path(p, "config.json").exists()):
        ids |= set(_folder_stop_ids(path, cfg.model.trust_remote_code, _mtimes(path)))
    return sorted(ids)


def _mtimes(path: str) -> tuple:
    """What a folder's end-of-turn ids depend on, by modification time (a folder rewritten in place re-reads)."""
    from pathlib import Path

    return tuple(Path(path, f).stat().st_mtime_ns if Path(path, f).exists() else 0
                 for f in ("generation_config.json", "tokenizer_config.json", "tokenizer.json"))


@functools.lru_cache(maxsize=64)
def _folder_stop_ids(path: str, trust_remote_code: bool, _mtimes: tuple) -> tuple:
    """A folder's end-of-turn ids, read once per process (the driver asks at the pre-checks, the pre-flight and
    for the rollout spec); () when its tokenizer cannot be read here."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return ()
    return tuple(stop_ids(tok, path))


# The transformers classes of the architecture matrix (tests/runtime/test_model_families.py, the GPU smoke
# check): each verified on the real engines as student (through weight sync) and as teacher (full-vocab head).
VERIFIED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "MistralForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Olmo2ForCausalLM",
    "Phi3ForCausalLM"})


def architecture_of(path: str, trust_remote_code: bool = False) -> str:
    """The folder's transformers class (config.json ``architectures``), or its model_type."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # not a model folder: the engines say so with their own error
        return "unknown"
    return (getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")])[0]


def unverified(what: str, path: str, trust_remote_code: bool = False) -> str | None:
    """A note when ``path``'s architecture is outside the verified matrix (the pre-flight probe and the
    post-sync check still compare it with transformers and with the learner, and stop a mismatch)."""
    arch = architecture_of(path, trust_remote_code)
    if arch in VERIFIED_ARCHITECTURES:
        return None
    return (f"{what}'s architecture {arch} is not in the verified matrix (README: Supported models): the probe "
            "and post-sync checks guard it")


def head_post(config: dict) -> tuple:
    """(scale, softcap) applied to the head's logits by the family (algo/full_vocab.py; the student's own head too: workers/token_terms.py): Gemma 2 / 3
    ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``; composite configs
    (Gemma 3) read from their ``text_config``."""
    c = {**config, **(config.get("text_config") or {})}
    scale = float(c.get("logit_scale") or 1.0) / float(c.get("logits_scaling") or 1.0)
    return scale, float(c.get("final_logit_softcapping") or 0.0)


def token_rows(tokenizer) -> int:
    """How many output rows are real tokens: every id the tokenizer can produce is below it. Rows past it
    are embedding padding (Qwen2.5-7B: 152,064 rows for 151,665 tokens). The project's one convention: a
    model's distribution is over these ids only; padded rows are masked wherever logits become a
    distribution (the engines: workers/vllm_ext.py ``mopd_mask_padded_rows``; the learner, the hf teacher,
    the full-vocab heads and the pre-flight's reference cut the logits to it), so no padded id is sampled
    and every side normalises over the same support."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def template_ids(tokenizer) -> list | None:
    """The probe conversation rendered by the folder's chat template (None: the folder has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    out = tokenizer.apply_chat_template(PROBE_CONVERSATION, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return [int(i) for i in out["input_ids"]]


def template_turn_ids(tokenizer) -> list | str | None:
    """The multi-turn probe (user, assistant, tool) rendered by the folder's template: ids, or the template's
    error as text (templates without a 'tool' role), or None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        out = tokenizer.apply_chat_template(PROBE_TURNS, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as e:  # noqa: BLE001 - jinja raises what the template raises
        return f"{type(e).__name__}: {e}"[:200]
    return [int(i) for i in out["input_ids"]]


def tokenizer_fingerprint(tokenizer, embedding_rows: int | None = None, model_path: str | None = None) -> dict:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {"vocab_sha256": digest, "vocab_size": len(vocab), "embedding_rows": embedding_rows,
            "eos_token_id": tokenizer.eos_token_id, "stop_ids": stop_ids(tokenizer, model_path),
            "template_ids": template_ids(tokenizer), "template_turn_ids": template_turn_ids(tokenizer)}


SKIPPABLE = ("stop_ids", "template", "probe")  # teachers.models.NAME.skip_checks


def check_compatible(student: dict, student_name: str, teacher: dict, teacher_name: str, skip=(),
                     run_stop=None) -> list:
    """Raise TokenizerMismatchError naming the teacher, what differs and the fix; else return notes
    for the summary line (vocabulary padding). ``run_stop``: the ids the rollouts stop at
    (``run_stop_ids``); a teacher whose end-of-turn ids are all among them is fine (a note)."""
    if student["vocab_sha256"] != teacher["vocab_sha256"]:
        raise TokenizerMismatchError(
            f"teacher '{teacher_name}' uses a different tokenizer vocabulary than the student '{student_name}' "
            f"({teacher['vocab_size']} vs {student['vocab_size']} tokens, different token-to-id maps): its "
            "log-probs of the student's token ids would be meaningless. Use a teacher from the same tokenizer "
            "family as the student.")
    rows = teacher.get("embedding_rows")
    if rows is not None and rows < student["vocab_size"]:
        raise TokenizerMismatchError(
            f"teacher '{teacher_name}' has {rows} output rows, fewer than the {student['vocab_size']} tokens of "
            f"the student '{student_name}''s tokenizer")
    name = teacher_name.split(" ")[0]
    s_stop, t_stop = student.get("stop_ids"), teacher.get("stop_ids")
    notes = []
    covered = run_stop is not None and t_stop is not None and set(t_stop) <= set(run_stop)
    if covered and s_stop != t_stop:
        notes.append(f"{name} ends a turn with ids {t_stop}, the student with {s_stop}: rollouts stop at any of "
                     f"{sorted(run_stop)} (rollout.stop_token_ids)")
    if "stop_ids" not in skip and not covered and s_stop is not None and t_stop is not None and s_stop != t_stop:
        raise TokenizerMismatchError(
            f"teacher '{teacher_name}' ends a response with ids {t_stop}, the student '{student_name}' with "
            f"{s_stop} (tokenizer EOS + generation_config.json eos_token_id): the teacher would score the "
            "student's end of turn as unlikely and push responses to run on (a base student with an instruct "
            "teacher, ms-swift #9526). Use a student and teachers with the same end-of-turn ids (set "
            "eos_token_id in generation_config.json), let the rollouts stop at the teacher's ids too "
            "(rollout.stop_token_ids=null takes every folder's), or, if this is intended, "
            f"teachers.models.{name}.skip_checks=[stop_ids]")
    s_tpl, t_tpl = student.get("template_ids"), teacher.get("template_ids")
    if "template" not in skip and t_tpl is not None and s_tpl != t_tpl:
        raise TokenizerMismatchError(
            f"teacher '{teacher_name}' has another chat template than the student '{student_name}': a probe "
            f"conversation renders to {len(t_tpl)} ids by the teacher's template and {len(s_tpl or [])} by the "
            f"student's (first difference at id {_first_difference(s_tpl or [], t_tpl)}). Prompts are rendered "
            "once with the student's template and every teacher scores exactly those ids, so a teacher trained "
            "on its own format would score text it never saw. Give the student the teacher's chat template, "
            f"or, if the teacher was trained on the student's format, teachers.models.{name}.skip_checks=[template]")
    s_turn, t_turn = student.get("template_turn_ids"), teacher.get("template_turn_ids")
    if "template" not in skip and isinstance(s_turn, list) and isinstance(t_turn, list) and s_turn != t_turn:
        raise TokenizerMismatchError(
            f"teacher '{teacher_name}' renders a multi-turn conversation (assistant and tool turns) otherwise than "
            f"the student '{student_name}' ({len(t_turn)} vs {len(s_turn)} ids, first difference at id "
            f"{_first_difference(s_turn, t_turn)}): in agentic runs the teacher scores the student's rendering of "
            "tool turns. Give the student the teacher's chat template, or, if this is intended, "
            f"teachers.models.{name}.skip_checks=[template]")
    if rows is not None and rows > student["vocab_size"]:
        notes.append(f"{name}: {rows - student['vocab_size']} padded embedding rows (masked: never sampled, not in any "
                     "distribution)")
    return notes


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_local_tokenizers(cfg) -> None:
    """Compare every teacher's tokenizer with the student's on this machine, before any engine starts.

    Teachers whose folder is not visible here (a path only the cluster's nodes see) are checked by
    their workers at start-up instead (mopd_ray/preflight.py).
    """
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from ..config import SELF_TEACHER

    def fp(path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        rows = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).vocab_size
        return tokenizer_fingerprint(tok, rows, path)

    if not Path(cfg.model.path, "config.json").exists():
        return
    student = fp(cfg.model.path)
    run_stop = run_stop_ids(cfg)
    for name, t in cfg.teachers.models.items():
        if name == SELF_TEACHER and not t.model_path:
            continue
        if Path(t.model_path, "config.json").exists():
            check_compatible(student, cfg.model.path, fp(t.model_path), f"{name} ({t.model_path})", t.skip_checks,
                             run_stop)
    for pool in cfg.teachers.pools:
        members = {n: (cfg.model.path if n == SELF_TEACHER and not t.model_path else t.model_path)
                   for n, t in cfg.teachers.models.items() if t.pool == pool}
        if members and all(Path(p, "config.json").exists() for p in members.values()):
            check_pool_architectures(pool, members)


def model_context(path: str) -> int | None:
    """The longest sequence a folder's model takes (config.json's max_position_embeddings, of its text
    config for composite models); None when the folder does not say, or rope scaling extends it (the
    engine derives the limit then)."""
    import json
    from pathlib import Path

    f = Path(path, "config.json")
    if not f.exists():
        return None
    config = json.loads(f.read_text())
    config = config.get("text_config") or config
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("factor"):
        return None
    ctx = config.get("max_position_embeddings")
    return int(ctx) if isinstance(ctx, int) else None


def check_context_lengths(cfg) -> None:
    """Every vLLM engine's context fits its model, before any engine starts (vLLM refuses a longer one only
    inside the engine's process, as a validation error of the actor's start): the rollout's prompt + response
    for the student, each teacher's max_model_len for its folder. Raises ConfigError naming the keys."""
    from ..config import ConfigError, resolved_backend, teacher_model_path

    ctx = model_context(cfg.model.path)
    need = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    if ctx is not None and need > ctx:
        raise ConfigError(
            f"data.max_prompt_len + rollout.max_new_tokens = {cfg.data.max_prompt_len} + {cfg.rollout.max_new_tokens} "
            f"= {need} is longer than the student's context ({ctx}, max_position_embeddings in "
            f"{cfg.model.path}/config.json): lower rollout.max_new_tokens or data.max_prompt_len")
    for name, t in cfg.teachers.models.items():
        if t.pool is not None or resolved_backend(cfg, name) != "vllm":
            continue  # pools take their own max_model_len; the hf backend has no engine context
        path = teacher_model_path(cfg, name)
        ctx = model_context(path)
        if ctx is not None and t.max_model_len > ctx:
            raise ConfigError(
                f"teachers.models.{name}.max_model_len = {t.max_model_len} is longer than teacher '{name}''s "
                f"context ({ctx}, max_position_embeddings in {path}/config.json): set it to at most {ctx}")
    for pool, p in cfg.teachers.pools.items():
        for name, t in cfg.teachers.models.items():
            path = teacher_model_path(cfg, name)
            ctx = model_context(path) if t.pool == pool else None
            if ctx is not None and p.max_model_len > ctx:
                raise ConfigError(
                    f"teachers.pools.{pool}.max_model_len = {p.max_model_len} is longer than teacher '{name}''s "
                    f"context ({ctx}, max_position_embeddings in {path}/config.json): set it to at most {ctx}")


# config.json keys that do not change what a model computes
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def architecture_hash(path: str) -> str:
    """A short hash of the folder's config.json up to the keys that do not change what the model computes
    ("missing" / "unreadable" when there is none to read)."""
    from pathlib import Path

    f = Path(path, "config.json")
    if not f.exists():
        return "missing"
    try:
        raw = json.loads(f.read_text())
    except (OSError, ValueError):
        return "unreadable"
    kept = {k: v for k, v in raw.items() if k not in _NOT_ARCHITECTURE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_pool_architectures(pool: str, members: dict) -> None:
    """Raise ValueError unless every folder of ``members`` (teacher -> folder) has the first one's
    config.json, up to keys that do not change what the model computes."""
    import json
    from pathlib import Path

    first = sorted(members)[0]
    ref = json.loads(Path(members[first], "config.json").read_text())
    for name, path in sorted(members.items()):
        other = json.loads(Path(path, "config.json").read_text())
        diff = sorted(k for k in set(ref) | set(other) if k not in _NOT_ARCHITECTURE and ref.get(k) != other.get(k))
        if diff:
            raise ValueError(f"teacher pool '{pool}': teacher '{name}' ({path}) has another architecture than "
                             f"'{first}' ({members[first]}): config.json differs in {diff}; a pool's teachers share "
                             f"one engine, so give '{name}' its own engine (drop teachers.models.{name}.pool) or pool "
                             "it with teachers of its architecture")

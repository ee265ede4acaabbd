"""Tokenizer compatibility between student and teachers, checked before any work.

Student ids fed to a teacher with another vocabulary give nonsense log-probs silently (TRL #4562),
so the token-to-id maps must be equal. A teacher whose embedding has more rows than the tokenizer
(padding, as Qwen2.5-7B's 152,064 vs 3B's 151,936) is fine: logits are truncated to the tokenizer.
"""

from __future__ import annotations

import hashlib
import json


class TokenizerMismatchError(ValueError):
    pass


def tokenizer_fingerprint(tokenizer, embedding_rows: int | None = None) -> dict:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {"vocab_sha256": digest, "vocab_size": len(vocab), "embedding_rows": embedding_rows,
            "eos_token_id": tokenizer.eos_token_id}


def check_compatible(student: dict, student_name: str, teacher: dict, teacher_name: str) -> None:
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


def check_local_tokenizers(cfg) -> None:
    """Compare every teacher's tokenizer with the student's on this machine, before any engine starts.

    Teachers whose folder is not visible here (a path only the cluster's nodes see) are checked by
    their workers at start-up instead (roles.check_tokenizers).
    """
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from ..config import SELF_TEACHER

    def fp(path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        rows = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).vocab_size
        return tokenizer_fingerprint(tok, rows)

    if not Path(cfg.model.path, "config.json").exists():
        return
    student = fp(cfg.model.path)
    for name, t in cfg.teachers.models.items():
        if name == SELF_TEACHER and not t.model_path:
            continue
        if Path(t.model_path, "config.json").exists():
            check_compatible(student, cfg.model.path, fp(t.model_path), f"{name} ({t.model_path})")

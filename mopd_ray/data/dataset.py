"""User prompt data: loading JSONL/Parquet with actionable errors, route checks, and the resumable sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Bad or inconsistent prompt data; the message names the file, the place, the key and the fix."""


def _jsonl_records(path: Path) -> Iterator[tuple[str, str, Any]]:
    """(default id, location, record) per non-blank line; location is '<path> line <n>' (1-based)."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path} line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"save the file as UTF-8 (e.g. iconv -f <its encoding> -t utf-8)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg}): {line.strip()[:80]!r}; "
                                f"each line must be one JSON object") from None
            yield f"{path.name}:{line_no}", where, record


def _parquet_records(path: Path) -> Iterator[tuple[str, str, Any]]:
    """(default id, location, record) per row; location is '<path> row <i>' (0-based index)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    for i, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path.name}:{i}", f"{path} row {i}", record


def _required_text(record: dict, key: str, where: str, what: str) -> str:
    """The non-empty string under `key`, or a DataError saying what is wrong and how to fix it."""
    value = record.get(key)
    if value is None and key in record:
        raise DataError(f"{where}: key '{key}' ({what}) is null; give every row a non-empty {what}")
    if value is None:
        raise DataError(f"{where}: missing key '{key}' ({what}); add it to every row or set "
                        f"data.{what}_key to the name your file uses (keys here: {sorted(record)})")
    if not isinstance(value, str):
        raise DataError(f"{where}: key '{key}' ({what}) must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: key '{key}' ({what}) is empty; give every row a non-empty {what}")
    return value


def load_prompts(path: str | Path, prompt_key: str = "prompt", domain_key: str = "domain",
                 answer_key: str = "answer") -> list[dict]:
    """Read prompt rows from JSONL (.jsonl/.json) or Parquet, normalised to {id, prompt, domain, answer}.

    A record may give ``messages`` (system / user / assistant / tool turns, rendered by the student's chat
    template) instead of the prompt, ``tools`` (JSON schemas for the template) and ``metadata`` (any object,
    handed to the row's environment). The answer is optional (None when absent); the id is the file's `id` field or '<file name>:<line>'.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}; check data.train_path / data.eval_path")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path)
    elif suffix in PARQUET_SUFFIXES:
        records = _parquet_records(path)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of "
                        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
    rows: list[dict] = []
    for default_id, where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a '{prompt_key}' key, "
                            f"got {type(record).__name__}; write one object per line")
        messages = _messages(record, where) if "messages" in record else None
        prompt = _required_text(record, prompt_key, where, "prompt") if messages is None else _last_user(messages)
        domain = _required_text(record, domain_key, where, "domain")
        answer = record.get(answer_key)
        row_id = record.get("id")
        row = {"id": default_id if row_id is None else str(row_id), "prompt": prompt, "domain": domain,
               "answer": None if answer is None else str(answer)}
        if messages is not None:
            row["messages"] = messages
        if record.get("tools") is not None:
            row["tools"] = _tools(record["tools"], where)
        if record.get("metadata") is not None:
            if not isinstance(record["metadata"], dict):
                raise DataError(f"{where}: key 'metadata' must be a JSON object (given to the row's environment)")
            row["metadata"] = record["metadata"]
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty or has only blank lines")
    return rows


ROLES = ("system", "user", "assistant", "tool")


def _messages(record: dict, where: str) -> list:
    """A record's ``messages``: a non-empty list of {role, content} turns ending with a user or tool turn."""
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: key 'messages' must be a non-empty list of {{'role', 'content'}} turns")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] = {str(m)[:80]!r}: each turn needs 'role' (one of "
                            f"{', '.join(ROLES)}) and a string 'content'")
    if msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: the last turn of 'messages' is the assistant's; the student writes the next "
                        "assistant turn, so end the conversation with a user (or tool) turn")
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: 'messages' has no user turn; add the user's request")
    return msgs


def _last_user(messages: list) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def _tools(tools, where: str) -> list:
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: key 'tools' must be a list of JSON schemas (objects), as chat templates take them")
    return tools


def check_routes(rows: list[dict], routing: dict[str, str], default: str | None, source: str) -> None:
    """Fail early, naming every domain of `rows` that no teacher is routed to (and its row count)."""
    if default is not None:
        return
    counts = Counter(row["domain"] for row in rows)
    missing = sorted(d for d in counts if d not in routing)
    if missing:
        details = "; ".join(f"'{d}' ({counts[d]} rows): add teachers.routing.{d}=<teacher> "
                            f"or set teachers.default" for d in missing)
        raise DataError(f"{source}: {len(missing)} domain(s) have no teacher route: {details}")


def filter_long_prompts(rows: list[dict], prompt_lengths: list[int], max_len: int) -> tuple[list[dict], int]:
    """Keep rows whose tokenized prompt fits in max_len; return (kept rows, number dropped) for the caller to log."""
    if len(rows) != len(prompt_lengths):
        raise ValueError(f"got {len(rows)} rows but {len(prompt_lengths)} prompt lengths")
    kept = [row for row, n in zip(rows, prompt_lengths) if n <= max_len]
    return kept, len(rows) - len(kept)


class PromptSampler:
    """Serves full batches of rows, epoch after epoch, with a checkpointable position.

    Each epoch walks a permutation of all rows (np.random.default_rng(seed + epoch): epochs differ but
    are reproducible). A batch that reaches the end of an epoch continues into the next epoch's
    permutation, so no row is skipped and every batch is full. Shuffling matters: rows grouped by
    domain would keep one teacher busy for long stretches.
    """

    def __init__(self, rows: list[dict], batch_size: int, seed: int, shuffle: bool = True):
        if not rows:
            raise DataError("PromptSampler got no rows; check the data files and the prompt length filter")
        if batch_size <= 0:
            raise DataError(f"PromptSampler batch_size must be > 0, got {batch_size}; set data.prompts_per_step")
        self.rows = rows
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self.consumed = 0  # rows served in total
        self._order = self._epoch_order(self.epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which an epoch visits the rows."""
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng(self.seed + epoch).permutation(len(self.rows))

    def next_batch(self, size: int | None = None) -> list[dict]:
        """The next batch_size (or ``size``) rows, crossing into the next epoch when this one runs out."""
        want = self.batch_size if size is None else int(size)
        batch: list[dict] = []
        while len(batch) < want:
            take = min(want - len(batch), len(self.rows) - self.position)
            batch.extend(self.rows[i] for i in self._order[self.position:self.position + take])
            self.position += take
            self.consumed += take
            if self.position == len(self.rows):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable position of the sampler, for checkpoints."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "consumed": self.consumed,
                "batch_size": self.batch_size, "n_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict exactly (batch_size and seed included); DataError if the data changed."""
        missing = [k for k in ("seed", "epoch", "position", "consumed", "batch_size", "n_rows") if k not in state]
        if missing:
            raise DataError(f"sampler state is missing keys {missing}; the checkpoint is incomplete")
        if int(state["n_rows"]) != len(self.rows):
            raise DataError(f"sampler checkpoint was taken with {state['n_rows']} rows but the data now has "
                            f"{len(self.rows)}; the data changed since the checkpoint: resume with the same "
                            f"data files and filters, or start a new run")
        if not 0 <= int(state["position"]) < len(self.rows) or int(state["batch_size"]) <= 0:
            raise DataError(f"sampler state is inconsistent: {state}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.consumed = int(state["consumed"])
        self.batch_size = int(state["batch_size"])
        self._order = self._epoch_order(self.epoch)

"""Teacher worker: scores the student's trajectories with a frozen teacher, at temperature 1.

Backends (each serves every signal):
- ``vllm``: prompt log-probs of the sampled tokens (``prompt_logprobs=0``) or the top-k plus the
  sampled token (``prompt_logprobs=k``), and last-layer hidden states for the full-vocabulary signal
  (captured in the engine's workers during the same pass, workers/vllm_ext.py); tensor-parallel
  inside the replica.
- ``hf``: a transformers forward (models vLLM cannot load; workers/teacher_hf.py).

Scores cover response positions only (TeacherScores): column t of a row is token position l = prompt
length + t; ``teacher_logprobs_RT[t]`` is log pi_T(tokens[l] | tokens[<l]) and ``hidden_RTH[t]`` is the
teacher's final hidden state at l - 1 (the one that predicts token l), so learner-side ``hidden @ W_T``
gives exactly the teacher's logits for token l.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..batch import RolloutBatch, TeacherScores, response_windows
from ..models.compat import check_pool_architectures, head_post, token_rows
from .base import RoleWorker
from .teacher_hf import HFTeacher


class TeacherWorker(HFTeacher, RoleWorker):
    """One teacher replica: its tokenizer, its backend (a vLLM engine, an endpoint client, or a transformers model:
    teacher_hf.py) and the scoring of the student's rows."""

    def __init__(self, name: str, model_path: str, teacher_cfg: dict, replica_index: int = 0,
                 trust_remote_code: bool = False):
        from ..console import quiet_worker
        from ..utils.heavy import heavy_imports

        with heavy_imports():  # the process's big libraries (vLLM's in make_llm), see the module
            import torch  # noqa: F401
            from transformers import AutoConfig, AutoTokenizer

        quiet_worker()
        self.name, self.cfg, self.replica_index, self.model_path = name, teacher_cfg, replica_index, model_path
        self.backend = teacher_cfg["backend"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.trust_remote_code = trust_remote_code
        model_cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.embedding_rows = model_cfg.vocab_size
        self.token_rows = token_rows(self.tokenizer)  # rows past it are padding: masked (models/compat.py)
        self.hidden_size = getattr(model_cfg, "hidden_size", None) or model_cfg.get_text_config().hidden_size
        if self.backend == "endpoint":  # served elsewhere: the folder gives the tokenizer (workers/endpoint.py)
            from .endpoint import EndpointClient

            self.client = EndpointClient(
                teacher_cfg["endpoint"], teacher_cfg.get("model") or model_path, teacher_cfg.get("api_key_env"),
                teacher_cfg.get("max_concurrency", 8), teacher_cfg.get("rows_per_request", 8),
                teacher_cfg.get("request_timeout_s", 120.0), teacher_cfg.get("max_retries", 6))
        elif self.backend == "vllm":
            from .vllm_engine import make_llm

            self.llm = make_llm(
                model_path, dtype=teacher_cfg["dtype"], max_model_len=teacher_cfg["max_model_len"], seed=0,
                max_logprobs=teacher_cfg["max_logprobs"], tensor_parallel_size=teacher_cfg["tensor_parallel_size"],
                gpus_per_shard=teacher_cfg.get("num_gpus_per_shard", 1.0),
                gpu_memory_utilization=teacher_cfg.get("gpu_memory_utilization", 0.6),
                kv_cache_memory_bytes=teacher_cfg["kv_cache_memory_bytes"], trust_remote_code=trust_remote_code,
                enforce_eager=teacher_cfg.get("enforce_eager", True),
                worker_extension_cls="mopd_ray.workers.vllm_ext.WorkerExtension")  # hidden-state capture
        else:
            self._load_hf(model_path, teacher_cfg, trust_remote_code)

    # ``teacher`` names which teacher a call is for: this worker's own (a dedicated group), or one of the
    # teachers a pooled worker serves (PooledTeacherWorker swaps it in first)
    def fingerprint(self, teacher: Optional[str] = None) -> dict:
        from ..models.compat import tokenizer_fingerprint

        if self.backend == "endpoint":
            problem = self.check_endpoint_tokenizer()
            if problem:
                raise RuntimeError(problem)
        return tokenizer_fingerprint(self.tokenizer, self.embedding_rows, self.model_path)

    def check_endpoint_tokenizer(self) -> Optional[str]:
        """None when the endpoint tokenizes a probe text as this teacher's folder does, else what differs (a server
        of another model would score the student's token ids as other text)."""
        text = "add the numbers: 12+34 = 46. Reverse ABC; sort 3141."
        mine = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = self.client.tokenize(text)
        if theirs == mine:
            return None
        return (f"teacher '{self.name}': the endpoint {self.client.url} tokenizes a probe text as {theirs[:12]}..., its "
                f"folder {self.model_path} as {mine[:12]}...: the server serves another tokenizer. Point "
                f"teachers.models.{self.name}.model_path at the served model's folder (its tokenizer and config)")

    def probe_logprobs(self, sequences: list, teacher: Optional[str] = None) -> list:
        """Log-probs of given token ids through this replica's scoring path (position l: token l, 0 at 0)."""
        from ..batch import pad_sequences

        lens = np.array([len(s) for s in sequences], np.int32)
        tokens = pad_sequences(sequences, self.tokenizer.pad_token_id or 0)
        batch = RolloutBatch(tokens, np.zeros(len(lens), np.int32), lens, np.zeros(tokens.shape, np.float32),
                             np.arange(len(lens)), np.zeros(len(lens), np.int32), np.full(len(lens), np.nan, np.float32),
                             np.ones(len(lens), bool), tuple("probe" for _ in lens))
        *scores, _ = self.score_parts(teacher or self.name, [np.arange(len(lens), dtype=np.int32)], 0, False, batch)
        scores = scores[0]
        return [scores.teacher_logprobs_RT[i, :n].copy() for i, n in enumerate(lens)]

    def reference_logprobs(self, sequences: list, max_bytes: int, teacher: Optional[str] = None):
        """The same log-probs from a plain transformers forward of the folder, in the teacher's dtype
        (loaded once, then freed), or a string saying why there is none."""
        from pathlib import Path

        from .reference import reference_logprobs

        if self.backend == "hf":
            return "its hf backend is the transformers forward itself"
        size = sum(f.stat().st_size for f in Path(self.model_path).glob("*.safetensors"))
        if size > max_bytes:
            return (f"{size / 2**30:.1f} GB of weights > teachers.preflight.reference_max_gb "
                    f"({max_bytes / 2**30:g}); replicas checked against each other only")
        return reference_logprobs(self.model_path, sequences, self.cfg["dtype"], self.token_rows,
                                  getattr(self, "trust_remote_code", False))

    def head_logprobs(self, sequences: list, teacher: Optional[str] = None):
        """Log-probs of ``sequences`` as the learner rebuilds this teacher's full-vocabulary distribution
        (the engine's last hidden states, in float32, x the folder's head and its post-processing), for the
        pre-flight to compare with the engine's own; a string when there is nothing to compare."""
        import torch

        from ..algo.full_vocab import teacher_logits
        from ..batch import pad_sequences

        if self.backend != "vllm":
            return "its hf backend applies the model's own head"
        n = np.array([len(s) for s in sequences], np.int32)
        B = len(sequences)
        batch = RolloutBatch(pad_sequences(sequences, 0), np.zeros(B, np.int32), n, np.zeros((B, int(n.max())), np.float32),
                             np.arange(B), np.zeros(B, np.int32), np.full(B, np.nan, np.float32), np.ones(B, bool),
                             ("probe",) * B)
        saved, self.cfg = self.cfg, {**self.cfg, "hidden_dtype": "float32"}
        try:
            ((_, _, _, hs, _, _),) = self._score_vllm([(batch, np.arange(B))], 0, True)
        finally:
            self.cfg = saved
        w, b, post = self.output_head(teacher)
        vocab = self.token_rows
        out = []
        for i, s in enumerate(sequences):
            h = torch.from_numpy(np.ascontiguousarray(hs[i, 1: len(s)], np.float32))
            lp = torch.log_softmax(teacher_logits(h, torch.from_numpy(np.asarray(w)), None if b is None else
                                                  torch.from_numpy(np.asarray(b)), vocab, torch.float32, post), -1)
            ids = torch.tensor(s[1:], dtype=torch.long)
            out.append(np.concatenate([[0.0], lp.gather(-1, ids[:, None])[:, 0].numpy()]).astype(np.float32))
        return out

    def output_head(self, teacher: Optional[str] = None):
        """The frozen output head (and bias) as numpy, for the learner's full-vocabulary loss."""
        if self.backend == "vllm":
            return head_from_checkpoint(self.model_path)
        head = self.model.get_output_embeddings()
        w = head.weight.detach().float().cpu().numpy()
        b = None if getattr(head, "bias", None) is None else head.bias.detach().float().cpu().numpy()
        return w, b, head_post(self.model.config.to_dict())

    def score(self, batch: RolloutBatch, rows: np.ndarray, topk: int = 0, hidden: bool = False) -> tuple:
        """(TeacherScores, meta) for some rows of one batch; call with ``num_returns=2``."""
        *scores, meta = self.score_parts(self.name, [rows], topk, hidden, batch)
        return scores[0], meta

    def score_parts(self, teacher: str, rows_per_part: list, topk: int, hidden: bool, *batches: RolloutBatch) -> tuple:
        """Score rows of several parts of a rollout shard in one engine call.

        ``batches`` are top-level arguments, so Ray resolves their refs in this process (zero-copy).
        Returns (*scores, meta), one TeacherScores per part: call with ``num_returns=len(batches) + 1``
        so each learner rank fetches only the scores of its own rows and the driver only the meta.
        ``teacher``: the teacher whose scores these are (this worker's own, or a pooled one).
        """
        if teacher != self.name:
            raise ValueError(f"teacher worker '{self.name}' asked to score for '{teacher}'")
        import os

        t0 = time.perf_counter()
        rows_per_part = [np.asarray(r, dtype=np.int32) for r in rows_per_part]
        if self.backend == "vllm":
            dense = self._score_vllm(list(zip(batches, rows_per_part)), topk, hidden)
        elif self.backend == "endpoint":
            dense = self._score_endpoint(list(zip(batches, rows_per_part)), topk, hidden)
        else:
            dense = [self._score_hf(b, r, topk, hidden) for b, r in zip(batches, rows_per_part)]
        latency = time.perf_counter() - t0
        scores = [self._windows(b, r, d, latency) for b, r, d in zip(batches, rows_per_part, dense)]
        return (*scores, {"teacher": self.name, "latency_s": latency, "rows": int(sum(len(r) for r in rows_per_part)),
                          "bytes": int(sum(s.nbytes() for s in scores)), "replica": self.replica_index,
                          "pid": os.getpid(), **(self.client.stats.take() if self.backend == "endpoint" else {})})

    def _windows(self, batch: RolloutBatch, rows: np.ndarray, dense: tuple, latency: float) -> TeacherScores:
        """Ship response positions only: [R, T] windows from each row's prompt length (the vLLM backend
        writes windows itself, ``dense[-1]`` True; the transformers forward gives [R, L] arrays to cut)."""
        lp, ids, tk, hs, hdt, windowed = dense
        start = batch.prompt_lens_B[rows].astype(np.int32)
        T = int(batch.response_lens_B[rows].max()) if len(rows) else 0
        cut = (lambda a: None if a is None else a if windowed else response_windows(a, start, T))
        return TeacherScores(teacher=self.name, rows_R=rows, start_R=start, teacher_logprobs_RT=cut(lp),
                             topk_ids_RTK=cut(ids), topk_logprobs_RTK=cut(tk), hidden_RTH=cut(hs),
                             hidden_dtype=hdt, latency_s=latency)

    def _generate_capturing(self, seqs: list, starts: list, params, hidden: bool, hdt: str) -> tuple:
        """The scoring pass; with ``hidden``, each sequence's last-layer states from the one predicting its
        first response token on (``starts``: response starts), captured on TP rank 0. A capture that does
        not cover a sequence's response (a preempted or split prefill) is retried once for those sequences,
        capturing everything; still short, the teacher stops with what happened and the fix."""
        if not hidden:
            return self.llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs], params, use_tqdm=False), None
        counter = getattr(getattr(self.llm, "request_counter", None), "counter", None)
        # vLLM numbers an LLM's requests in order: the ids this call's requests will get
        keep = {str(counter + i): max(0, st - 1) for i, st in enumerate(starts)} if counter is not None else {}
        self.llm.collective_rpc("mopd_capture_start", kwargs={"keep_from": keep})
        outs = self.llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs], params, use_tqdm=False)
        captured = self.llm.collective_rpc("mopd_capture_stop", kwargs={"dtype": hdt})[0]
        short = [i for i, (s, st, o) in enumerate(zip(seqs, starts, outs)) if not _covers(captured.get(o.request_id), st, len(s))]
        if short:
            self.llm.collective_rpc("mopd_capture_start")
            again = self.llm.generate([{"prompt_token_ids": seqs[i].tolist()} for i in short], params, use_tqdm=False)
            more = self.llm.collective_rpc("mopd_capture_stop", kwargs={"dtype": hdt})[0]
            for i, o in zip(short, again):
                if not _covers(more.get(o.request_id), starts[i], len(seqs[i])):
                    entry = more.get(o.request_id)
                    raise RuntimeError(
                        f"teacher '{self.name}': the hidden states of a {len(seqs[i])}-token sequence came back "
                        f"incomplete twice (positions {entry[0] if entry else '-'}..{entry[0] + entry[1] - 1 if entry else '-'}"
                        f" captured, {max(0, starts[i] - 1)}..{len(seqs[i]) - 2} needed): the engine preempted or "
                        "split its prefill. Give the teacher engine more KV cache (teachers.models.NAME."
                        "kv_cache_memory_bytes or gpu_memory_utilization) or a larger max_model_len, or use "
                        "signal=topk for this teacher")
                captured[outs[i].request_id] = more[o.request_id]
        return outs, captured

    def _score_vllm(self, parts: list, topk: int, hidden: bool) -> list:
        """One engine call over every row of every part; per part (lp, ids, topk_lp, hidden, dtype, True)
        as [R, T] response windows, written directly (never an [R, L, H] array of the whole sequence).
        Flat log-probs: per sequence one [n - 1, k + 1] array (the token itself, then the top-k in rank
        order), sliced with numpy instead of walking dicts token by token."""
        from vllm import SamplingParams

        from .vllm_ext import decode_captured

        seqs = [b.sequence(int(r)) for b, rows in parts for r in rows]
        starts = [int(b.prompt_lens_B[r]) for b, rows in parts for r in rows]
        params = SamplingParams(max_tokens=1, prompt_logprobs=topk, temperature=1.0, detokenize=False,
                                flat_logprobs=True)
        hdt = self.cfg.get("hidden_dtype", "bfloat16")
        outs, captured = self._generate_capturing(seqs, starts, params, hidden, hdt)
        result, it, w = [], iter(zip(seqs, outs)), topk + 1
        for batch, rows in parts:
            R = len(rows)
            T = int(batch.response_lens_B[rows].max()) if R else 0  # column t is position prompt length + t
            lp = np.zeros((R, T), np.float32)
            ids = np.zeros((R, T, topk), np.int32) if topk else None
            tk = np.full((R, T, topk), -np.inf, np.float32) if topk else None
            hs = np.zeros((R, T, self.hidden_size), np.uint16 if hdt == "bfloat16" else np.dtype(hdt)) if hidden else None
            for i, r in enumerate(rows):
                s, o = next(it)
                n, start = len(s), int(batch.prompt_lens_B[r])
                skip = 1 if start == 0 else 0  # position 0 has no log-prob
                flat = np.asarray(o.prompt_logprobs.logprobs, np.float32).reshape(n - 1, w)  # row j: token j + 1
                lp[i, skip: n - start] = flat[start + skip - 1:, 0]
                if topk:
                    flat_ids = np.asarray(o.prompt_logprobs.token_ids, np.int32).reshape(n - 1, w)
                    ids[i, skip: n - start], tk[i, skip: n - start] = flat_ids[start + skip - 1:, 1:], flat[start + skip - 1:, 1:]
                if hidden:  # the state at l - 1 predicts token l
                    first, h = decode_captured(captured[o.request_id], hdt)
                    hs[i, skip: n - start] = h[start + skip - 1 - first: n - 1 - first]
            result.append((lp, ids, tk, hs, hdt if hidden else None, True))
        return result

    def _score_endpoint(self, parts: list, topk: int, hidden: bool) -> list:
        """The served teacher's prompt log-probs of every row of every part, as [R, T] response windows (the
        layout of ``_score_vllm``). Hidden states do not leave a server: no full-vocabulary signal."""
        if hidden:
            raise RuntimeError(f"teacher '{self.name}' is served at {self.client.url}: the full-vocabulary signal needs "
                               "its hidden states, which an OpenAI-compatible server does not return; use "
                               f"teachers.models.{self.name}.signal=topk (or sampled)")
        seqs = [b.sequence(int(r)) for b, rows in parts for r in rows]
        it = iter(zip(seqs, self.client.score(seqs, topk)))
        result = []
        for batch, rows in parts:
            R = len(rows)
            T = int(batch.response_lens_B[rows].max()) if R else 0
            lp = np.zeros((R, T), np.float32)
            ids = np.zeros((R, T, topk), np.int32) if topk else None
            tk = np.full((R, T, topk), -np.inf, np.float32) if topk else None
            for i, r in enumerate(rows):
                s, (flat_lp, flat_ids, flat_tk) = next(it)  # row j: token j + 1
                n, start = len(s), int(batch.prompt_lens_B[r])
                skip = 1 if start == 0 else 0
                lp[i, skip: n - start] = flat_lp[start + skip - 1:]
                if topk:
                    ids[i, skip: n - start], tk[i, skip: n - start] = flat_ids[start + skip - 1:], flat_tk[start + skip - 1:]
            result.append((lp, ids, tk, None, None, True))
        return result

def expand_hidden(hidden: np.ndarray, dtype_name: Optional[str]):
    """Inverse of the compact encoding: a torch tensor of the shipped dtype."""
    import torch

    if dtype_name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(hidden).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(hidden))


def head_from_checkpoint(model_path: str) -> tuple:
    """(W [V, H], bias or None, (scale, softcap)) as float32 numpy, read from the folder's safetensors
    (tied: the input embedding) and config.json, without building the model: the vLLM backend serves
    hidden states, the learner the head."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    config = json.loads(Path(model_path, "config.json").read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    names = ["lm_head.weight", "model.embed_tokens.weight"] if not tied else ["model.embed_tokens.weight"]
    found: dict = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key in names + ["lm_head.bias"] and key not in found:
                    found[key] = st.get_tensor(key).float().numpy()
    weight = next((found[n] for n in names if n in found), None)
    if weight is None:
        raise ValueError(f"{model_path}: no output head ({' or '.join(names)}) in its safetensors files")
    return weight, found.get("lm_head.bias"), head_post(config)



# Keys of config.json that do not change what a model computes: the pool's teachers may differ in these only.
class PooledTeacherWorker(TeacherWorker):
    """One replica of a teacher pool: a vLLM engine serving several teachers of one architecture,
    swapping their weights in place between calls (workers/vllm_ext.py ``mopd_pool_swap``: from the
    workers' host cache, else from the teacher's folder). Every call names its teacher."""

    def __init__(self, pool: str, members: dict, pool_cfg: dict, replica_index: int = 0,
                 trust_remote_code: bool = False):
        self.pool, self.members = pool, dict(members)  # teacher name -> model folder
        check_pool_architectures(pool, self.members)
        first = sorted(self.members)[0]
        super().__init__(first, self.members[first], {**pool_cfg, "backend": "vllm"}, replica_index, trust_remote_code)
        self.cache_bytes = int(pool_cfg.get("cache_gb", 16.0) * 2**30)
        self.swaps, self.swap_s = 0, 0.0

    def _use(self, teacher: str) -> None:
        """Swap ``teacher``'s weights into the engine (no-op if it is loaded): bucket by bucket through one
        layerwise-reload session in every engine worker (workers/vllm_ext.py), which re-runs vLLM's
        post-load processing (a copy into the processed tensors would miss kernels' packed weights)."""
        import os

        from safetensors.torch import save

        if teacher not in self.members:
            raise ValueError(f"teacher pool '{self.pool}' does not serve teacher '{teacher}' "
                             f"(it serves {sorted(self.members)})")
        if teacher == self.name:
            return
        t0 = time.perf_counter()
        # tensors pass as they are to workers in this process, as safetensors bytes to worker processes
        local = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and self.cfg["tensor_parallel_size"] == 1
        self.llm.collective_rpc("mopd_begin_load")
        for named in self._weights(teacher, 256 << 20):
            self.llm.collective_rpc("mopd_load_bucket", args=(named if local else save(dict(named)),))
        self.llm.collective_rpc("mopd_finish_load")
        self.llm.reset_prefix_cache()  # cached prefixes hold the previous teacher's keys and values
        self.name, self.model_path = teacher, self.members[teacher]
        self.swaps += 1
        self.swap_s += time.perf_counter() - t0

    def _weights(self, teacher: str, bucket_bytes: int):
        """[(HF name, tensor)] buckets of a teacher's weights: from this replica's host cache (one copy per
        replica, least recently used dropped first beyond ``cache_gb``), else read from its folder (and
        cached when it fits)."""
        from collections import OrderedDict
        from pathlib import Path

        from ..sync import state_buckets

        cache = self.__dict__.setdefault("cache", OrderedDict())
        if teacher not in cache:
            size = sum(f.stat().st_size for f in Path(self.members[teacher]).glob("*.safetensors"))
            if size > self.cache_bytes:  # streamed from disk, never held whole
                yield from state_buckets(_folder_tensors(self.members[teacher]), bucket_bytes)
                return
            while cache and sum(_nbytes(v) for v in cache.values()) + size > self.cache_bytes:
                cache.popitem(last=False)
            cache[teacher] = dict(_folder_tensors(self.members[teacher]))
        cache.move_to_end(teacher)
        yield from state_buckets(cache[teacher], bucket_bytes)

    def score_parts(self, teacher: str, rows_per_part: list, topk: int, hidden: bool, *batches: RolloutBatch) -> tuple:
        swaps, swap_s = self.swaps, self.swap_s
        self._use(teacher)
        *scores, meta = super().score_parts(teacher, rows_per_part, topk, hidden, *batches)
        meta.update(pool=self.pool, swaps=self.swaps - swaps, swap_s=self.swap_s - swap_s)
        return (*scores, meta)

    def fingerprint(self, teacher: Optional[str] = None) -> dict:
        from transformers import AutoConfig, AutoTokenizer

        from ..models.compat import tokenizer_fingerprint

        path = self.members[teacher or self.name]
        rows = AutoConfig.from_pretrained(path).vocab_size
        return tokenizer_fingerprint(AutoTokenizer.from_pretrained(path), rows, path)

    def probe_logprobs(self, sequences: list, teacher: Optional[str] = None) -> list:
        self._use(teacher or self.name)
        return super().probe_logprobs(sequences, teacher)

    def reference_logprobs(self, sequences: list, max_bytes: int, teacher: Optional[str] = None):
        self._use(teacher or self.name)
        return super().reference_logprobs(sequences, max_bytes, teacher)

    def output_head(self, teacher: Optional[str] = None):
        return head_from_checkpoint(self.members[teacher or self.name])

    def head_logprobs(self, sequences: list, teacher: Optional[str] = None):
        self._use(teacher or self.name)
        return super().head_logprobs(sequences, teacher)

    def pool_stats(self) -> dict:
        return {"swaps": self.swaps, "swap_s": self.swap_s, "serving": self.name}


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _folder_tensors(path: str):
    """(HF name, tensor) of a folder's safetensors, one tensor at a time (memory-mapped files)."""
    from pathlib import Path

    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def _covers(entry, start: int, n: int) -> bool:
    """Whether a captured (first position, rows, H, bytes) run holds the states at start - 1 .. n - 2 (those
    that predict the response tokens)."""
    if entry is None:
        return False
    first, rows = int(entry[0]), int(entry[1])
    return first <= max(0, start - 1) and first + rows >= n - 1

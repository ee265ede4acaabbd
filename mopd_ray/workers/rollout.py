"""Rollout worker: one vLLM engine (tensor-parallel inside) that samples n responses per prompt."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..batch import RolloutBatch, pad_sequences
from ..rewards import strip_thinking
from .episodes import sampled_logprobs as _sampled_logprobs
from .base import RoleWorker


class RolloutWorker(RoleWorker):
    """A Ray actor. ``generate`` returns a RolloutBatch (the caller gets an ObjectRef of it)."""

    def __init__(self, model_path: str, rollout_cfg: dict, max_model_len: int, replica_index: int = 0,
                 trust_remote_code: bool = False, rewards: Optional[dict] = None,
                 train_rewards: Optional[dict] = None):
        from ..console import quiet_worker
        from ..rewards import Rewards
        from ..utils.heavy import heavy_imports
        from .vllm_engine import make_llm

        with heavy_imports():  # the process's big libraries (vLLM's in make_llm), see the module
            import torch  # noqa: F401
            from transformers import AutoTokenizer

        quiet_worker()
        self.cfg = rollout_cfg
        self.rewards = Rewards(**(rewards or {"by_domain": {}}))  # data.rewards: scored here, beside the responses
        # the rollouts' rewards (data.train_rewards on top of data.rewards); the evaluation uses self.rewards
        same = not train_rewards or train_rewards["by_domain"] == (rewards or {}).get("by_domain")
        self.train_rewards = self.rewards if same else Rewards(**train_rewards)
        self.replica_index = replica_index
        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        extra = {}
        if rollout_cfg["temperature"] != 1.0:
            extra["logprobs_mode"] = "processed_logprobs"  # log-probs of the distribution actually sampled
        self.llm = make_llm(
            model_path, dtype=rollout_cfg["dtype"], max_model_len=max_model_len, seed=rollout_cfg["seed"],
            max_logprobs=rollout_cfg["max_logprobs"], tensor_parallel_size=rollout_cfg["tensor_parallel_size"],
            gpus_per_shard=rollout_cfg.get("num_gpus_per_shard", 1.0),
            kv_cache_memory_bytes=rollout_cfg["kv_cache_memory_bytes"], enforce_eager=rollout_cfg["enforce_eager"],
            gpu_memory_utilization=rollout_cfg["gpu_memory_utilization"], trust_remote_code=trust_remote_code,
            worker_extension_cls="mopd_ray.workers.vllm_ext.WorkerExtension", **extra)
        self.weight_version = 0

    def generate(self, prompts: list[dict], step: int, seed: int, parts: Optional[list] = None,
                 want: Optional[int] = None) -> tuple:
        """Sample ``n_samples_per_prompt`` responses for each prompt (token ids rendered by the driver).

        Each prompt dict: prompt_ids, domain, answer, group_id, teacher_index (one per slot), route_weight.
        Rewards are computed
        here, where the tokenizer is, for domains with a verifiable reward. ``parts`` lists, per learner
        destination, the indices of its prompts (default: one part of all). Returns (*batches, meta),
        one RolloutBatch per part: call with ``num_returns=len(parts) + 1`` so each learner rank fetches
        only its own part and the driver only the small meta.

        ``want`` (multi-turn episodes carried over, env.carry_over): ``prompts`` start new episodes and the call
        returns the ``want`` groups that finished first, oldest first (carried from earlier calls included); the
        parts then index that list, and the meta names its groups and their teachers (``groups``,
        ``part_teachers``).
        """
        parts = [list(range(len(prompts)))] if parts is None else parts
        multi_turn = any(p.get("env") for p in prompts)  # multi-turn episodes (rows without an environment: one turn)
        params = None if multi_turn else sampling_params(self.cfg, prompts, step, seed)
        t0 = time.perf_counter()
        episodes: dict = {}
        if multi_turn:
            prompts, per_prompt, episodes = self._episodes(prompts, step, seed, want)
        else:
            outputs = self.llm.generate([{"prompt_token_ids": list(p["prompt_ids"])} for p in prompts], params,
                                        use_tqdm=False)
            per_prompt = [self._rows_of(p, out) for p, out in zip(prompts, outputs)]
        gen_s = time.perf_counter() - t0
        timeouts_before = self.train_rewards.timeouts
        reward_rows(self.train_rewards, self.cfg, prompts, per_prompt)
        batches = [self._batch([row for i in idx for row in per_prompt[i]]) for idx in parts]
        rewards = [r["reward"] for rows in per_prompt for r in rows]
        domains = [p["domain"] for p, rows in zip(prompts, per_prompt) for _ in rows]
        by_domain: dict = {}
        for d, r in zip(domains, rewards):
            if not np.isnan(r):
                by_domain.setdefault(d, []).append(r)
        meta = {"weight_version": self.weight_version, "generate_s": gen_s, "replica": self.replica_index,
                "response_tokens": int(sum(int(b.response_lens_B.sum()) for b in batches)),
                "rows": int(sum(b.num_rows for b in batches)),
                "finished": int(sum(int(b.finished_B.sum()) for b in batches)),
                "truncated_by_domain": _count_by(domains, [r["truncated"] for rows in per_prompt for r in rows]),
                "rows_by_domain": _count_by(domains, [True] * len(domains)),
                "reward_sum_by_domain": {d: float(sum(v)) for d, v in by_domain.items()},
                "reward_count_by_domain": {d: len(v) for d, v in by_domain.items()},
                "reward_timeouts": self.train_rewards.timeouts - timeouts_before, **episodes}
        if want is not None:  # which groups came back, and their rows' teachers (the driver scores by them)
            meta["groups"] = [p["group_id"] for p in prompts]
            meta["part_teachers"] = [b.teacher_index_BS for b in batches]
        if episodes:
            meta["env_errors_by_domain"] = _count_by(domains, [r.get("error") is not None
                                                               for rows in per_prompt for r in rows])
        return (*batches, meta)

    def _episodes(self, prompts: list, step: int, seed: int, want: Optional[int] = None) -> tuple:
        """Multi-turn episodes of ``prompts`` (mopd_ray/workers/episodes.py): (the prompts of the groups returned,
        their rows as ``_rows_of`` makes them with the mask of the student's own tokens, the episodes' small
        numbers for the metrics). ``want``: carried over (``generate``)."""
        from .episodes import EpisodeSettings, episode_stats

        env = self.cfg["env"]
        self._episode_runner()
        n = self.cfg["n_samples_per_prompt"]
        settings = EpisodeSettings.of(env, self.cfg["temperature"], self.cfg["top_p"], self.cfg["max_new_tokens"],
                                      self.stop_ids(), self.cfg.get("logprobs", True), self._thinking_tags(),
                                      max_episode_lag=env.get("max_episode_lag"))
        runner = self.episode_runner
        seed_of = (lambda p, k: (seed * 1_000_003 + step * 10_007 + p["group_id"] * 131 + k) % (2**31))
        if want is None:
            eps = runner.run(prompts, n, settings, seed_of, self.weight_version)
            groups = [eps[i * n:(i + 1) * n] for i in range(len(prompts))]
        else:
            runner.start(prompts, n, seed_of, self.weight_version)
            groups = [g for _, g in runner.advance(settings, want, self.weight_version)]
            if len(groups) < want:  # the driver keeps more groups in flight than a call takes: a bookkeeping fault
                raise RuntimeError(f"rollout replica {self.replica_index}: {want} episode groups asked for, only "
                                   f"{len(groups)} started and not yet returned (env.carry_over)")
            prompts = [g[0].item for g in groups]
        per_prompt = [[{"seq": e.seq, "plen": e.plen, "rlen": e.response_len, "lp": [0.0] * e.plen + e.lp,
                        "action": [0] * e.plen + e.action, "group": p["group_id"], "teacher": p["teacher_index"],
                        "route_weight": p.get("route_weight"), "text": e.last_text, "env_reward": e.reward,
                        "failed": e.error is not None, "error": e.error, "finished": e.finished,
                        "truncated": e.truncated, "domain": p["domain"]} for e in g] for p, g in zip(prompts, groups)]
        eps = [e for g in groups for e in g]
        return prompts, per_prompt, episode_stats(eps, runner.carried, self.weight_version)

    def drop_episodes(self) -> int:
        """Forget the episodes carried over (a run restored from a checkpoint sends its in-flight prompts again)."""
        runner = getattr(self, "episode_runner", None)
        n = runner.carried if runner is not None else 0
        if runner is not None:
            runner.reset()
        return n

    def _episode_runner(self) -> None:
        from ..envs.pool import EnvPool
        from .episodes import EpisodeRunner

        if getattr(self, "env_pool", None) is None:
            self.env_pool = EnvPool(self.cfg["env"])
            self.episode_runner = EpisodeRunner(self.llm, self.tokenizer, self.env_pool, self.model_path,
                                                _sampled_logprobs)

    def _thinking_tags(self):
        """The reasoning block's tags when rollout.strip_thinking, else None."""
        return tuple(self.cfg["thinking_tags"]) if self.cfg.get("strip_thinking") else None

    def stop_ids(self) -> list:
        """The ids that end an assistant turn: the run's (rollout.stop_token_ids) and the student's EOS."""
        ids = [int(i) for i in (self.cfg.get("stop_token_ids") or [])]
        return ids + ([int(self.tokenizer.eos_token_id)] if self.tokenizer.eos_token_id is not None
                      and self.tokenizer.eos_token_id not in ids else [])

    def _rows_of(self, prompt: dict, out) -> list:
        """The sampled rows of one prompt: ids, rollout log-probs, response text, end-of-turn flag."""
        rows = []
        plen = len(prompt["prompt_ids"])
        for o in out.outputs:
            resp = list(o.token_ids)
            text = self.tokenizer.decode(resp, skip_special_tokens=True)
            if self._thinking_tags():  # the reward judges the answer, not the reasoning
                text = strip_thinking(text, self._thinking_tags())
            rows.append({"seq": list(prompt["prompt_ids"]) + resp, "plen": plen, "rlen": len(resp),
                         # zeros when not asked for (nothing consumes them: algo.mismatch.needs_rollout_logprobs)
                         "lp": [0.0] * plen + (_sampled_logprobs(o.logprobs, resp) if o.logprobs
                                               else [0.0] * len(resp)),
                         "group": prompt["group_id"], "teacher": prompt["teacher_index"],
                         "route_weight": prompt.get("route_weight"),
                         "text": text, "finished": o.finish_reason == "stop",
                         "truncated": o.finish_reason == "length",
                         "domain": prompt["domain"]})
        return rows

    def _batch(self, rows: list) -> RolloutBatch:
        tokens = pad_sequences([r["seq"] for r in rows], self.pad_id)
        col = (lambda k, dt: np.asarray([r[k] for r in rows], dt))
        return RolloutBatch(
            tokens_BL=tokens, prompt_lens_B=col("plen", np.int32), response_lens_B=col("rlen", np.int32),
            rollout_logprobs_BL=pad_sequences([r["lp"] for r in rows], 0, tokens.shape[1], np.float32),
            group_ids_B=col("group", np.int64), teacher_index_BS=col("teacher", np.int32),
            rewards_B=col("reward", np.float32), finished_B=col("finished", bool),
            truncated_B=col("truncated", bool), mask_truncated=self.cfg.get("overlong", "keep") == "mask",
            domains=tuple(r["domain"] for r in rows), weight_version=self.weight_version,
            route_weight_BS=None if rows and rows[0]["route_weight"] is None else col("route_weight", np.float32),
            action_mask_BL=None if not any("action" in r for r in rows) else pad_sequences(
                [r.get("action", [0] * r["plen"] + [1] * r["rlen"]) for r in rows], 0, tokens.shape[1], np.bool_))

    def evaluate(self, prompts: list, k: int, seed: int) -> dict:
        """Greedy accuracy and pass@k per domain under the engine's current weights."""
        from .evaluation import evaluate_llm

        runner = None
        if any(p.get("env") for p in prompts):  # episodes, with this replica's environment actors
            self._episode_runner()
            runner = self.episode_runner
        return evaluate_llm(self.llm, self.tokenizer, prompts, self.rewards, k, seed, self.cfg["max_new_tokens"],
                            stop_token_ids=self.stop_ids(), env=self.cfg["env"], runner=runner,
                            thinking_tags=self._thinking_tags())

    # ------------------------------------------------------------------ weight sync
    def _in_process(self) -> bool:
        """The engine's workers live in this process (tensors pass through collective_rpc as they are)."""
        import os

        return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and self.cfg["tensor_parallel_size"] == 1

    def _loaded(self, version: int, reports: list) -> None:
        """``reports``: each worker's load report (modules that did not receive all their tensors)."""
        self.llm.reset_prefix_cache()  # stale prefix cache gave log-probs off by >1 after an update
        self.weight_version = version
        self.incomplete = sorted({tuple(m) for r in reports if isinstance(r, dict) for m in r.get("incomplete", [])})

    def update_weights_from_store(self, state: dict, version: int) -> float:
        """``state`` is {name: ndarray}, resolved by Ray from the learner's ObjectRef in this process
        (zero-copy views of the object store); handed to the workers bucket by bucket."""
        from safetensors.torch import save

        from ..sync import choose_bucket_bytes, state_buckets

        t0 = time.perf_counter()
        local = self._in_process()
        self.llm.collective_rpc("mopd_begin_load")
        bucket = choose_bucket_bytes(self.cfg["weight_sync_bucket_mb"] << 20, self.engine_free_memory())
        for named in state_buckets(state, bucket):
            self.llm.collective_rpc("mopd_load_bucket", args=(named if local else save(
                {n: t.contiguous() for n, t in named}),))
        self._loaded(version, self.llm.collective_rpc("mopd_finish_load"))
        return time.perf_counter() - t0

    def reuse(self, *args, **kwargs) -> bool:
        """Taken by another run with the same arguments (mopd_ray/warm.py): back to the folder's weights,
        weight version 0 (the earlier run left its trained weights in the engine)."""
        from pathlib import Path

        from safetensors.numpy import load_file

        if getattr(self, "env_pool", None) is not None:  # the earlier run's environments and episodes
            self.episode_runner.reset()
            self.env_pool.shutdown()
            self.env_pool = None
        state: dict = {}
        for f in sorted(Path(self.model_path).glob("*.safetensors")):
            state.update(load_file(str(f)))
        self.update_weights_from_store(state, 0)
        return True

    def init_sync_group(self, host: str, port: int, rank_base: int, world_size: int, metas: list,
                        bucket_bytes: int, timeout_s: float) -> list:
        """Every worker process of this engine joins the sync group (ranks rank_base .. + TP - 1)."""
        plain = [(m.name, list(m.shape), m.dtype) for m in metas]  # survives vLLM's RPC serialisation
        return self.llm.collective_rpc("mopd_join_sync_group",
                                       args=(host, port, rank_base, world_size, plain, bucket_bytes, timeout_s))

    def receive_weights(self, version: int) -> float:
        import os

        t0 = time.perf_counter()
        fault = self.cfg.get("fault_exit")  # chaos testing: exit inside this receive, once per run
        exit_now = bool(fault and fault["version"] == version and self.replica_index == 0
                        and not os.path.exists(fault["marker"]))
        if exit_now:
            os.makedirs(os.path.dirname(fault["marker"]), exist_ok=True)
            with open(fault["marker"], "w") as f:
                f.write(f"rollout replica 0 exits inside the receive of weight version {version}\n")
        self._loaded(version, self.llm.collective_rpc("mopd_receive_weights", args=(exit_now,)))
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ checks
    def score_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Log-probs of given token ids under the engine's current weights (position l: token l)."""
        from vllm import SamplingParams

        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)
        res = []
        for s, o in zip(sequences, outs):
            res.append(np.asarray([0.0] + [o.prompt_logprobs[i][s[i]].logprob for i in range(1, len(s))], np.float32))
        return res

    def probe_sequences(self) -> list:
        """The pre-flight's probe, rendered by this engine's tokenizer (mopd_ray/sync_check.py)."""
        from ..models.compat import stop_ids
        from ..preflight import probe_sequences

        return probe_sequences(self.tokenizer, stop_ids(self.tokenizer, self.model_path) or [self.tokenizer.eos_token_id])

    def sync_report(self, probes: list) -> dict:
        """After a sync: the engine's log-probs of ``probes``, the modules the load left incomplete, the
        architecture (mopd_ray/sync_check.py)."""
        import json
        from pathlib import Path

        try:
            arch = ",".join(json.loads(Path(self.model_path, "config.json").read_text()).get("architectures") or [])
        except (OSError, ValueError):
            arch = "?"
        return {"logprobs": self.score_logprobs(probes), "incomplete": getattr(self, "incomplete", []),
                "version": self.weight_version, "architecture": arch}

    def tokenizer_fingerprint(self, path: Optional[str] = None) -> dict:
        from ..models.compat import tokenizer_fingerprint

        return tokenizer_fingerprint(self.tokenizer)


def _count_by(domains: list, flags: list) -> dict:
    out: dict = {}
    for d, f in zip(domains, flags):
        out[d] = out.get(d, 0) + int(bool(f))
    return out


def overlong_penalty(length: int, truncated: bool, cfg: dict) -> float:
    """DAPO's soft overlong punishment (rollout.overlong=penalty): 0 until the last ``overlong_buffer``
    tokens before max_new_tokens, then rising linearly to ``overlong_penalty``, which a truncated response
    gets in full. 0 for the other settings."""
    if cfg.get("overlong", "keep") != "penalty":
        return 0.0
    full = float(cfg.get("overlong_penalty", 1.0))
    if truncated:
        return full
    limit, buffer = int(cfg["max_new_tokens"]), int(cfg.get("overlong_buffer", 0))
    start = limit - buffer
    if buffer <= 0 or length <= start:
        return 0.0
    return full * min(1.0, (length - start) / buffer)


def sampling_params(cfg: dict, prompts: list, step: int, seed: int) -> list:
    """One SamplingParams per prompt: ``n_samples_per_prompt`` samples, seeded by run seed, step and group."""
    from vllm import SamplingParams

    return [SamplingParams(n=cfg["n_samples_per_prompt"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                           max_tokens=cfg["max_new_tokens"], stop_token_ids=list(cfg.get("stop_token_ids") or []),
                           logprobs=0 if cfg.get("logprobs", True) else None,
                           # text is decoded once for rewards (reward_rows); vLLM's detokenizing of every
                           # sampled token and its log-prob entry cost ~20% of the generate time
                           detokenize=False,
                           # flat lists instead of a dict and a Logprob object per sampled token
                           # (one engine, 16 x 32 tokens: 143 against 149 ms per generate)
                           flat_logprobs=True,
                           seed=(seed * 1_000_003 + step * 10_007 + p["group_id"]) % (2**31))
            for p in prompts]


def reward_rows(train_rewards, cfg: dict, prompts: list, per_prompt: list) -> None:
    """Each row's ``reward``: its environment's, else the domain's train reward of its text (NaN for a failed
    episode or a domain without one), less the overlong penalty; the rows' texts dropped."""
    flat = [(p, row) for p, rows in zip(prompts, per_prompt) for row in rows]
    judged = [(p, row) for p, row in flat if row.get("env_reward") is None and not row.get("failed")]
    scores = train_rewards.score([(p["domain"], row["text"], p.get("answer")) for p, row in judged])
    for (_, row), r in zip(judged, scores):
        row["env_reward"] = r
    for _, row in flat:
        r = None if row.pop("failed", False) else row.pop("env_reward", None)
        row.pop("text")
        row["reward"] = np.nan if r is None else r - overlong_penalty(row["rlen"], row["truncated"], cfg)

"""Learner rank: DeepSpeed ZeRO-1/2/3 over a transformers causal LM.

``train_step`` takes the ObjectRefs of this rank's own rows (its parts of the step's rollout shards and
their teacher scores; see mopd_ray.dispatch), gets them in this process, recomputes pi_old (or takes it
from the training forward when they are equal), builds advantages and the loss from algo/, and steps.
Global loss denominators, normalisation moments and per-teacher statistics are small all-reduces; GRPO
groups never straddle ranks.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np

from ..algo.mismatch import needs_rollout_logprobs
from ..batch import RolloutBatch, batch_nbytes
from .base import RoleWorker

def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * frac
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


class LearnerWorker(RoleWorker):
    def __init__(self, rank: int, world_size: int, model_path: str, learner_cfg: dict, algo_cfg: dict,
                 teacher_names: list, teacher_weights: list, teacher_signals: list, total_steps: int,
                 rows_per_step: int, temperature: float = 1.0, seed: int = 0, trust_remote_code: bool = False):
        from ..console import quiet_worker

        quiet_worker()
        self.rank, self.world_size = rank, world_size
        self.model_path, self.cfg, self.algo = model_path, learner_cfg, algo_cfg
        self.teacher_names, self.teacher_weights, self.teacher_signals = teacher_names, teacher_weights, teacher_signals
        self.total_steps, self.rows_per_step = total_steps, rows_per_step
        self.temperature, self.seed, self.trust_remote_code = temperature, seed, trust_remote_code
        self.teacher_heads: dict = {}
        self.sync_group = None
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ set-up
    def master_address(self, single_node: bool = False) -> tuple:
        """Where the other members rendezvous with this rank: a fresh file on one node (local mode: no
        listening socket; torch's TCPStore binds every interface), else this node's address and a port."""
        import ray

        from ..cluster import free_port, rendezvous_file

        if single_node:
            return rendezvous_file(), 0
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def setup(self, master_addr: str, master_port: int, timeout_s: float = 600.0) -> dict:
        """Join the ranks' process group, then build the model, optimizer and DeepSpeed engine."""
        from .deepspeed_env import init_distributed, set_dist_env

        if master_addr.startswith("file://"):
            set_dist_env(self.rank, self.world_size, "127.0.0.1", 0)
            init_distributed(timeout_s, init_method=master_addr, rank=self.rank, world_size=self.world_size)
        else:
            set_dist_env(self.rank, self.world_size, master_addr, master_port)
            init_distributed(timeout_s)
        return self._build_engine()

    def reload(self, model_path: str, learner_cfg: dict, total_steps: int, rows_per_step: int, seed: int) -> dict:
        """Another model and optimizer in the same ranks (their process group kept): one learner group
        trains several models in turn (the demonstration's bootstrap), each as a fresh group would."""
        import gc

        self.engine = self.optimizer = self.scheduler = None
        gc.collect()
        self.model_path, self.cfg, self.total_steps, self.rows_per_step, self.seed = (
            model_path, learner_cfg, total_steps, rows_per_step, seed)
        self.optimizer_steps = 0
        return self._build_engine()

    def _build_engine(self) -> dict:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .deepspeed_env import zero_config

        torch.manual_seed(self.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        c = self.cfg
        dtype = getattr(torch, c["dtype"])
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32 if dtype == torch.float32
                                                     else dtype, trust_remote_code=self.trust_remote_code,
                                                     use_safetensors=True)  # never unpickle weights
        if c["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        self.vocab_size = len(AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code))
        per_rank = self.rows_per_step // c["mini_batches_per_step"] // self.world_size
        self.micro = min(c["micro_batch_size"], per_rank)
        self.grad_accum = max(1, math.ceil(per_rank / self.micro))
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=tuple(c["betas"]),
                                weight_decay=c["weight_decay"])
        total = self.total_steps * c["mini_batches_per_step"]
        min_ratio = c["min_lr"] / c["lr"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, c["warmup_steps"], c["lr_schedule"], min_ratio))
        ds_cfg = zero_config(stage=c["zero_stage"], micro_batch_size=self.micro, grad_accum=self.grad_accum,
                             world_size=self.world_size, dtype=c["dtype"], grad_clip=c["grad_clip"],
                             offload_optimizer=c["offload_optimizer"])
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
        self.zero_stage = c["zero_stage"]
        return {"rank": self.rank, "micro_batch_size": self.micro, "grad_accum": self.grad_accum,
                "params": sum(p.numel() for p in model.parameters())}

    def set_teacher_heads_from_refs(self, head_refs: dict) -> bool:
        import ray

        return self.set_teacher_heads({i: ray.get(r) for i, r in head_refs.items()})

    def set_teacher_heads(self, heads: dict) -> bool:
        """{teacher index: (W [V, H] ndarray, bias or None)} for full-vocabulary teachers (frozen)."""
        import torch

        self.teacher_heads = {int(i): (torch.from_numpy(np.array(w)).to(self.device),
                                       None if b is None else torch.from_numpy(np.array(b)).to(self.device))
                              for i, (w, b) in heads.items()}
        return True

    # ------------------------------------------------------------------ training
    def _forward_logits(self, tokens, attn):
        return self.engine(input_ids=tokens, attention_mask=attn).logits.float()

    def train_step(self, parts: list, step: int) -> dict:
        """One rollout batch on this rank's rows: fetch, pi_old, advantages, optimizer steps; metrics.

        ``parts`` are exactly this rank's rows: [{"mini_batch": m, "batch": ref, "scores": [refs]}]
        (see mopd_ray.dispatch). What needs the whole batch (loss denominators, normalisation moments,
        per-teacher statistics) comes from small all-reduces, never from other ranks' payloads.
        When nothing needs every row's teacher scores before the first backward (one mini-batch, no
        advantage normalisation), training starts as soon as the first micro-batch's scores are in:
        teachers still score later rollout shards while earlier ones train.
        """
        t0 = time.perf_counter()
        fused = self._fused_old_logprobs()
        g = self._fetch_rows(parts)  # rollout rows now; teacher scores as they arrive (_await_rows)
        g["t0"] = t0
        t = self._tensors(g)
        # pi_old needs no teacher score: its forward runs while teachers still score
        old_lp = t["rollout_lp"].clone() if fused or not self.cfg["recompute_old_logprobs"] else self._old_logprobs(g, t)
        if not fused:  # the advantages' normalisation (or several mini-batches) needs every row's scores first
            self._await_rows(g, t, None)
        adv = None if fused else self._distill_advantages(t, old_lp)
        loop = self._optimize(g, t, old_lp, adv, step, fused)
        self._await_rows(g, t, None)  # parts with no rows on this rank are still checked
        _check_scored(g, self.teacher_names)
        return self._metrics(g, t, old_lp, loop, t0)

    # each named step of train_step below

    def _fetch_rows(self, parts: list) -> dict:
        """ray.get this rank's rollout parts: local [n, L] arrays and each row's mini-batch. Their teacher
        scores are fetched later by ``_await_rows`` (all at once, or micro-batch by micro-batch)."""
        import ray
        import torch
        import torch.distributed as dist

        t0 = time.perf_counter()
        batches: list[RolloutBatch] = ray.get([p["batch"] for p in parts])
        g = _layout(batches, self.teacher_names)
        g["score_refs"] = [list(p["scores"]) for p in parts]
        g["fetched_bytes"] = sum(batch_nbytes(b) for b in batches)
        g["mini_B"] = np.concatenate([np.full(b.num_rows, p["mini_batch"], np.int64) for b, p in zip(batches, parts)])
        n_mini = self.cfg["mini_batches_per_step"]
        mine = [np.nonzero(g["mini_B"] == m)[0] for m in range(n_mini)]
        if self.teacher_heads:  # group rows by teacher so one output head is used at a time
            mine = [r[np.lexsort(g["teacher_index"][r].T[::-1])] for r in mine]
        g["rows_by_mini"] = mine
        # global denominators of each mini-batch: response tokens and non-empty sequences over all ranks
        totals = torch.tensor([[g["mask"][r].sum(), (g["mask"][r].sum(-1) > 0).sum()] for r in mine], dtype=torch.float64)
        dist.all_reduce(totals)
        g["totals"] = totals
        g["fetch_s"] = time.perf_counter() - t0  # waiting for rollouts / scores still in flight, and the copy
        return g

    def _await_rows(self, g: dict, t: Optional[dict], rows) -> int:
        """Fetch and place the teacher scores of every part holding some of ``rows`` (None: all parts);
        refresh the teacher tensors of ``t`` for those rows. The wait counts as fetch time. Returns how many
        of those scores were still being computed when called (0: all were in)."""
        import ray

        todo = [k for k in range(len(g["offsets"]) - 1) if k not in g["placed"] and (
            rows is None or ((rows >= g["offsets"][k]) & (rows < g["offsets"][k + 1])).any())]
        if not todo:
            return 0
        t0 = time.perf_counter()
        refs = [r for k in todo for r in g["score_refs"][k]]
        pending = len(refs) - len(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        got = ray.get(refs)
        g["fetch_s"] += time.perf_counter() - t0
        for k in todo:
            mine, got = got[:len(g["score_refs"][k])], got[len(g["score_refs"][k]):]
            _place(g, k, mine, self.teacher_names)
            g["fetched_bytes"] += sum(s.nbytes() for s in mine)
            if t is not None:
                self._teacher_tensors(g, t, np.arange(g["offsets"][k], g["offsets"][k + 1]))
        return pending

    def _tensors(self, g: dict) -> dict:
        """Torch views of the local rows, each slot's teacher, signal and per-token coefficient, outcome
        advantages. ``teacher_lp`` is [S, N, L]: slot s of every row (zeros where the slot is empty)."""
        import torch

        from ..algo import OUTCOME_ESTIMATORS, mix_advantages
        from .loss import SIGNAL_IDS

        dev = self.device
        tidx = torch.from_numpy(g["teacher_index"].astype(np.int64)).to(dev)  # [N, S]
        t = {"tokens": torch.from_numpy(g["tokens"].astype(np.int64)).to(dev),
             "mask": torch.from_numpy(g["mask"].astype(np.float32)).to(dev),
             "attn": torch.from_numpy(g["attn"]).long().to(dev),
             "rollout_lp": torch.from_numpy(g["rollout_lp"]).to(dev), "tidx": tidx}
        S, (N, L) = len(g["slots"]), g["mask"].shape
        t["teacher_lp"] = torch.zeros((S, N, L), dtype=torch.float32, device=dev)  # filled as scores arrive
        t["coef"] = torch.zeros((S, N, L), dtype=torch.float32, device=dev)
        empty = tidx < 0
        safe = tidx.clamp(min=0)
        if self.teacher_names:
            w = torch.tensor(self.teacher_weights, dtype=torch.float32, device=dev)[safe]
            coef = torch.where(empty, 0.0, w * torch.from_numpy(g["route_weight"]).to(dev))  # [N, S]
            signal = torch.tensor([SIGNAL_IDS[x] for x in self.teacher_signals], device=dev)[safe]
            t["signal"] = torch.where(empty, -1, signal)
        else:  # reward-only (GRPO): no distillation term, the outcome advantage alone
            coef = torch.zeros(tidx.shape, dtype=torch.float32, device=dev)
            t["signal"] = torch.full(tidx.shape, -1, dtype=torch.long, device=dev)
        t["coef_NS"] = coef
        if len(g["placed"]) == len(g["offsets"]) - 1:
            self._teacher_tensors(g, t, np.arange(N))
        a = self.algo
        t["outcome"] = torch.zeros_like(t["mask"])
        if a["alpha"] > 0 and g["has_reward"].any():  # groups never straddle ranks (dispatch plan)
            rewards = torch.from_numpy(np.nan_to_num(g["rewards"])).to(dev)
            t["outcome"] = mix_advantages(torch.zeros_like(t["mask"]), OUTCOME_ESTIMATORS.get(a["outcome_estimator"])(
                rewards, torch.from_numpy(g["group_ids"]).to(dev), t["mask"]).float(), a["alpha"],
                torch.from_numpy(g["has_reward"]).to(dev))
        return t

    def _teacher_tensors(self, g: dict, t: dict, rows: np.ndarray) -> None:
        """Teacher log-probs [S, n, L] and per-token coefficients of ``rows``, from their placed scores."""
        import torch

        r = torch.from_numpy(rows).to(self.device)
        lp = torch.from_numpy(np.stack([sl["lp"][rows] for sl in g["slots"]])).to(self.device)
        t["teacher_lp"][:, r] = lp
        t["coef"][:, r] = self._token_coefficients(t["coef_NS"][r], lp)

    def _token_coefficients(self, coef_NS, teacher_lp_SNL):
        """[S, N, L] coefficient of each slot at each token. ``fixed``: the slot's weight everywhere;
        ``confidence``: a row's total weight shared among its teachers in proportion to weight x the
        teacher's probability of the sampled token (a teacher unsure of a token cedes it to the others)."""
        import torch

        fixed = coef_NS.T[:, :, None].expand_as(teacher_lp_SNL)
        if self.algo.get("teacher_combine", "fixed") == "fixed" or coef_NS.shape[1] == 1:
            return fixed.contiguous()
        logit = torch.where(fixed > 0, torch.log(fixed.clamp(min=1e-30)) + teacher_lp_SNL, float("-inf"))
        share = torch.nan_to_num(torch.softmax(logit, dim=0), nan=0.0)  # rows without a teacher: 0
        return (share * coef_NS.sum(-1)[None, :, None]).detach()

    def _fused_old_logprobs(self) -> bool:
        """pi_old equals the training forward when one mini-batch is trained and nothing needs pi_old of
        every row before the first backward (advantage normalisation): skip the extra forward then."""
        return (self.cfg["recompute_old_logprobs"] and self.cfg["mini_batches_per_step"] == 1
                and self.algo["normalize_advantages"] == "none")

    def _old_logprobs(self, g: dict, t: dict):
        """pi_old of every local row with the weights before this step's updates."""
        import torch

        from .loss import token_logprobs_from_logits

        old_lp = t["rollout_lp"].clone()
        mine = np.concatenate(g["rows_by_mini"])
        self.engine.eval()
        with torch.no_grad():
            for s in range(0, len(mine), self.micro):
                r = torch.from_numpy(mine[s: s + self.micro]).to(self.device)
                old_lp[r] = token_logprobs_from_logits(self._forward_logits(t["tokens"][r], t["attn"][r]),
                                                       t["tokens"][r], self.temperature)
        self.engine.train()
        return old_lp

    def _sampled_advantage(self, t: dict, old_lp, r=slice(None)):
        """Per slot, the sampled-token reverse-KL advantage of rows ``r`` (0 for slots of other signals):
        [S, n, L]; their sum over slots is the distillation advantage."""
        import torch

        from ..algo import reverse_kl_advantage
        from .loss import SIGNAL_IDS

        sampled = (t["signal"][r] == SIGNAL_IDS["sampled"]).T[:, :, None]  # [S, n, 1]
        return torch.stack([reverse_kl_advantage(t["teacher_lp"][s][r], old_lp[r], t["mask"][r],
                                                 t["coef"][s][r] * sampled[s], gamma=self.algo["kl_gamma"])
                            for s in range(sampled.shape[0])])

    def _distill_advantages(self, t: dict, old_lp):
        """Sampled-token reverse-KL advantage, normalised with moments summed over every rank's rows:
        ``teacher*`` normalises each teacher's terms over its own tokens (a row's slots separately), then
        sums the slots; ``batch*`` normalises the sum over the rows that have a sampled-signal teacher."""
        import torch.distributed as dist

        from ..algo import advantage_moments, normalize_advantages
        from .loss import SIGNAL_IDS

        adv_S = self._sampled_advantage(t, old_lp)
        norm = self.algo["normalize_advantages"]
        if norm == "none":
            return adv_S.sum(0)
        scale = not norm.endswith("_mean")
        sampled = t["signal"] == SIGNAL_IDS["sampled"]  # [N, S]
        if not norm.startswith("teacher"):
            mask = t["mask"] * sampled.any(-1)[:, None]
            groups = t["tidx"].new_zeros(t["tidx"].shape[0])
            moments = advantage_moments(adv_S.sum(0), mask, groups, 1)
            dist.all_reduce(moments)
            return normalize_advantages(adv_S.sum(0), mask, groups, moments, scale=scale)
        T = max(len(self.teacher_names), 1)
        groups = t["tidx"].clamp(min=0)  # an empty slot is masked out below
        masks = [t["mask"] * sampled[:, s, None] for s in range(adv_S.shape[0])]
        moments = sum(advantage_moments(adv_S[s], masks[s], groups[:, s], T) for s in range(adv_S.shape[0]))
        dist.all_reduce(moments)
        return sum(normalize_advantages(adv_S[s], masks[s], groups[:, s], moments, scale=scale)
                   for s in range(adv_S.shape[0]))

    def _optimize(self, g: dict, t: dict, old_lp, adv, step: int, fused: bool) -> dict:
        """``mini_batches_per_step`` optimizer steps over this rank's rows, micro-batch by micro-batch."""
        loop = {"loss": 0.0, "is_clip_fraction": 0.0, "pg_clip_fraction": 0.0, "approx_kl": 0.0,
                "distill_loss": 0.0, "entropy_sum": 0.0, "n_micro": 0, "grad_norms": [], "skipped": 0,
                "nonfinite": None, "signal_free": 0}
        agg = self.algo["loss_agg"]
        for m, rows in enumerate(g["rows_by_mini"]):
            if self._signal_free(t, rows):
                loop["signal_free"] += 1
                continue
            den_global = float(g["totals"][m, 0 if agg == "token_mean" else 1])
            denominator = max(den_global, 1.0) / (self.world_size * self.grad_accum)
            before = {k: v for k, v in loop.items() if isinstance(v, (int, float))}
            skipped_before = self.engine.skipped_steps
            loop["poisoned"] = False
            done = True
            for s in range(0, len(rows), self.micro):
                if not self._micro_step(g, t, old_lp, adv, rows, s, denominator, step, fused, loop):
                    done = False  # garbage in the first micro-batch: nothing was accumulated
                    break
            if loop["poisoned"]:  # garbage after some micro-batches: DeepSpeed dropped the accumulated step
                if self.engine.skipped_steps != skipped_before + 1:
                    raise RuntimeError(
                        f"step {step}: a non-finite loss in the middle of gradient accumulation was not skipped by "
                        "DeepSpeed (the update may hold NaN); set learner.max_grad_norm > 0 or raise "
                        "learner.micro_batch_size to the rows per rank")
                loop.update({k: v for k, v in before.items() if k not in ("skipped",)})
                loop["skipped"] += 1
                done = False
            if done:
                gn = self.engine.get_global_grad_norm()
                loop["grad_norms"].append(float(gn) if gn is not None else float("nan"))
                self.optimizer_steps += 1
        return loop

    def _signal_free(self, t: dict, rows: np.ndarray) -> bool:
        """Reward-only GRPO: True when no row of this mini-batch on any rank has a non-zero advantage (every
        group's rewards equal). Its step is skipped: Adam would still move the weights by its momentum
        (several learning-rate-sized steps after each rare rewarded batch), with nothing learned."""
        import torch

        if self.teacher_names or not self.algo.get("skip_signal_free_steps", True):
            return False
        r = torch.from_numpy(rows).to(self.device)
        return not _any_rank(bool((t["outcome"][r] != 0).any()) if len(rows) else False)

    def _micro_step(self, g, t, old_lp, adv, rows, s, denominator, step, fused, loop) -> bool:
        """Forward, loss, backward of one micro-batch; False (nothing stepped) on a non-finite loss."""
        import torch

        from .loss import MicroBatch, entropy_from_logits, micro_batch_loss, token_logprobs_from_logits

        a, dev = self.algo, self.device
        idx = rows[s: s + self.micro]
        g.setdefault("start_s", time.perf_counter() - g["t0"])  # when training began
        r = torch.from_numpy(idx).to(dev)
        # the student's forward needs no teacher score: it runs while later shards are still being scored
        logits = self._forward_logits(t["tokens"][r], t["attn"][r])
        if self._await_rows(g, t, idx):  # this micro-batch's scores (streamed: later shards still scoring)
            g["forwards_ahead"] = g.get("forwards_ahead", 0) + 1  # its forward ran while they were computed
        bad = self._nonfinite_inputs(g, idx, None if fused else old_lp)
        if fused:  # pi_old == pi_theta now: take it from this forward instead of a second one
            old_lp[r] = token_logprobs_from_logits(logits.detach(), t["tokens"][r], self.temperature)
            distill = self._sampled_advantage(t, old_lp, r).sum(0)
        else:
            distill = adv[r]
        take = (lambda arr: None if arr is None else torch.from_numpy(arr[idx]).to(dev))
        slots = g["slots"]
        mb = MicroBatch(
            tokens_bL=t["tokens"][r], response_mask_bL=t["mask"][r], old_logprobs_bL=old_lp[r],
            rollout_logprobs_bL=t["rollout_lp"][r], advantages_bL=distill + t["outcome"][r],
            coef_SbL=t["coef"][:, r], teacher_index_bS=t["tidx"][r], signal_bS=t["signal"][r],
            topk_ids_SbLK=[None if sl["topk_ids"] is None else take(sl["topk_ids"]).long() for sl in slots],
            topk_logprobs_SbLK=[take(sl["topk_lp"]) for sl in slots],
            hidden_SbLH=[None if sl["hidden"] is None else sl["hidden"][torch.from_numpy(idx)].to(dev).float()
                         for sl in slots],
            outcome_advantages_bL=t["outcome"][r] if a["alpha"] > 0 else None)
        loss, mets = micro_batch_loss(logits, mb, a, denominator, self.teacher_heads, self.temperature,
                                      self.vocab_size)
        # garbage in (non-finite teacher scores, log-probs) or a non-finite loss on any rank: this update
        # is skipped on every rank (one all-reduce per micro-batch; ranks take the same branch)
        if _any_rank(bad is not None or not bool(torch.isfinite(loss))):
            if not loop["poisoned"]:
                loop["nonfinite"] = bad or (None if bool(torch.isfinite(loss)) else {
                    "teachers": self._names(g["teacher_index"][idx]), "stats": {"loss": float(loss), "rows": len(idx)}}) \
                    or {"teachers": [], "stats": "non-finite on another rank"}
            if s == 0:
                loop["skipped"] += 1
                return False
            # mid-accumulation: gradients of earlier micro-batches are already reduced. Make the
            # accumulated gradient non-finite on every rank, so DeepSpeed drops the step and clears them
            # (its overflow path, checked in _optimize); the remaining micro-batches run to the boundary
            loop["poisoned"] = True
        if loop["poisoned"]:
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()
        if not loop["poisoned"]:
            loop["entropy_sum"] += float((entropy_from_logits(logits) * t["mask"][r]).sum())
            loop["loss"] += loss.item() / (self.world_size * self.grad_accum)
            for k, v in mets.items():
                loop[k] = loop.get(k, 0.0) + v
            loop["n_micro"] += 1
        return True

    def _metrics(self, g: dict, t: dict, old_lp, loop: dict, t0: float) -> dict:
        """Per-teacher and step statistics summed over every rank (one all-reduce), as step metrics."""
        import torch
        import torch.distributed as dist

        T, n_mini, ws = len(self.teacher_names), self.cfg["mini_batches_per_step"], self.world_size
        mask, tidx = t["mask"].double(), t["tidx"]
        stats = torch.zeros(9 + 3 * T, dtype=torch.float64)
        for s in range(tidx.shape[1]):  # each teacher over the tokens it scored, in whichever slot
            log_ratio = t["teacher_lp"][s] - old_lp
            k1, k3 = -log_ratio.double() * mask, (torch.expm1(log_ratio) - log_ratio).double() * mask
            for i in range(T):
                sel = tidx[:, s] == i
                stats[9 + 3 * i: 12 + 3 * i] += torch.stack([mask[sel].sum(), k1[sel].sum(), k3[sel].sum()])
        stats[0] = mask.sum()
        stats[1] = ((old_lp - t["rollout_lp"]).abs().double() * mask).sum()
        stats[2:9] = torch.tensor([loop["entropy_sum"], loop["loss"], loop["is_clip_fraction"] / max(loop["n_micro"], 1),
                                   loop["pg_clip_fraction"] / max(loop["n_micro"], 1),
                                   loop["distill_loss"] / (ws * self.grad_accum), float(g["tokens"].shape[0]),
                                   float(g["fetched_bytes"])], dtype=torch.float64)
        stats.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # garbage rows are reported, not averaged in
        dist.all_reduce(stats)
        tok = max(stats[0].item(), 1.0)
        metrics = {"loss": stats[3].item() / n_mini, "entropy": stats[2].item() / tok,
                   "is_clip_fraction": stats[4].item() / ws, "pg_clip_fraction": stats[5].item() / ws,
                   "train_rollout_logprob_gap": stats[1].item() / tok,
                   "grad_norm": float(np.mean(loop["grad_norms"])) if loop["grad_norms"] else float("nan"),
                   "lr": self.scheduler.get_last_lr()[0], "learner_step_s": time.perf_counter() - t0,
                   "response_tokens": stats[0].item(), "rows": int(stats[7].item()), "skipped_minibatches": loop["skipped"],
                   "signal_free_minibatches": loop["signal_free"],
                   "learner/fetched_bytes": g["fetched_bytes"], "learner/fetched_bytes_all_ranks": stats[8].item(),
                   "learner/fetch_s": g["fetch_s"], "learner/start_s": g.get("start_s", float("nan")),
                   "learner/forwards_ahead_of_scores": g.get("forwards_ahead", 0), "learner/compute_s": time.perf_counter() - t0 - g["fetch_s"]}
        if not needs_rollout_logprobs(self.algo["is_correction"], self.cfg["recompute_old_logprobs"]):
            del metrics["train_rollout_logprob_gap"]  # the rollout was not asked for its log-probs
        if loop["nonfinite"]:
            metrics["nonfinite"] = loop["nonfinite"]
        if any(s != "sampled" for s in self.teacher_signals):
            metrics["distill_loss"] = stats[6].item() / n_mini
        for i, name in enumerate(self.teacher_names):
            n_t = stats[9 + 3 * i].item()
            metrics[f"teacher/{name}/token_share"] = n_t / tok
            metrics[f"teacher/{name}/tokens"] = n_t
            if n_t > 0:
                metrics[f"teacher/{name}/reverse_kl"] = stats[10 + 3 * i].item() / n_t
                metrics[f"teacher/{name}/reverse_kl_k3"] = stats[11 + 3 * i].item() / n_t
        # over every (token, teacher) pair: a row with two teachers counts against each
        metrics["reverse_kl"] = (sum(stats[10 + 3 * i].item() for i in range(T))
                                 / max(sum(stats[9 + 3 * i].item() for i in range(T)), 1.0))
        return metrics

    def sft_step(self, sequences: list, prompt_lens: list) -> dict:
        """One supervised step (bootstrap of teachers and the base student): token-mean cross-entropy on
        the response tokens of every row, rows split across ranks, one optimizer step."""
        import torch

        from ..batch import pad_sequences
        from .loss import token_logprobs_from_logits

        n = len(sequences)
        per = n // self.world_size
        mine = range(self.rank * per, (self.rank + 1) * per)
        tokens_all = pad_sequences(sequences, 0)
        lens = np.array([len(s) for s in sequences])
        pos = np.arange(tokens_all.shape[1])[None]
        mask_all = (pos >= np.array(prompt_lens)[:, None]) & (pos < lens[:, None])
        den = max(float(mask_all.sum()), 1.0) / (self.world_size * self.grad_accum)
        total = 0.0
        rows = np.array(list(mine))
        for s in range(0, len(rows), self.micro):
            r = rows[s: s + self.micro]
            tokens = torch.from_numpy(tokens_all[r].astype(np.int64)).to(self.device)
            attn = torch.from_numpy(pos < lens[r][:, None]).long().to(self.device)
            mask = torch.from_numpy(mask_all[r]).float().to(self.device)
            lp = token_logprobs_from_logits(self._forward_logits(tokens, attn), tokens)
            loss = -(lp * mask).sum() / den
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item() / (self.world_size * self.grad_accum)
        self.optimizer_steps += 1
        return {"sft_loss": total}

    def _nonfinite_inputs(self, g: dict, rows: np.ndarray, old_lp) -> Optional[dict]:
        """None if every input of these rows is finite at response positions, else what was not.
        ``old_lp`` None: pi_old comes from the training forward (a non-finite one shows in the loss)."""
        import torch

        m = g["mask"][rows]
        old = None if old_lp is None else old_lp[torch.from_numpy(rows)].cpu().numpy()
        slots = g["slots"]
        checks = {"teacher_logprobs": np.concatenate([sl["lp"][rows][m] for sl in slots]),
                  "rollout_logprobs": g["rollout_lp"][rows][m]}
        if old is not None:
            checks["old_logprobs"] = old[m]
        if any(sl["topk_lp"] is not None for sl in slots):
            checks["topk_logprobs"] = np.concatenate([sl["topk_lp"][rows][m] for sl in slots if sl["topk_lp"] is not None])
        if any(sl["hidden"] is not None for sl in slots):
            checks["hidden_states"] = np.concatenate([sl["hidden"][torch.from_numpy(rows)][torch.from_numpy(m)].float().numpy()
                                                      for sl in slots if sl["hidden"] is not None])
        counts = {k: int((~np.isfinite(v)).sum()) for k, v in checks.items()}
        if not any(counts.values()):
            return None
        bad_slot = np.stack([~np.isfinite(np.where(g["mask"][rows], sl["lp"][rows], 0)).all(-1) for sl in slots], -1)
        bad = bad_slot.any(-1)
        if old is not None:
            bad |= ~np.isfinite(np.where(g["mask"][rows], old, 0)).all(-1)
        bad_rows = rows[bad]
        # the teachers whose scores were not finite (every teacher of a row whose pi_old was not)
        culprit = np.where(bad_slot[bad] | ~bad_slot[bad].any(-1, keepdims=True), g["teacher_index"][bad_rows], -1)
        teachers = self._names(culprit)
        return {"teachers": teachers, "stats": {"rows": int(len(rows)), "response_tokens": int(m.sum()),
                                                "nonfinite_counts": counts, "bad_rows": int(len(bad_rows))}}

    def _names(self, tidx: np.ndarray) -> list:
        """Sorted names of the teachers among slot indices ``tidx`` (-1: none)."""
        return sorted({self.teacher_names[i] for i in np.asarray(tidx).ravel().tolist() if i >= 0})

    # ------------------------------------------------------------------ weights
    def compute_logprobs(self, sequences: list, temperature: Optional[float] = None) -> list:
        """Log-probs of given token ids under the current weights, at ``temperature`` (default: the run's
        sampling temperature; collective under ZeRO-3: call on all ranks)."""
        import torch

        from ..batch import pad_sequences
        from .loss import token_logprobs_from_logits

        tokens = torch.from_numpy(pad_sequences(sequences, 0).astype(np.int64)).to(self.device)
        lens = torch.tensor([len(s) for s in sequences])
        attn = (torch.arange(tokens.shape[1])[None] < lens[:, None]).long().to(self.device)
        self.engine.eval()
        with torch.no_grad():
            lp = token_logprobs_from_logits(self._forward_logits(tokens, attn), tokens,
                                            self.temperature if temperature is None else temperature)
        self.engine.train()
        return [lp[i, : len(s)].cpu().numpy() for i, s in enumerate(sequences)]

    def param_metas(self) -> list:
        from ..sync import param_meta

        return param_meta(self.engine.module, self.zero_stage)

    def export_to_store(self):
        """All ranks call (ZeRO-3 gathers are collective); rank 0 puts {name: ndarray} and returns [ref]."""
        import ray

        from ..sync import iter_full_params, to_numpy_state

        state = to_numpy_state(iter_full_params(self.engine.module, self.zero_stage))
        return [ray.put(state)] if self.rank == 0 else None

    def init_sync_group(self, host: str, port: int, world_size: int, timeout_s: float) -> bool:
        from ..sync import make_group

        self.sync_group = make_group(host, port, 0, world_size, timeout_s)
        return True

    def broadcast_weights(self, bucket_bytes: int) -> int:
        from ..sync import broadcast_send, iter_full_params

        return broadcast_send(self.sync_group, iter_full_params(self.engine.module, self.zero_stage),
                              self.param_metas(), bucket_bytes, is_sender=self.rank == 0)

    def save_checkpoint(self, path: str) -> bool:
        """DeepSpeed state of this rank (collective) into <path>/learner; rank 0 exports <path>/student."""
        self.engine.save_checkpoint(f"{path}/learner", tag="state",
                                    client_state={"optimizer_steps": self.optimizer_steps})
        self.save_pretrained(f"{path}/student")
        return True

    def load_checkpoint(self, path: str) -> int:
        _, client = self.engine.load_checkpoint(f"{path}/learner", tag="state")
        if client is None:
            raise RuntimeError(f"rank {self.rank}: no learner state in {path}/learner")
        self.optimizer_steps = int(client.get("optimizer_steps", 0))
        return self.optimizer_steps

    def save_pretrained(self, path: str) -> Optional[str]:
        """Transformers-format export (safetensors) of the student; all ranks call, rank 0 writes."""
        from ..sync import iter_full_params

        state = {n: t.cpu() for n, t in iter_full_params(self.engine.module, self.zero_stage)}
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(path, state_dict={k: v.contiguous() for k, v in state.items()},
                                           safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code).save_pretrained(path)
        return path


def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks take the same branch)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _assemble(shards: list, scores: list, teacher_names: list) -> dict:
    """Concatenate shards into [N, L] arrays and place each teacher's scores in its rows' slots.

    ``slots[s]`` holds slot s of every row: ``lp`` [N, L], and ``topk_ids`` / ``topk_lp`` [N, L, K] and
    ``hidden`` [N, L, H] where some teacher of that slot serves those signals (else None).
    """
    out = _layout(shards, teacher_names)
    for k, s_list in enumerate(scores):
        _place(out, k, s_list, teacher_names)
    _check_scored(out, teacher_names)
    return out


def _layout(shards: list, teacher_names: list) -> dict:
    """The rollout side of ``_assemble``: [N, L] arrays of the shards' rows, empty teacher slots."""
    L = max(b.tokens_BL.shape[1] for b in shards)
    N = sum(b.num_rows for b in shards)

    def cat(get, fill=0, dtype=None):
        parts = []
        for b in shards:
            a = get(b)
            pad = [(0, 0), (0, L - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
            parts.append(np.pad(a, pad, constant_values=fill))
        return np.concatenate(parts).astype(dtype or parts[0].dtype)

    out = {"tokens": cat(lambda b: b.tokens_BL), "rollout_lp": cat(lambda b: b.rollout_logprobs_BL, dtype=np.float32),
           "mask": cat(lambda b: b.response_mask_BL())}
    lens = np.concatenate([b.prompt_lens_B + b.response_lens_B for b in shards])
    out["attn"] = np.arange(L)[None, :] < lens[:, None]
    S = max(b.teacher_index_BS.shape[1] for b in shards)
    pad_slots = (lambda a, fill: np.pad(a, [(0, 0), (0, S - a.shape[1])], constant_values=fill))
    tidx = np.concatenate([pad_slots(b.teacher_index_BS, -1) for b in shards])
    if not teacher_names:
        tidx[:] = -1  # reward-only: no row has a teacher
    out["teacher_index"] = tidx
    out["route_weight"] = np.concatenate([pad_slots(b.route_weight_BS, 0.0) for b in shards])
    out["group_ids"] = np.concatenate([b.group_ids_B for b in shards])
    out["rewards"] = np.concatenate([b.rewards_B for b in shards])
    out["has_reward"] = np.concatenate([b.has_reward_B for b in shards])
    out["slots"] = [{"lp": np.zeros((N, L), np.float32), "topk_ids": None, "topk_lp": None, "hidden": None}
                    for _ in range(S)]
    out["scored"] = np.zeros((N, S), np.int32)
    out["offsets"] = np.cumsum([0] + [b.num_rows for b in shards])
    out["response_lens"] = [b.response_lens_B for b in shards]
    out["placed"] = set()
    return out


def _place(out: dict, k: int, s_list: list, teacher_names: list) -> None:
    """Place the TeacherScores of shard ``k`` in its rows' slots (``out`` from ``_layout``)."""
    import torch

    from .teacher import expand_hidden

    tidx, slots, scored = out["teacher_index"], out["slots"], out["scored"]
    N, L = out["mask"].shape
    offset, resp_lens = out["offsets"][k], out["response_lens"][k]
    for sc in s_list:
        rows = offset + sc.rows_R.astype(np.int64)
        hit = tidx[rows] == teacher_names.index(sc.teacher)
        if not hit.any(-1).all():
            raise RuntimeError(f"teacher '{sc.teacher}' scored rows {rows[~hit.any(-1)][:8].tolist()} that are "
                               "not routed to it")
        slot_R = hit.argmax(-1)
        scored[rows, slot_R] += 1
        r, pos, ok = sc.positions(L)
        ok = ok & (np.arange(pos.shape[1])[None, :] < resp_lens[sc.rows_R][:, None])
        for s in np.unique(slot_R):
            sel = ok & (slot_R == s)[:, None]
            rr, pp = rows[r[sel]], pos[sel]
            sl = slots[s]
            sl["lp"][rr, pp] = sc.teacher_logprobs_RT[sel]
            if sc.topk_ids_RTK is not None:
                if sl["topk_ids"] is None:
                    K = sc.topk_ids_RTK.shape[-1]
                    sl["topk_ids"] = np.zeros((N, L, K), np.int32)
                    sl["topk_lp"] = np.full((N, L, K), -1e4, np.float32)
                sl["topk_ids"][rr, pp] = sc.topk_ids_RTK[sel]
                sl["topk_lp"][rr, pp] = np.maximum(sc.topk_logprobs_RTK[sel], -1e4)
            if sc.hidden_RTH is not None:
                h = expand_hidden(sc.hidden_RTH, sc.hidden_dtype)
                if sl["hidden"] is None:
                    sl["hidden"] = torch.zeros((N, L, h.shape[-1]), dtype=h.dtype)
                sl["hidden"][torch.from_numpy(rr), torch.from_numpy(pp)] = h[torch.from_numpy(sel)]
    out["placed"].add(k)


def _check_scored(out: dict, teacher_names: list) -> None:
    """Every (row, teacher slot) was scored exactly once."""
    tidx, scored = out["teacher_index"], out["scored"]
    want = (tidx >= 0).astype(np.int32)
    if teacher_names and not (scored == want).all():
        bad = np.nonzero((scored != want).any(-1))[0][:8]
        raise RuntimeError(f"rows {bad.tolist()} were scored {scored[bad].tolist()} times per teacher slot "
                           f"(teachers {tidx[bad].tolist()}); every teacher of a row scores it exactly once")

"""Learner rank: DeepSpeed ZeRO-1/2/3 over a transformers causal LM.

``train_step`` takes the ObjectRefs of a step's rollout shards and teacher scores, gets them in this
process, recomputes pi_old, builds advantages and the loss from algo/, and steps. Every rank sees
all rows' small metadata (masks, rewards, groups), so global normalisers and GRPO group statistics
need no communication; the model forward runs only on the rank's own rows.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np

from ..batch import RolloutBatch, TeacherScores

def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * frac
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, model_path: str, learner_cfg: dict, algo_cfg: dict,
                 teacher_names: list, teacher_weights: list, teacher_signals: list, total_steps: int,
                 rows_per_step: int, temperature: float = 1.0, seed: int = 0, trust_remote_code: bool = False):
        self.rank, self.world_size = rank, world_size
        self.model_path, self.cfg, self.algo = model_path, learner_cfg, algo_cfg
        self.teacher_names, self.teacher_weights, self.teacher_signals = teacher_names, teacher_weights, teacher_signals
        self.total_steps, self.rows_per_step = total_steps, rows_per_step
        self.temperature, self.seed, self.trust_remote_code = temperature, seed, trust_remote_code
        self.teacher_heads: dict = {}
        self.sync_group = None
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ set-up
    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def master_address(self) -> tuple:
        import ray

        from ..cluster import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def setup(self, master_addr: str, master_port: int, timeout_s: float = 600.0) -> dict:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .deepspeed_env import init_distributed, set_dist_env, zero_config

        set_dist_env(self.rank, self.world_size, master_addr, master_port)
        init_distributed(timeout_s)
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

    def train_step(self, shard_refs: list, score_refs: list, step: int) -> dict:
        """One rollout batch: pi_old, advantages, ``mini_batches_per_step`` optimizer steps. Returns metrics."""
        import ray
        import torch
        import torch.distributed as dist

        from ..algo import (OUTCOME_ESTIMATORS, advantage_moments, mix_advantages, normalize_advantages,
                           reverse_kl_advantage)
        from .loss import SIGNAL_IDS, MicroBatch, entropy_from_logits, micro_batch_loss, token_logprobs_from_logits

        t0 = time.perf_counter()
        shards: list[RolloutBatch] = ray.get(list(shard_refs))
        scores: list[list[TeacherScores]] = [ray.get(list(refs)) for refs in score_refs]
        g = _assemble(shards, scores, require_scores=bool(self.teacher_names))
        N, L = g["tokens"].shape
        dev = self.device
        tokens = torch.from_numpy(g["tokens"].astype(np.int64)).to(dev)
        mask = torch.from_numpy(g["mask"].astype(np.float32)).to(dev)
        attn = torch.from_numpy(g["attn"]).long().to(dev)
        rollout_lp = torch.from_numpy(g["rollout_lp"]).to(dev)
        teacher_lp = torch.from_numpy(g["teacher_lp"]).to(dev)
        tidx = torch.from_numpy(g["teacher_index"].astype(np.int64)).to(dev)
        if self.teacher_names:
            coef = torch.tensor(self.teacher_weights, dtype=torch.float32, device=dev)[tidx]
            row_signal = torch.tensor([SIGNAL_IDS[s] for s in self.teacher_signals], device=dev)[tidx]
        else:  # reward-only (GRPO): no distillation term, the outcome advantage alone
            coef = torch.zeros(N, dtype=torch.float32, device=dev)
            row_signal = torch.zeros(N, dtype=torch.long, device=dev)
        a = self.algo
        outcome = torch.zeros_like(mask)
        if a["alpha"] > 0 and g["has_reward"].any():
            rewards = torch.from_numpy(np.nan_to_num(g["rewards"])).to(dev)
            outcome = mix_advantages(torch.zeros_like(mask), OUTCOME_ESTIMATORS.get(a["outcome_estimator"])(
                rewards, torch.from_numpy(g["group_ids"]).to(dev), mask).float(), a["alpha"],
                torch.from_numpy(g["has_reward"]).to(dev))

        n_mini = self.cfg["mini_batches_per_step"]
        mini = N // n_mini
        per_rank = mini // self.world_size
        my_rows = [np.arange(m * mini + self.rank * per_rank, m * mini + (self.rank + 1) * per_rank)
                   for m in range(n_mini)]
        if self.teacher_heads:  # group rows by teacher so one output head is used at a time
            my_rows = [r[np.argsort(g["teacher_index"][r], kind="stable")] for r in my_rows]
        mine = np.concatenate(my_rows)

        # pi_old with the weights before this step's updates (== pi_theta at the first mini-batch)
        old_lp = rollout_lp.clone()
        if self.cfg["recompute_old_logprobs"]:
            self.engine.eval()
            with torch.no_grad():
                for s in range(0, len(mine), self.micro):
                    r = torch.from_numpy(mine[s: s + self.micro]).to(dev)
                    logits = self._forward_logits(tokens[r], attn[r])
                    old_lp[r] = token_logprobs_from_logits(logits, tokens[r], self.temperature)
            self.engine.train()
        distill_adv = reverse_kl_advantage(teacher_lp, old_lp, mask, coef, gamma=a["kl_gamma"])
        norm = a["normalize_advantages"]
        if norm != "none":  # moments over every rank's rows, so all ranks normalise alike
            by_teacher = norm.startswith("teacher")
            groups = tidx if by_teacher else torch.zeros_like(tidx)
            r_mine = torch.from_numpy(mine).to(dev)
            moments = advantage_moments(distill_adv[r_mine], mask[r_mine], groups[r_mine],
                                        max(len(self.teacher_names), 1) if by_teacher else 1)
            dist.all_reduce(moments)
            distill_adv = normalize_advantages(distill_adv, mask, groups, moments, scale=not norm.endswith("_mean"))

        # per-teacher statistics over this rank's rows, summed across ranks below
        T = len(self.teacher_names)
        stats = torch.zeros(7 + 3 * T, dtype=torch.float64)
        r_mine = torch.from_numpy(mine).to(dev)
        m_mine = mask[r_mine].double()
        rev_kl_k1 = ((old_lp - teacher_lp)[r_mine].double() * m_mine)
        rev_kl_k3 = (torch.expm1(teacher_lp - old_lp) - (teacher_lp - old_lp))[r_mine].double() * m_mine
        for t in range(T):
            sel = (tidx[r_mine] == t)
            stats[7 + 3 * t] = m_mine[sel].sum()
            stats[8 + 3 * t] = rev_kl_k1[sel].sum()
            stats[9 + 3 * t] = rev_kl_k3[sel].sum()
        stats[0] = m_mine.sum()
        stats[1] = ((old_lp - rollout_lp).abs()[r_mine].double() * m_mine).sum()
        stats.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # garbage rows are reported, not averaged in

        agg = a["loss_agg"]
        sums = {"loss": 0.0, "is_clip_fraction": 0.0, "pg_clip_fraction": 0.0, "approx_kl": 0.0, "distill_loss": 0.0}
        n_micro = 0
        grad_norms = []
        skipped, nonfinite = 0, None
        for m, rows in enumerate(my_rows):
            lo, hi = m * mini, (m + 1) * mini
            if agg == "token_mean":
                den_global = float(mask[lo:hi].sum().item())
            else:
                den_global = float((mask[lo:hi].sum(-1) > 0).sum().item())
            denominator = max(den_global, 1.0) / (self.world_size * self.grad_accum)
            bad = self._nonfinite_inputs(g, rows, old_lp, mask)
            if _any_rank(bad is not None):  # garbage in: skip this update on every rank, report why
                skipped += 1
                nonfinite = bad or nonfinite or {"teachers": [], "stats": "non-finite on another rank"}
                continue
            skip_rest = False
            for s in range(0, len(rows), self.micro):
                if skip_rest:
                    break
                r = torch.from_numpy(rows[s: s + self.micro]).to(dev)
                logits = self._forward_logits(tokens[r], attn[r])
                mb = MicroBatch(
                    tokens_bL=tokens[r], response_mask_bL=mask[r], old_logprobs_bL=old_lp[r],
                    rollout_logprobs_bL=rollout_lp[r], advantages_bL=distill_adv[r] + outcome[r], coef_b=coef[r],
                    teacher_index_b=tidx[r],
                    topk_ids_bLK=None if g["topk_ids"] is None else torch.from_numpy(g["topk_ids"][rows[s: s + self.micro]].astype(np.int64)).to(dev),
                    topk_logprobs_bLK=None if g["topk_lp"] is None else torch.from_numpy(g["topk_lp"][rows[s: s + self.micro]]).to(dev),
                    hidden_bLH=None if g["hidden"] is None else g["hidden"][rows[s: s + self.micro]].to(dev).float(),
                    outcome_advantages_bL=outcome[r] if a["alpha"] > 0 else None)
                loss, mets = micro_batch_loss(logits, mb, a, row_signal[r], denominator, self.teacher_heads,
                                              self.temperature, self.vocab_size)
                if _any_rank(not bool(torch.isfinite(loss))):
                    if self.grad_accum > 1 and s > 0:
                        raise FloatingPointError(
                            f"non-finite loss at step {step} in the middle of gradient accumulation; raise "
                            "learner.micro_batch_size to the rows per rank so that such steps can be skipped")
                    skipped += 1
                    nonfinite = nonfinite or {"teachers": sorted({self.teacher_names[i] for i in
                                                                  g["teacher_index"][rows].tolist()}),
                                              "stats": {"loss": float(loss), "rows": len(rows)}}
                    skip_rest = True
                    continue
                self.engine.backward(loss)
                self.engine.step()
                ent = entropy_from_logits(logits)
                stats[2] += float((ent * mask[r]).sum())
                sums["loss"] += loss.item() / (self.world_size * self.grad_accum)
                for k, v in mets.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_micro += 1
            if skip_rest:
                continue
            gn = self.engine.get_global_grad_norm()
            grad_norms.append(float(gn) if gn is not None else float("nan"))
            self.optimizer_steps += 1
        stats[3] = sums["loss"]
        stats[4] = sums["is_clip_fraction"] / max(n_micro, 1)
        stats[5] = sums["pg_clip_fraction"] / max(n_micro, 1)
        stats[6] = sums["distill_loss"] / (self.world_size * self.grad_accum)
        dist.all_reduce(stats)
        tok = max(stats[0].item(), 1.0)
        metrics = {
            "loss": stats[3].item() / n_mini,
            "entropy": stats[2].item() / tok,
            "is_clip_fraction": stats[4].item() / self.world_size,
            "pg_clip_fraction": stats[5].item() / self.world_size,
            "train_rollout_logprob_gap": stats[1].item() / tok,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
            "learner_step_s": time.perf_counter() - t0,
            "response_tokens": stats[0].item(),
            "rows": N,
            "skipped_minibatches": skipped,
        }
        if nonfinite:
            metrics["nonfinite"] = nonfinite
        if any(s != "sampled" for s in self.teacher_signals):
            metrics["distill_loss"] = stats[6].item() / n_mini
        for t, name in enumerate(self.teacher_names):
            n_t = stats[7 + 3 * t].item()
            metrics[f"teacher/{name}/token_share"] = n_t / tok
            metrics[f"teacher/{name}/tokens"] = n_t
            if n_t > 0:
                metrics[f"teacher/{name}/reverse_kl"] = stats[8 + 3 * t].item() / n_t
                metrics[f"teacher/{name}/reverse_kl_k3"] = stats[9 + 3 * t].item() / n_t
        rk = [stats[8 + 3 * t].item() for t in range(T)]
        metrics["reverse_kl"] = sum(rk) / tok
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

    def _nonfinite_inputs(self, g: dict, rows: np.ndarray, old_lp, mask) -> Optional[dict]:
        """None if every input of these rows is finite at response positions, else what was not."""
        import torch

        m = g["mask"][rows]
        checks = {"teacher_logprobs": g["teacher_lp"][rows][m], "rollout_logprobs": g["rollout_lp"][rows][m],
                  "old_logprobs": old_lp[torch.from_numpy(rows)].cpu().numpy()[m]}
        if g["topk_lp"] is not None:
            checks["topk_logprobs"] = g["topk_lp"][rows][m]
        if g["hidden"] is not None:
            checks["hidden_states"] = g["hidden"][torch.from_numpy(rows)][torch.from_numpy(m)].float().numpy()
        counts = {k: int((~np.isfinite(v)).sum()) for k, v in checks.items()}
        if not any(counts.values()):
            return None
        bad_rows = rows[~np.isfinite(np.where(g["mask"][rows], g["teacher_lp"][rows], 0)).all(-1)
                        | ~np.isfinite(np.where(g["mask"][rows], old_lp[torch.from_numpy(rows)].cpu().numpy(), 0)).all(-1)]
        teachers = sorted({self.teacher_names[i] for i in g["teacher_index"][bad_rows].tolist()}) if self.teacher_names else []
        return {"teachers": teachers, "stats": {"rows": int(len(rows)), "response_tokens": int(m.sum()),
                                                "nonfinite_counts": counts, "bad_rows": int(len(bad_rows))}}

    # ------------------------------------------------------------------ weights
    def compute_logprobs(self, sequences: list) -> list:
        """Log-probs of given token ids under the current weights (collective under ZeRO-3: call on all ranks)."""
        import torch

        from ..batch import pad_sequences
        from .loss import token_logprobs_from_logits

        tokens = torch.from_numpy(pad_sequences(sequences, 0).astype(np.int64)).to(self.device)
        lens = torch.tensor([len(s) for s in sequences])
        attn = (torch.arange(tokens.shape[1])[None] < lens[:, None]).long().to(self.device)
        self.engine.eval()
        with torch.no_grad():
            lp = token_logprobs_from_logits(self._forward_logits(tokens, attn), tokens, self.temperature)
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


def _assemble(shards: list, scores: list, require_scores: bool = True) -> dict:
    """Concatenate shards into global [N, L] arrays and place each teacher's scores on its rows."""
    import torch

    from .teacher import expand_hidden

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
    out["teacher_index"] = np.concatenate([b.teacher_index_B for b in shards])
    out["group_ids"] = np.concatenate([b.group_ids_B for b in shards])
    out["rewards"] = np.concatenate([b.rewards_B for b in shards])
    out["has_reward"] = np.concatenate([b.has_reward_B for b in shards])
    teacher_lp = np.zeros((N, L), np.float32)
    scored = np.zeros(N, np.int32)
    topk_ids = topk_lp = hidden = None
    hidden_dtype = None
    offset = 0
    for b, s_list in zip(shards, scores):
        for s in s_list:
            r, pos, ok = s.positions(L)
            ok = ok & (np.arange(pos.shape[1])[None, :] < b.response_lens_B[s.rows_R][:, None])
            rr, pp = offset + s.rows_R[r[ok]], pos[ok]
            teacher_lp[rr, pp] = s.teacher_logprobs_RT[ok]
            scored[offset + s.rows_R] += 1
            if s.topk_ids_RTK is not None:
                if topk_ids is None:
                    K = s.topk_ids_RTK.shape[-1]
                    topk_ids = np.zeros((N, L, K), np.int32)
                    topk_lp = np.full((N, L, K), -1e4, np.float32)
                topk_ids[rr, pp] = s.topk_ids_RTK[ok]
                topk_lp[rr, pp] = np.maximum(s.topk_logprobs_RTK[ok], -1e4)
            if s.hidden_RTH is not None:
                h = expand_hidden(s.hidden_RTH, s.hidden_dtype)
                if hidden is None:
                    hidden = torch.zeros((N, L, h.shape[-1]), dtype=h.dtype)
                hidden[torch.from_numpy(rr.astype(np.int64)), torch.from_numpy(pp)] = h[torch.from_numpy(ok)]
        offset += b.num_rows
    if require_scores and not (scored == 1).all():
        bad = np.nonzero(scored != 1)[0][:8].tolist()
        raise RuntimeError(f"rows {bad} were scored {scored[bad].tolist()} times; every row needs exactly one teacher")
    out.update(teacher_lp=teacher_lp, topk_ids=topk_ids, topk_lp=topk_lp, hidden=hidden)
    return out

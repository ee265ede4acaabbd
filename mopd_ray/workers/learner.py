"""Learner rank: DeepSpeed ZeRO-1/2/3 over a transformers causal LM.

``train_step`` takes the ObjectRefs of this rank's own rows (its parts of the step's rollout shards and
their teacher scores; see mopd_ray.dispatch), gets them in this process, recomputes pi_old (or takes it
from the training forward when they are equal), builds advantages and the loss from algo/, and steps.
Global loss denominators, normalisation moments and per-teacher statistics are small all-reduces; GRPO
groups never straddle ranks.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from ..utils.heavy import heavy_imports

with heavy_imports():  # torch, first imported by the mixins below (mopd_ray/utils/heavy.py)
    import torch  # noqa: F401

from .base import RoleWorker  # noqa: E402
from .learner_advantages import LearnerAdvantages  # noqa: E402
from .learner_forward import LearnerForward  # noqa: E402
from .learner_metrics import LearnerMetrics  # noqa: E402
from .learner_rows import LearnerRows, _check_scored  # noqa: E402
from .learner_weights import LearnerWeights  # noqa: E402


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * frac
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


class LearnerWorker(LearnerForward, LearnerRows, LearnerAdvantages, LearnerWeights, LearnerMetrics, RoleWorker):
    """One DeepSpeed rank: the model, its optimizer and a step's loss. Its mixins: the step's rows
    (learner_rows.py), pi_old and advantages (learner_advantages.py), weight export and checkpoints
    (learner_weights.py), metrics (learner_metrics.py)."""

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

        from ..cluster import listening_socket, rendezvous_file

        if single_node:
            return rendezvous_file(), 0
        ip = ray.util.get_node_ip_address()
        sock = listening_socket(ip)  # held until the group's store takes it over (init_sync_group / setup)
        self.__dict__.setdefault("_held_ports", {})[sock.getsockname()[1]] = sock
        return ip, sock.getsockname()[1]

    def _take_port(self, port: int):
        """The listening socket held for ``port`` (master_address), or None."""
        return self.__dict__.get("_held_ports", {}).pop(int(port), None)

    def reuse(self, *args, **kwargs) -> bool:
        """Taken by another run (mopd_ray/warm.py): its settings replace this run's; ``setup`` then builds
        its model, optimizer and engine in this process group."""
        import gc

        self.engine = self.optimizer = self.scheduler = None
        gc.collect()
        self.__init__(*args, **kwargs)
        return True

    def setup(self, master_addr: str, master_port: int, timeout_s: float = 600.0, node_rank: tuple = (0, 1)) -> dict:
        """Join the ranks' process group (unless a reused group is in one), then build the model,
        optimizer and DeepSpeed engine. ``node_rank``: (this rank's index among the learner ranks of its
        node, their number), the torch LOCAL_RANK / LOCAL_WORLD_SIZE convention."""
        import torch
        import torch.distributed as dist

        from ..collectives import local_device_index, nccl_defaults
        from .deepspeed_env import init_distributed, set_dist_env

        self.node_local_rank, self.node_local_size = int(node_rank[0]), int(node_rank[1])
        os.environ.update({"LOCAL_WORLD_SIZE": str(self.node_local_size), "MOPD_NODE_LOCAL_RANK": str(self.node_local_rank)})
        held = self._take_port(master_port)
        if held is not None:  # torch's env:// rendezvous binds the port itself: let go of it just before
            held.close()
        if dist.is_initialized():
            return self._build_engine()
        self.device_index = local_device_index()  # not the rank: under Ray each actor sees its own GPU(s)
        if torch.cuda.is_available():
            torch.cuda.set_device(self.device_index)
            nccl_defaults()
        if master_addr.startswith("file://"):
            set_dist_env(self.rank, self.world_size, "127.0.0.1", 0, self.device_index)
            init_distributed(timeout_s, init_method=master_addr, rank=self.rank, world_size=self.world_size)
        else:
            set_dist_env(self.rank, self.world_size, master_addr, master_port, self.device_index)
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
        import torch

        with heavy_imports():
            import deepspeed
            from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models.compat import head_post, token_rows
        from .deepspeed_env import zero_config

        torch.manual_seed(self.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda" and torch.cuda.current_device() != getattr(self, "device_index", 0):
            raise RuntimeError(f"learner rank {self.rank}: CUDA device {torch.cuda.current_device()} is current, "
                               f"but this actor owns device {self.device_index} (ray.get_gpu_ids())")
        c = self.cfg
        dtype = getattr(torch, c["dtype"])
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32 if dtype == torch.float32
                                                     else dtype, trust_remote_code=self.trust_remote_code,
                                                     use_safetensors=True,  # never unpickle weights
                                                     **({"attn_implementation": c["attn_implementation"]}
                                                        if c.get("attn_implementation") else {}))
        if c["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        self.vocab_size = token_rows(tokenizer)  # logits past it (embedding padding) are cut: _logits_fn
        per_rank = self.rows_per_step // c["mini_batches_per_step"] // self.world_size
        self.micro = min(c["micro_batch_size"], per_rank)
        self.grad_accum = max(1, math.ceil(per_rank / self.micro))
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=tuple(c["betas"]),
                                weight_decay=c["weight_decay"])
        total = self.total_steps * c["mini_batches_per_step"]
        min_ratio = c["min_lr"] / c["lr"] if c["lr"] > 0 else 1.0  # lr 0: gradients and metrics, no update
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, c["warmup_steps"], c["lr_schedule"], min_ratio))
        ds_cfg = zero_config(stage=c["zero_stage"], micro_batch_size=self.micro, grad_accum=self.grad_accum,
                             world_size=self.world_size, dtype=c["dtype"], grad_clip=c["grad_clip"],
                             offload_optimizer=c["offload_optimizer"])
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
        self.zero_stage = c["zero_stage"]
        # the student's own head: log-probs and KL come from the last hidden states chunk by chunk
        self._decoder = self.engine.module.get_decoder()
        self._head = self.engine.module.get_output_embeddings()
        self._post = head_post(self.engine.module.config.to_dict())
        self.logit_chunk = int(c.get("logit_chunk_size", 512))
        self.max_tokens = c.get("max_tokens_per_micro_batch")
        packing = self._packing_check()
        return {**packing, "rank": self.rank, "node_local_rank": getattr(self, "node_local_rank", 0), "device": str(self.device),
                "local_rank_env": os.environ.get("LOCAL_RANK"), "micro_batch_size": self.micro, "grad_accum": self.grad_accum,
                "params": sum(p.numel() for p in model.parameters())}

    def set_teacher_heads_from_refs(self, head_refs: dict) -> bool:
        import ray

        return self.set_teacher_heads({i: ray.get(r) for i, r in head_refs.items()})

    def set_teacher_heads(self, heads: dict) -> bool:
        """{teacher index: (W [V, H] ndarray, bias or None[, (scale, softcap)])} for full-vocabulary teachers
        (frozen); the third item is the head's post-processing (models/compat.py ``head_post``)."""
        import torch

        self.teacher_heads = {}
        for i, head in heads.items():
            w, b = head[0], head[1]
            post = tuple(head[2]) if len(head) > 2 else (1.0, 0.0)
            self.teacher_heads[int(i)] = (torch.from_numpy(np.array(w)).to(self.device),
                                          None if b is None else torch.from_numpy(np.array(b)).to(self.device), post)
        return True

    # ------------------------------------------------------------------ training
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

    def _optimize(self, g: dict, t: dict, old_lp, adv, step: int, fused: bool) -> dict:
        """``mini_batches_per_step`` optimizer steps over this rank's rows, micro-batch by micro-batch."""
        loop = {"loss": 0.0, "is_clip_fraction": 0.0, "pg_clip_fraction": 0.0, "approx_kl": 0.0,
                "distill_loss": 0.0, "entropy_sum": 0.0, "n_micro": 0, "grad_norms": [], "skipped": 0,
                "nonfinite": None, "signal_free": 0, "row_tokens": 0, "forward_tokens": 0, "ghosts": 0}
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
            plan = self._micro_plan(t, rows)
            for j, (idx, ghost) in enumerate(plan):
                if self.max_tokens:  # as many micro-batches on every rank, but not grad_accum of them
                    self.engine.set_gradient_accumulation_boundary(j == len(plan) - 1)
                if not self._micro_step(g, t, old_lp, adv, idx, j == 0, denominator, step, fused, loop, ghost):
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

    def _micro_batch(self, g, t, old_lp, idx, r, n: int):
        """The loss inputs of rows ``idx`` (``r`` on the device), cut to their first ``n`` positions (the
        micro-batch's longest row: the rank's layout pads to its own longest); advantages are filled in by
        the caller."""
        import torch

        from .loss import MicroBatch

        dev = self.device
        take = (lambda arr: None if arr is None else torch.from_numpy(arr[idx][:, :n]).to(dev))
        slots = g["slots"]
        return MicroBatch(
            tokens_bL=t["tokens"][r, :n], response_mask_bL=t["mask"][r, :n], old_logprobs_bL=old_lp[r, :n],
            rollout_logprobs_bL=t["rollout_lp"][r, :n], advantages_bL=None,
            coef_SbL=t["coef"][:, r, :n], teacher_index_bS=t["tidx"][r], signal_bS=t["signal"][r],
            topk_ids_SbLK=[None if sl["topk_ids"] is None else take(sl["topk_ids"]).long() for sl in slots],
            topk_logprobs_SbLK=[take(sl["topk_lp"]) for sl in slots],
            hidden_SbLH=[None if sl["hidden"] is None else sl["hidden"][torch.from_numpy(idx), :n].to(dev).float()
                         for sl in slots],
            outcome_advantages_bL=t["outcome"][r, :n] if self.algo["alpha"] > 0 else None)

    def _micro_step(self, g, t, old_lp, adv, idx, first: bool, denominator, step, fused, loop, ghost=False) -> bool:
        """Forward, loss, backward of the micro-batch of rows ``idx`` (``first``: the first of its mini-batch;
        ``ghost``: a zero-weight pass, see _micro_plan); False (nothing stepped) on a non-finite loss."""
        import torch

        from .loss import micro_batch_loss, terms_from_hidden

        a, dev = self.algo, self.device
        g.setdefault("start_s", time.perf_counter() - g["t0"])  # when training began
        r = torch.from_numpy(idx).to(dev)
        lens = g["attn"][idx].sum(-1)  # from the host copy: no device sync
        n = int(lens.max())  # no position past the micro-batch's longest row
        if not ghost:
            loop["row_tokens"] += int(lens.sum())  # and what the forward computes: packed or padded
            loop["forward_tokens"] += int(lens.sum()) if self.pack else n * len(idx)
        # the student's forward needs no teacher score: it runs while later shards are still being scored
        hidden = self._forward_hidden(t["tokens"][r, :n], t["attn"][r, :n])
        if self._await_rows(g, t, idx):  # this micro-batch's scores (streamed: later shards still scoring)
            g["forwards_ahead"] = g.get("forwards_ahead", 0) + 1  # its forward ran while they were computed
        bad = self._nonfinite_inputs(g, idx, None if fused else old_lp)
        mb = self._micro_batch(g, t, old_lp, idx, r, n)
        # log-probs, entropy and dense KL at the response positions, chunk by chunk from the hidden states
        terms = terms_from_hidden(hidden, self._logits_fn(self.temperature), mb, self.teacher_heads,
                                  self.temperature, a, self.logit_chunk, want_entropy=True)
        if fused and not ghost:  # pi_old == pi_theta now: take it from this forward instead of a second one
            old_lp[r, :n] = torch.where(mb.response_mask_bL > 0, terms["logprobs"].detach().to(old_lp.dtype),
                                        old_lp[r, :n])
        if fused:
            mb.old_logprobs_bL = old_lp[r, :n]
            distill = self._sampled_advantage(t, old_lp, r).sum(0)[:, :n]
        else:
            distill = adv[r, :n]
        mb.advantages_bL = distill + t["outcome"][r, :n]
        loss, mets = micro_batch_loss(terms, mb, a, denominator)
        if loss.grad_fn is None:  # no position trains (failed episodes, masked truncations): a zero that still
            # runs the backward through the body and the head, as every other rank's micro-batch does (ZeRO)
            loss = loss + 0.0 * self._logits_fn(1.0)(hidden[:1, :1].reshape(1, -1)).sum()
        loss = _gated(loss, bad, first, ghost, loop, lambda: self._names(g["teacher_index"][idx]), len(idx))
        if loss is None:
            return False
        self.engine.backward(loss)
        self.engine.step()
        if not loop["poisoned"] and not ghost:
            loop["entropy_sum"] += float((terms["entropy"] * mb.response_mask_bL).sum())
            loop["loss"] += loss.item() / (self.world_size * self.grad_accum)
            for k, v in mets.items():
                loop[k] = loop.get(k, 0.0) + v
            loop["n_micro"] += 1
        return True

    # ------------------------------------------------------------------ weights
def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (on the group's device: mopd_ray/collectives.py)."""
    from ..collectives import any_rank

    return any_rank(flag)


def _gated(loss, bad, first: bool, ghost: bool, loop: dict, teachers, rows: int):
    """The micro-batch's loss as the backward takes it, or None: the update is skipped.

    Garbage in (``bad``: non-finite teacher scores or log-probs) or a non-finite loss on any rank skips this
    update on every rank (one all-reduce per micro-batch; ranks take the same branch); the first such cause is
    kept in ``loop["nonfinite"]`` (``teachers()``: the names of the micro-batch's teachers). At the first
    micro-batch of a mini-batch nothing has been reduced yet: None. Mid-accumulation the gradients of earlier
    micro-batches are already reduced: the loss becomes NaN here and in every later micro-batch of the mini-batch,
    so DeepSpeed drops the step and clears them (its overflow path, checked in _optimize). A ``ghost`` (its row was
    trained in an earlier micro-batch) runs the same collectives with no gradient."""
    import torch

    finite = bool(torch.isfinite(loss))
    if _any_rank(bad is not None or not finite):
        if not loop["poisoned"]:
            loop["nonfinite"] = bad or (None if finite else {"teachers": teachers(),
                                                             "stats": {"loss": float(loss), "rows": rows}}) \
                or {"teachers": [], "stats": "non-finite on another rank"}
        if first:
            loop["skipped"] += 1
            return None
        loop["poisoned"] = True
    if loop["poisoned"]:
        return loss * float("nan")
    if ghost:
        loop["ghosts"] += 1
        return loss * 0.0
    return loss

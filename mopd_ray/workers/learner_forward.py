"""The student's forward on a learner rank: its last hidden states through the DeepSpeed engine, and its
per-token terms from them chunk by chunk (workers/token_terms.py), never [rows, length, vocabulary] logits;
supervised steps (the demo's bootstrap) on the same path."""

from __future__ import annotations

import numpy as np


class LearnerForward:
    """Hidden states, log-probs and the supervised step (a mixin of LearnerWorker: its state)."""

    def _hidden_fn(self, ids, attn, position_ids=None):
        from .token_terms import last_hidden

        return last_hidden(self.engine, self._decoder, ids, attn, position_ids)

    def _forward_hidden(self, tokens, attn):
        """The last hidden states [b, n, H] (n: the longest row) through the DeepSpeed engine's forward (ZeRO-3
        gathers, hooks); the head runs later, chunk by chunk, where the loss needs it (workers/token_terms.py).
        With packing on (``learner.max_tokens_per_micro_batch`` set, and the model passed the packing check
        at set-up) the rows run as one packed sequence (workers/packing.py): no work on padding."""
        n = int(attn.sum(-1).max())
        if getattr(self, "pack", False):
            from .packing import packed_hidden

            return packed_hidden(self._hidden_fn, tokens[:, :n], attn.sum(-1))
        return self._hidden_fn(tokens[:, :n], attn[:, :n])

    def _micro_plan(self, t: dict, rows: np.ndarray) -> list:
        """The micro-batches of ``rows``, as (local row indices, zero-weight?): ``learner.micro_batch_size`` rows
        each, or with ``learner.max_tokens_per_micro_batch`` token-budget micro-batches, as many on every rank
        (workers/packing.py)."""
        import torch

        from ..collectives import all_reduce
        from .packing import plan_micro_batches

        def agree(k: int) -> int:
            return int(all_reduce(torch.tensor([k], dtype=torch.int64), torch.distributed.ReduceOp.MAX).item())

        lens = t["attn_np"][rows].sum(-1) if len(rows) else np.zeros(0, np.int64)
        plan = plan_micro_batches(lens, self.micro, self.max_tokens, self.pack, agree)
        # an empty micro-batch (another rank needs more of them) runs as a zero-weight pass over this rank's
        # shortest row: the same forward, head and backward, so that every collective pairs up
        return [(rows[p], False) if len(p) else (rows[[int(np.argmin(lens))]], True) for p in plan]

    def _packing_check(self) -> dict:
        """With a token budget: does the student pack (workers/packing.py ``packing_works``)? Packing is used
        only where it does; elsewhere the micro-batches are length-sorted and padded."""
        self.pack = False
        if not self.max_tokens or not self.cfg.get("packing", True):
            return {"packing": False, "packing_gap": None}
        from .packing import packing_works, use_varlen_attention

        self.attention = use_varlen_attention(self.engine.module)  # rows attend row by row (sdpa's twin of varlen)
        self.engine.eval()
        try:
            ok, gap = packing_works(self._hidden_fn, self.vocab_size, self.device, self.engine.module.dtype)
        finally:
            self.engine.train()
        self.pack = ok
        return {"packing": ok, "packing_gap": gap, "attention": self.attention}

    def _logits_fn(self, temperature: float):
        """Hidden states -> the student's logits over the tokenizer's ids (padded rows are in no
        distribution: models/compat.py ``token_rows``), with its family's logit scale / soft-cap, at
        ``temperature``."""
        from .token_terms import head_logits

        return head_logits(self._head, self._post, self.vocab_size, temperature)

    def _token_logprobs(self, tokens, attn, where, temperature: float):
        """[b, L] log-probs of the tokens at positions ``where`` (0 elsewhere), without gradients."""
        import torch

        from .token_terms import token_terms

        with torch.no_grad():
            hidden = self._forward_hidden(tokens, attn)
            return token_terms(hidden, self._logits_fn(temperature), tokens, where, self.logit_chunk,
                               checkpointed=False)["logprobs"].float()

    def sft_step(self, sequences: list, prompt_lens: list, masks: list | None = None) -> dict:
        """One supervised step (bootstrap of teachers and the base student): token-mean cross-entropy on
        the response tokens of every row (``masks``: only where 1, e.g. an episode's assistant turns), rows split
        across ranks, one optimizer step."""
        import torch

        from ..batch import pad_sequences
        from .token_terms import token_terms

        n = len(sequences)
        per = n // self.world_size
        mine = range(self.rank * per, (self.rank + 1) * per)
        tokens_all = pad_sequences(sequences, 0)
        lens = np.array([len(s) for s in sequences])
        pos = np.arange(tokens_all.shape[1])[None]
        mask_all = (pos >= np.array(prompt_lens)[:, None]) & (pos < lens[:, None])
        if masks is not None:
            mask_all &= pad_sequences(masks, 0).astype(bool)
        den = max(float(mask_all.sum()), 1.0) / (self.world_size * self.grad_accum)
        total = 0.0
        rows = np.array(list(mine))
        for s in range(0, len(rows), self.micro):
            r = rows[s: s + self.micro]
            tokens = torch.from_numpy(tokens_all[r].astype(np.int64)).to(self.device)
            attn = torch.from_numpy(pos < lens[r][:, None]).long().to(self.device)
            mask = torch.from_numpy(mask_all[r]).float().to(self.device)
            lp = token_terms(self._forward_hidden(tokens, attn), self._logits_fn(1.0), tokens, mask > 0,
                             self.logit_chunk)["logprobs"]
            loss = -(lp * mask).sum() / den
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item() / (self.world_size * self.grad_accum)
        self.optimizer_steps += 1
        return {"sft_loss": total}

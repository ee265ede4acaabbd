"""The student's forward on a learner rank: its last hidden states through the DeepSpeed engine, and its
per-token terms from them chunk by chunk (workers/token_terms.py), never [rows, length, vocabulary] logits;
supervised steps (the demo's bootstrap) on the same path."""

from __future__ import annotations

import numpy as np


class LearnerForward:
    """Hidden states, log-probs and the supervised step (a mixin of LearnerWorker: its state)."""

    def _forward_hidden(self, tokens, attn):
        """The last hidden states [b, L, H] through the DeepSpeed engine's forward (ZeRO-3 gathers, hooks); the
        head runs later, chunk by chunk, where the loss needs it (workers/token_terms.py)."""
        from .token_terms import last_hidden

        return last_hidden(self.engine, self._decoder, tokens, attn)

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

    def sft_step(self, sequences: list, prompt_lens: list) -> dict:
        """One supervised step (bootstrap of teachers and the base student): token-mean cross-entropy on
        the response tokens of every row, rows split across ranks, one optimizer step."""
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

"""A teacher's transformers backend (``teachers.models.NAME.backend=hf``): models vLLM cannot load, scored by a
forward of the model itself in the teacher's process, on token-budget micro-batches (packed where the model packs),
with the head at response positions only, a chunk at a time (never [rows, length, vocabulary] logits)."""

from __future__ import annotations

import numpy as np

from ..batch import RolloutBatch
from ..models.compat import head_post


class HFTeacher:
    """Mixed into TeacherWorker: ``_load_hf`` builds the model, ``_score_hf`` scores a batch's rows."""

    def _load_hf(self, model_path: str, teacher_cfg: dict, trust_remote_code: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype[teacher_cfg["dtype"]], trust_remote_code=trust_remote_code,
            use_safetensors=True).to(self.device)  # never unpickle weights
        self.model.eval()
        self.max_tokens, self.pack = teacher_cfg.get("max_tokens_per_micro_batch"), False
        if self.max_tokens:  # token-budget micro-batches, packed where the model packs (workers/packing.py)
            from .packing import packing_works, use_varlen_attention

            use_varlen_attention(self.model)
            self.pack = packing_works(self._hf_hidden, self.token_rows, self.device, self.model.dtype)[0]

    def _hf_hidden(self, ids, attn, position_ids=None):
        from .token_terms import last_hidden

        return last_hidden(self.model, self.model.get_decoder(), ids, attn, position_ids)

    def _score_hf(self, batch: RolloutBatch, rows: np.ndarray, topk: int, hidden: bool):
        import torch

        L = batch.tokens_BL.shape[1]
        H = self.model.config.hidden_size
        lp = np.zeros((len(rows), L), np.float32)
        ids = np.zeros((len(rows), L, topk), np.int32) if topk else None
        tk = np.full((len(rows), L, topk), -np.inf, np.float32) if topk else None
        hdt = self.cfg.get("hidden_dtype", "bfloat16")
        hs = np.zeros((len(rows), L, H), np.uint16 if hdt == "bfloat16" else np.dtype(hdt)) if hidden else None
        from .packing import packed_hidden, plan_micro_batches
        from .token_terms import head_logits, score_chunks

        # the head runs at response positions only, a chunk at a time (never [rows, L, vocabulary] logits),
        # over the tokenizer's ids, with the family's logit scale / soft-cap (as the model's own forward)
        logits_fn = head_logits(self.model.get_output_embeddings(), head_post(self.model.config.to_dict()),
                                self.token_rows, 1.0)
        resp_all = torch.from_numpy(batch.response_mask_BL())
        mb = max(1, int(self.cfg.get("micro_batch_size", 16)))
        row_lens = (batch.prompt_lens_B + batch.response_lens_B)[rows].astype(np.int64)
        for p in plan_micro_batches(row_lens, mb, getattr(self, "max_tokens", None), getattr(self, "pack", False)):
            sub, n = rows[p], int(row_lens[p].max())
            tokens = torch.from_numpy(batch.tokens_BL[sub, :n].astype(np.int64)).to(self.device)
            lens = torch.from_numpy(row_lens[p]).to(self.device)
            with torch.no_grad():
                if getattr(self, "pack", False):  # one packed sequence: no work on padding
                    h_all = packed_hidden(self._hf_hidden, tokens, lens)
                else:
                    h_all = self._hf_hidden(tokens, (torch.arange(n, device=self.device)[None] < lens[:, None]).long())
                a, i, v = score_chunks(h_all, logits_fn, tokens, resp_all[sub, :n].to(self.device),  # l-1 predicts l
                                       int(self.cfg.get("logit_chunk_size", 512)), topk)
                lp[p, :n] = a.cpu().numpy()
                if topk:
                    ids[p, :n], tk[p, :n] = i.cpu().numpy(), v.cpu().numpy()
                if hidden:
                    hs[p, 1:n] = _compact(h_all[:, :-1], hdt)
        mask = batch.response_mask_BL()[rows]
        lp *= mask
        if hidden:
            hs[~mask] = 0
        return lp, ids, tk, hs, (hdt if hidden else None), False


def _compact(h, dtype_name: str) -> np.ndarray:
    import torch

    if dtype_name == "bfloat16":
        return h.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return h.to(getattr(torch, dtype_name)).cpu().numpy()

"""Full-vocabulary signal: teacher hidden states x the teacher's head reproduce the teacher's own logits.

The loss and its gradient from (student logits, shipped hidden states, frozen head) must equal the
ones computed from the teacher's full logits of a plain transformers forward.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mopd_ray.algo import full_vocab_reverse_kl, reverse_kl_from_logits
from mopd_ray.batch import RolloutBatch, pad_sequences
from mopd_ray.workers.learner_rows import _assemble
from mopd_ray.workers.teacher import TeacherWorker

SEQS = [[1, 298, 201, 67, 70, 70, 19, 20, 2, 201, 1, 275, 307, 201, 21, 22, 2],
        [1, 298, 201, 80, 33, 34, 35, 2, 201, 1, 275, 307, 201, 35, 34, 33, 2, 201]]


def _batch():
    plens = np.array([14, 13], np.int32)
    tokens = pad_sequences(SEQS, 0)
    rlens = np.array([len(s) for s in SEQS], np.int32) - plens
    return RolloutBatch(tokens, plens, rlens, np.zeros(tokens.shape, np.float32), np.arange(2), np.zeros(2, np.int32),
                        np.full(2, np.nan, np.float32), np.ones(2, bool), ("add", "reverse"))


@pytest.mark.parametrize("hidden_dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_loss_and_gradient_equal_those_from_teacher_logits(tiny_model_dir, tiny_llama_dir, hidden_dtype, tol):
    teacher_cfg = {"backend": "hf", "dtype": "float32", "hidden_dtype": hidden_dtype, "micro_batch_size": 8}
    teacher = TeacherWorker("t", tiny_llama_dir, teacher_cfg)
    batch = _batch()
    scores, meta = teacher.score(batch, np.array([0, 1], np.int32), topk=0, hidden=True)
    assert meta["bytes"] == scores.nbytes() and scores.hidden_dtype == hidden_dtype
    w, b, _ = teacher.output_head()
    # response positions only are shipped; the learner's assembly puts them back at token positions
    assert scores.hidden_RTH.shape[1] == batch.response_lens_B.max()
    g = _assemble([batch], [[scores]], ["t"])
    hidden = g["slots"][0]["hidden"].float()
    assert hidden.shape[:2] == batch.tokens_BL.shape
    np.testing.assert_array_equal(hidden.abs().sum(-1).numpy() > 0, batch.response_mask_BL())

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref_teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokens = torch.from_numpy(batch.tokens_BL.astype(np.int64))
    lens = torch.from_numpy(batch.prompt_lens_B + batch.response_lens_B)
    attn = (torch.arange(tokens.shape[1])[None] < lens[:, None]).long()
    mask = torch.from_numpy(batch.response_mask_BL()).float()
    with torch.no_grad():
        teacher_logits = ref_teacher(input_ids=tokens, attention_mask=attn).logits  # the teacher's own logits

    def losses(use_hidden: bool):
        student.zero_grad()
        z = student(input_ids=tokens, attention_mask=attn).logits[:, :-1]  # predicts tokens[:, 1:]
        m = mask[:, 1:].reshape(-1)
        if use_hidden:
            kl = full_vocab_reverse_kl(z.reshape(-1, z.shape[-1]), hidden[:, 1:].reshape(-1, hidden.shape[-1]),
                                       torch.from_numpy(w), m, chunk_size=5)
        else:
            kl = reverse_kl_from_logits(z.reshape(-1, z.shape[-1]), teacher_logits[:, :-1].reshape(-1, z.shape[-1]), m)
        loss = (kl * m).sum() / m.sum()
        loss.backward()
        return loss.item(), torch.cat([p.grad.reshape(-1) for p in student.parameters()]).clone()

    loss_h, grad_h = losses(True)
    loss_l, grad_l = losses(False)
    assert loss_l > 0.01
    assert abs(loss_h - loss_l) <= tol * max(1.0, abs(loss_l))
    assert torch.allclose(grad_h, grad_l, atol=tol * grad_l.abs().max().item(), rtol=tol)

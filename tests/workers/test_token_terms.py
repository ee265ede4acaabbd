"""The learner's terms from hidden states, chunk by chunk (workers/token_terms.py), against today's path
(full [b, L, V] logits: loss.terms_from_logits) as the reference: log-probs, entropy, the top-k and
full-vocabulary KL of several teachers per row, the loss and its gradients to the hidden states and the
head, with the vocabulary cut to the tokenizer, a soft-capped and scaled head, and temperature."""

import pytest
import torch

from mopd_ray.workers.loss import (SIGNAL_IDS, MicroBatch, micro_batch_loss, terms_from_hidden,
                                   terms_from_logits, token_logprobs_from_logits)
from mopd_ray.workers.token_terms import head_logits, token_terms

S_, K_, F_ = SIGNAL_IDS["sampled"], SIGNAL_IDS["topk"], SIGNAL_IDS["full_vocab"]
ALGO = dict(is_correction="tis", tis_cap=2.0, icepop_low=0.5, icepop_high=2.0, clip_low=0.2, clip_high=0.28,
            dual_clip=None, loss_agg="token_mean", policy_loss="ppo_clip", topk_divergence="reverse",
            full_vocab_chunk_size=5)


def _case(seed, b=4, L=9, H=6, V=24, vocab=20, K=3, Ht=5, post=(1.0, 0.0), signals=None):
    """A random student (hidden states + a linear head of V rows, ``vocab`` of them real tokens), rows with
    two teacher slots each, response positions from 4 on (one row shorter)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64) * 2)
    tokens = torch.randint(0, vocab, (b, L), generator=g)
    mask = torch.zeros(b, L, dtype=torch.float64)
    mask[:, 4:] = 1
    mask[-1, -2:] = 0
    signals = torch.tensor(signals or [[S_, K_], [K_, F_], [F_, -1], [S_, F_]])
    S = signals.shape[1]
    teachers = torch.tensor([[0, 1], [1, 2], [2, -1], [0, 3]])[:, :S]
    coef = (torch.rand(S, b, 1, generator=g, dtype=torch.float64) + 0.5).expand(S, b, L).clone()
    coef[(signals < 0).T] = 0
    topk = [torch.topk(torch.log_softmax(torch.randn(b, L, vocab, generator=g, dtype=torch.float64), -1), K, -1)
            for _ in range(S)]
    t_hidden = [torch.randn(b, L, Ht, generator=g, dtype=torch.float64) for _ in range(S)]
    heads = {t: (torch.randn(V + 4, Ht, generator=g, dtype=torch.float64), None, (1.0, 0.0)) for t in range(4)}
    heads[2] = (heads[2][0], torch.randn(V + 4, generator=g, dtype=torch.float64), (0.7, 3.0))  # bias, scale, cap
    old = torch.randn(b, L, generator=g, dtype=torch.float64) * 0.1 - 2
    mb = MicroBatch(tokens, mask, old, old + 0.05, torch.randn(b, L, generator=g, dtype=torch.float64) * mask,
                    coef, teachers, signals, [t.indices for t in topk], [t.values for t in topk], t_hidden)
    return hidden, head, post, vocab, mb, heads


@pytest.mark.parametrize("seed,temperature,post,chunk,divergence", [
    (0, 1.0, (1.0, 0.0), 5, "reverse"),
    (1, 0.7, (1.0, 0.0), 3, "forward"),
    (2, 1.0, (0.5, 4.0), 1000, "reverse"),  # the family's logit scale and soft-cap (Cohere / Gemma 2)
])
def test_hidden_state_chunks_equal_the_full_logits_path_in_value_and_gradient(seed, temperature, post, chunk,
                                                                              divergence):
    hidden, head, post, vocab, mb, heads = _case(seed, post=post)
    algo = {**ALGO, "topk_divergence": divergence}
    den = float(mb.response_mask_bL.sum())
    logits_fn = head_logits(head, post, vocab, 1.0)

    # today's path: every position's full logits
    ref_terms = terms_from_logits(logits_fn(hidden), mb, heads, temperature, vocab, algo)
    ref_loss, ref_m = micro_batch_loss(ref_terms, mb, algo, den)
    ref_grads = torch.autograd.grad(ref_loss, [hidden, head.weight])

    new_terms = terms_from_hidden(hidden, head_logits(head, post, vocab, temperature), mb, heads, temperature, algo,
                                  chunk=chunk, want_entropy=True)
    new_loss, new_m = micro_batch_loss(new_terms, mb, algo, den)
    new_grads = torch.autograd.grad(new_loss, [hidden, head.weight])

    m = mb.response_mask_bL.bool()
    assert torch.allclose(new_terms["logprobs"][m], ref_terms["logprobs"][m], atol=1e-10)
    assert torch.allclose(new_terms["dense"][m], ref_terms["dense"][m], atol=1e-10)
    assert torch.allclose(new_terms["entropy"][m], ref_terms["entropy"][m].double(), atol=1e-5)  # ref: fp32
    assert torch.allclose(new_loss, ref_loss, atol=1e-10) and new_m.keys() == ref_m.keys()
    for a, b in zip(new_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()
    assert new_grads[0].abs().sum() > 0 and new_grads[1].abs().sum() > 0


def test_only_the_asked_positions_are_computed_and_no_full_logits_tensor_exists():
    """The head sees the gathered positions only, chunk by chunk, in the forward and (recomputed) backward."""
    hidden, head, post, vocab, mb, _ = _case(3)
    seen = []
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    where = mb.response_mask_bL.bool()
    out = token_terms(hidden, head_logits(head, post, vocab, 1.0), mb.tokens_bL, where, chunk=4)
    out["logprobs"].sum().backward()
    handle.remove()
    n = int(where[:, 1:].sum())
    forward = [s for s in seen[: (n + 3) // 4]]
    assert sum(s[0] for s in forward) == n and max(s[0] for s in seen) <= 4  # never more than a chunk at once
    assert len(seen) == 2 * ((n + 3) // 4)  # each chunk once more in the backward (recomputed, not kept)
    want = token_logprobs_from_logits(head_logits(head, post, vocab, 1.0)(hidden), mb.tokens_bL)
    assert torch.allclose(out["logprobs"][where], want[where]) and (out["logprobs"][~where] == 0).all()


def test_peak_memory_grows_with_the_chunk_not_with_positions_times_vocabulary():
    import tracemalloc  # noqa: F401  (torch CPU allocations are measured by the profiler below)

    from torch.profiler import ProfilerActivity, profile

    V, H = 4096, 16
    head = torch.nn.Linear(H, V, bias=False)

    def peak(n, fn):
        hidden = torch.randn(1, n + 1, H, requires_grad=True)
        tokens = torch.randint(0, V, (1, n + 1))
        where = torch.ones(1, n + 1, dtype=torch.bool)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(hidden, tokens, where).sum().backward()
        events = [e for e in prof.events() if e.cpu_memory_usage > 0]
        return max((e.cpu_memory_usage for e in events), default=0)

    chunked = lambda h, t, w: token_terms(h, head_logits(head, (1.0, 0.0), V, 1.0), t, w, chunk=64)["logprobs"]  # noqa: E731
    full = lambda h, t, w: token_logprobs_from_logits(head(h).float(), t)  # noqa: E731
    logits_bytes = 2048 * V * 4
    assert peak(2048, chunked) < logits_bytes / 8  # one chunk's [64, V] at a time
    assert peak(2048, full) >= logits_bytes  # today's path: at least the whole [N, V] at once


def test_the_hf_teacher_scores_response_positions_from_its_hidden_states_as_its_forward_does(tmp_path):
    """The hf teacher backend on the same chunked path (no [rows, L, V] logits): a Gemma 2 with its final-logit
    soft-cap and 384 embedding rows for 320 tokens scores what a transformers forward computes."""
    import numpy as np

    from mopd_ray.batch import RolloutBatch, pad_sequences
    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import build_tiny_model
    from mopd_ray.workers.reference import logprobs_here
    from mopd_ray.workers.teacher import TeacherWorker

    path = str(build_tiny_model(tmp_path / "g2", TinyModelConfig(arch="gemma2", tie_word_embeddings=True,
                                                                 vocab_pad_to=128)))
    seqs = [[1, 298, 201, 67, 70, 70, 19, 20, 2, 201, 1, 275, 307, 201, 21, 22, 2], [1, 298, 201, 80, 33, 34, 2]]
    plens = np.array([5, 3], np.int32)
    batch = RolloutBatch(pad_sequences(seqs, 0), plens, np.array([len(s) for s in seqs], np.int32) - plens,
                         np.zeros((2, len(seqs[0])), np.float32), np.arange(2), np.zeros(2, np.int32),
                         np.full(2, np.nan, np.float32), np.ones(2, bool), ("add", "add"))
    ref = logprobs_here(path, seqs, "float32", 320)
    # fixed rows; a token budget of 24 (the rows packed into one sequence: 17 + 7 tokens); of 20 (each alone)
    for budget in (None, 24, 20):
        teacher = TeacherWorker("g", path, {"backend": "hf", "dtype": "float32", "hidden_dtype": "float32",
                                            "micro_batch_size": 8, "logit_chunk_size": 4,
                                            "max_tokens_per_micro_batch": budget})
        assert teacher.pack == (budget is not None)  # Gemma 2 packs (its masks follow the position ids)
        scores, _ = teacher.score(batch, np.array([0, 1], np.int32), topk=3, hidden=False)
        for i, s in enumerate(seqs):
            got = scores.teacher_logprobs_RT[i, : len(s) - plens[i]]
            np.testing.assert_allclose(got, ref[i][plens[i]:], atol=1e-5, err_msg=f"budget {budget}")
            assert (scores.topk_ids_RTK[i, : len(s) - plens[i]] < 320).all()  # never a padded row

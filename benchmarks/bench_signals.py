"""Dense-signal costs: object-store bytes per token of each teacher payload, and the learner's peak
memory for the chunked full-vocabulary loss against the naive one as the sequence grows.

    .venv/bin/python benchmarks/bench_signals.py [--tiny-model DIR]

Part 1 measures real TeacherScores payloads from the tiny teachers (hf backend, this machine) and
computes the realistic shape on paper (vocabulary 152k, hidden 4096, 16k tokens). Part 2 measures
peak tensor allocation (mopd_ray.utils.memtrack) and wall time of forward + backward, as ratios in one
run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mopd_ray.algo import full_vocab_reverse_kl, reverse_kl_from_logits
from mopd_ray.utils.memtrack import PeakMemoryTracker


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024:
            return f"{n:8.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def paper_bytes_per_token(V: int, H: int, K: int) -> dict:
    return {"sampled (fp32 log-prob)": 4, f"top-{K} (int32 id + fp32 log-prob)": 8 * K,
            "hidden states (bf16)": 2 * H, "full logits (bf16, hypothetical)": 2 * V}


def measured_bytes_per_token(model_dir: str, K: int) -> dict:
    from mopd_ray.batch import RolloutBatch, pad_sequences
    from mopd_ray.workers.teacher import TeacherWorker

    rng = np.random.default_rng(0)
    prompt, resp, rows = 24, 32, 16
    seqs = [rng.integers(3, 250, prompt + resp).tolist() for _ in range(rows)]
    tokens = pad_sequences(seqs, 0)
    batch = RolloutBatch(tokens, np.full(rows, prompt, np.int32), np.full(rows, resp, np.int32),
                         np.zeros(tokens.shape, np.float32), np.arange(rows), np.zeros(rows, np.int32),
                         np.full(rows, np.nan, np.float32), np.ones(rows, bool), ("add",) * rows)
    teacher = TeacherWorker("t", model_dir, {"backend": "hf", "dtype": "float32", "hidden_dtype": "bfloat16",
                                             "micro_batch_size": 16})
    n_tok = rows * resp
    idx = np.arange(rows, dtype=np.int32)
    out = {}
    for label, kw in (("sampled", {}), (f"top-{K}", {"topk": K}), ("hidden states (bf16)", {"hidden": True})):
        scores, _ = teacher.score(batch, idx, **kw)
        extra = scores.teacher_logprobs_RT.nbytes if kw else 0  # the sampled log-probs ride along
        out[label] = (scores.nbytes() - extra) / n_tok
    V = teacher.model.config.vocab_size
    out["full logits (bf16, hypothetical)"] = 2 * V * (prompt + resp) / resp
    return out


def memory_and_time(V: int, H: int, sizes: list, chunk: int) -> list:
    rows = []
    for N in sizes:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(N, V, generator=g, requires_grad=True)
        h = torch.randn(N, H, generator=g)
        w = torch.randn(V, H, generator=g) / H ** 0.5
        m = torch.ones(N)
        res = {"N": N}
        for label, fn in (("chunked", lambda: full_vocab_reverse_kl(z, h, w, m, chunk_size=chunk)),
                          ("naive", lambda: reverse_kl_from_logits(z, h @ w.T, m))):
            t0 = time.perf_counter()
            with PeakMemoryTracker() as mem:
                (grad,) = torch.autograd.grad(fn().sum(), z)
            res[label] = (mem.peak_bytes - grad.numel() * grad.element_size(), time.perf_counter() - t0)
            del grad
        rows.append(res)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-model", default=None, help="a tiny teacher folder (built here when omitted)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--sizes", default="512,2048,8192")
    ap.add_argument("--chunk", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(1)
    K = 8
    print("== object-store payload per response token ==")
    V, H, T = 152064, 4096, 16384
    print(f"realistic shape on paper: vocab {V}, hidden {H}, {T} tokens per sequence")
    for label, b in paper_bytes_per_token(V, H, K).items():
        print(f"  {label:<36} {_fmt(b)} / token   {_fmt(b * T)} / sequence")
    model_dir = a.tiny_model
    if model_dir is None:
        from mopd_ray.config import TinyModelConfig
        from mopd_ray.models.tiny import build_tiny_model

        model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "teacher", TinyModelConfig(seed=1)))
    print(f"tiny teacher measured ({model_dir}): TeacherScores bytes / response token (response positions only, plus row index and offset)")
    for label, b in measured_bytes_per_token(model_dir, K).items():
        print(f"  {label:<36} {_fmt(b)} / token")

    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"\n== learner: full-vocabulary loss, vocab {a.vocab}, teacher hidden 256, chunk {a.chunk} ==")
    print("  extra peak memory beyond inputs and the logits' gradient; forward + backward time")
    print(f"  {'tokens':>7} {'chunked peak':>14} {'naive peak':>14} {'ratio':>7} {'chunked s':>10} {'naive s':>9}")
    for r in memory_and_time(a.vocab, 256, sizes, a.chunk):
        (cm, ct), (nm, nt) = r["chunked"], r["naive"]
        print(f"  {r['N']:>7} {_fmt(cm):>14} {_fmt(nm):>14} {nm / cm:>6.1f}x {ct:>10.2f} {nt:>9.2f}")
    print(f"  on paper at vocab {V}, {T} tokens, fp32: naive holds ~{_fmt(6 * T * V * 4)} of [tokens, vocab] "
          f"tensors; chunked (1024) ~{_fmt(6 * 1024 * V * 4)} whatever the length")


if __name__ == "__main__":
    main()

"""Long responses: the learner's loss-path memory and speed, full logits (before) vs hidden-state chunks (now).

    .venv/bin/python benchmarks/bench_long_seq.py [--quick] [--out FILE]

For response lengths 512 .. 32k at vocabularies 32k and 152k, a small student (transformers Qwen2, hidden
64, 2 layers: the weights do not count) takes one optimizer step (AdamW) on one row with the sampled
signal's PPO loss, in a fresh process per point. Reported: the process's peak resident memory above its
size after the model and the optimizer state exist (sampled every 2 ms), and tokens/s of the step.

- ``old``: today's path before the change: full [1, L, V] logits from the model's forward, the terms from
  them (mopd_ray.workers.loss.terms_from_logits, kept as the reference);
- ``new``: the learner's path: the decoder's last hidden states, the terms at the response positions
  chunk by chunk (terms_from_hidden, learner.logit_chunk_size: 512 by default), each chunk recomputed in the backward.

The old path at 8k x 152k needs ~19 GB (four fp32 copies of the logits) and is not run on a 24 GB machine:
its figure is extrapolated from 2k and 4k (the old path's memory is linear in L, measured), and the JSON
says so.

Packed vs padded (``--mix``, part of every run): 16 rows with lengths log-uniform in 64..8k (a long tail, as
reasoning traces are), one optimizer step over all of them on the learner's micro-batch path
(workers/packing.py, the loss from hidden-state chunks), a hidden-256 4-layer student at V 8k (the body's work
outweighs the head's, as in real models; the head runs at response positions only in every layout):

- ``padded``: today's fixed layout, ``micro_batch_size`` 4 rows in data order, each padded to its longest;
- ``sorted``: token-budget micro-batches of 8192 tokens, length-sorted and padded (``learner.packing=false``);
- ``packed``: token-budget micro-batches of 8192 tokens packed into one sequence each.

Tokens/s counts the rows' real tokens. Packed rows attend row by row (workers/packing.py ``use_varlen_attention``,
the twin of flash-attention-2's variable-length kernels; transformers' sdpa alone would attend over the whole
packed length under a block mask). Ends with one JSON line: ``peak_mem_ratio_8k_152k`` (new / old),
``packed_vs_padded`` (tokens/s, packed / padded), and the per-point table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _point(path: str, L: int, V: int, chunk: int) -> dict:
    """One step in this process; returns its figures."""
    import gc
    import threading

    import psutil
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from mopd_ray.workers.loss import MicroBatch, micro_batch_loss, terms_from_hidden, terms_from_logits
    from mopd_ray.workers.token_terms import head_logits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=L + 64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    algo = dict(is_correction="none", tis_cap=2.0, icepop_low=0.5, icepop_high=2.0, clip_low=0.2, clip_high=0.28,
                dual_clip=None, loss_agg="token_mean", policy_loss="ppo_clip", topk_divergence="reverse",
                full_vocab_chunk_size=1024)

    def step(n):
        tokens = torch.randint(0, V, (1, n))
        mask = torch.zeros(1, n)
        mask[:, 16:] = 1
        mb = MicroBatch(tokens, mask, torch.full((1, n), -3.0), torch.full((1, n), -3.0), torch.randn(1, n) * mask,
                        torch.ones(1, 1, n), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
        if path == "old":
            terms = terms_from_logits(model(input_ids=tokens).logits.float(), mb, None, 1.0, None, algo)
        else:
            hidden = model.model(input_ids=tokens).last_hidden_state
            terms = terms_from_hidden(hidden, head_logits(model.lm_head, (1.0, 0.0), V, 1.0), mb, None, 1.0, algo,
                                      chunk=chunk, want_entropy=True)
        loss, _ = micro_batch_loss(terms, mb, algo, float(mask.sum()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(64)  # the optimizer state exists now
    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    step(L)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {"path": path, "L": L, "V": V, "peak_extra_mb": round((peak[0] - base) / 2**20, 1),
            "seconds": round(seconds, 3), "tokens_per_s": round(L / seconds, 1)}


def _mix(layout: str, seed: int = 0) -> dict:
    """One optimizer step over the long-tailed mix in this process, micro-batches laid out as ``layout``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from mopd_ray.workers.loss import MicroBatch, micro_batch_loss, terms_from_hidden
    from mopd_ray.workers.packing import packed_hidden, plan_micro_batches
    from mopd_ray.workers.token_terms import head_logits, last_hidden

    torch.manual_seed(0)
    torch.set_num_threads(1)
    V = 8192
    lens = np.exp(np.random.default_rng(seed).uniform(np.log(64), np.log(8192), 16)).astype(np.int64)
    cfg = Qwen2Config(vocab_size=V, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=8192 + 64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    algo = dict(is_correction="none", tis_cap=2.0, icepop_low=0.5, icepop_high=2.0, clip_low=0.2, clip_high=0.28,
                dual_clip=None, loss_agg="token_mean", policy_loss="ppo_clip", topk_divergence="reverse",
                full_vocab_chunk_size=1024)
    L = int(lens.max())
    tokens_all = torch.randint(0, V, (len(lens), L))
    attn_all = torch.arange(L)[None] < torch.from_numpy(lens)[:, None]
    mask_all = (attn_all & (torch.arange(L)[None] >= 16)).float()
    if layout == "packed":  # as the learner: row-by-row attention where sdpa would attend over the packed length
        from mopd_ray.workers.packing import use_varlen_attention

        use_varlen_attention(model)
    plan = (plan_micro_batches(lens, 4, None, False) if layout == "padded"
            else plan_micro_batches(lens, 4, 8192, layout == "packed"))
    fn = (lambda ids, attn, pos: last_hidden(model, model.model, ids, attn, pos))
    den = float(mask_all.sum())
    t0 = time.perf_counter()
    for rows in plan:
        r = torch.from_numpy(rows)
        n = int(lens[rows].max())
        tokens, attn, mask = tokens_all[r, :n], attn_all[r, :n], mask_all[r, :n]
        hidden = packed_hidden(fn, tokens, attn.sum(-1)) if layout == "packed" else fn(tokens, attn.long(), None)
        b = len(rows)
        mb = MicroBatch(tokens, mask, torch.full((b, n), -3.0), torch.full((b, n), -3.0), torch.randn(b, n) * mask,
                        torch.ones(1, b, n), torch.zeros(b, 1, dtype=torch.long), torch.zeros(b, 1, dtype=torch.long))
        terms = terms_from_hidden(hidden, head_logits(model.lm_head, (1.0, 0.0), V, 1.0), mb, None, 1.0, algo,
                                  chunk=512, want_entropy=True)
        loss, _ = micro_batch_loss(terms, mb, algo, den)
        loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    computed = sum(int(lens[r].sum()) if layout == "packed" else len(r) * int(lens[r].max()) for r in plan)
    return {"layout": layout, "rows": len(lens), "tokens": int(lens.sum()), "micro_batches": len(plan),
            "padding_fraction": round(1 - int(lens.sum()) / computed, 3), "seconds": round(seconds, 2),
            "tokens_per_s": round(int(lens.sum()) / seconds, 1)}


def run_mix(layout: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--mix-point", layout], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"layout": layout, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_point(path: str, L: int, V: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--point", path, str(L), str(V), str(chunk)], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"path": path, "L": L, "V": V, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="512 / 2k / 8k (<= 10 minutes)")
    ap.add_argument("--chunk", type=int, default=512, help="learner.logit_chunk_size")
    ap.add_argument("--out", default=None)
    ap.add_argument("--point", nargs=4, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mix-point", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mix-only", action="store_true", help="only packed vs padded on the long-tailed mix")
    args = ap.parse_args()
    if args.mix_point:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_mix(args.mix_point)))
        return
    if args.point:
        sys.path.insert(0, str(ROOT))
        p, L, V, chunk = args.point
        print(json.dumps(_point(p, int(L), int(V), int(chunk))))
        return
    mix = []
    for layout in ("padded", "sorted", "packed"):
        mix.append(run_mix(layout))
        r = mix[-1]
        print(f"mix {layout:>6}  " + (f"{r['micro_batches']:>2} micro-batches  padding {r['padding_fraction']:.2f}  "
                                     f"{r['tokens_per_s']:>8.1f} tok/s" if "error" not in r else f"error {r['error']}"),
              flush=True)
    by_layout = {r["layout"]: r for r in mix if "error" not in r}
    packed_vs_padded = (round(by_layout["packed"]["tokens_per_s"] / by_layout["padded"]["tokens_per_s"], 3)
                        if {"packed", "padded"} <= set(by_layout) else None)
    if args.mix_only:
        print(json.dumps({"packed_vs_padded": packed_vs_padded, "mix": mix}))
        return
    lengths = [512, 2048, 8192] if args.quick else [512, 2048, 8192, 32768]
    rows = []
    for V in (32768, 151936):
        for L in lengths:
            for path in ("old", "new"):
                if path == "old" and L * V > 4096 * 151936:  # ~19 GB and more: not on a 24 GB machine
                    continue
                r = run_point(path, L, V, args.chunk)
                rows.append(r)
                print(f"{path:>3}  L={L:>6}  V={V:>6}  " + (f"peak +{r['peak_extra_mb']:>8.1f} MB  {r['tokens_per_s']:>9.1f} tok/s"
                                                           if "error" not in r else f"error {r['error']}"), flush=True)
    if 4096 not in lengths:  # the old path's 4k x 152k point, for the extrapolation to 8k
        rows.append(run_point("old", 4096, 151936, args.chunk))
        r = rows[-1]
        print(f"old  L=  4096  V=151936  peak +{r.get('peak_extra_mb', float('nan')):>8.1f} MB", flush=True)
    by = {(r["path"], r["L"], r["V"]): r for r in rows if "error" not in r}
    old_4k, old_2k = by.get(("old", 4096, 151936)), by.get(("old", 2048, 151936))
    new_8k = by.get(("new", 8192, 151936))
    old_8k_est = None
    if old_4k and old_2k:  # linear in L: extrapolate the slope of 2k -> 4k to 8k
        old_8k_est = old_4k["peak_extra_mb"] + (old_4k["peak_extra_mb"] - old_2k["peak_extra_mb"]) * 2
    ratio = round(new_8k["peak_extra_mb"] / old_8k_est, 4) if new_8k and old_8k_est else None
    summary = {"peak_mem_ratio_8k_152k": ratio, "old_8k_152k_peak_mb_extrapolated": old_8k_est,
               "new_8k_152k_peak_mb": new_8k and new_8k["peak_extra_mb"], "packed_vs_padded": packed_vs_padded,
               "mix": mix, "points": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

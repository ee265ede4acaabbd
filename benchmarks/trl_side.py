"""TRL half of the side-by-side throughput benchmark: TRL's on-policy ``DistillationTrainer`` at the
shapes of ``conf/experiment/bench_trl_shapes.yaml``.

    .venv/bin/python benchmarks/trl_side.py [--steps 20] [--warmup 3] [--models-dir DIR] [--threads 2]

Needs the ``bench`` extra (``pip install "trl==1.16.0"``; see pyproject). Student Qwen2 hidden 128 x 2
layers, teacher Qwen2 hidden 256 x 4 layers, both built here with the project's tiny-model builder
(same seeds and tokenizer as our side); prompts are the project's synthetic train split (add, reverse,
sort), rendered by TRL with the tokenizer's chat template exactly as ``mopd_ray.data.prompts.render``
does. 16 prompts x 1 sample x exactly 32 new tokens per step (``min_new_tokens`` = ``max_new_tokens``),
temperature 1, fp32, full-vocabulary reverse KL (``beta=1``), fully on-policy (TRL 1.16's trainer has no
``lmbda``: it always trains on student generations), constant learning rate 1e-4, HF ``generate``
(``use_vllm=False``: TRL's vLLM path does not run on vLLM's CPU build).

The first ``--warmup`` optimizer steps are not timed. Per timed step: wall time (callback
``on_step_begin`` -> ``on_step_end``), the generate call and the teacher forward (wrappers set on the
trainer instance around ``_generate_single_turn`` and ``_get_last_hidden_state``; TRL itself is not
changed); the student update is the rest (student forward, loss, backward, optimizer step). Prints one
JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

STUDENT = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256, seed=0)
TEACHER = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512, seed=1)
DOMAINS = ["add", "reverse", "sort"]
PROMPTS_PER_STEP = 16
NEW_TOKENS = 32
LR = 1e-4
DATA_SEED = 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps in all (warm-up included)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    ap.add_argument("--models-dir", default="/tmp/trl_bench_models")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = ap.parse_args(argv)
    if a.steps <= a.warmup:
        ap.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")
    return a


def build_models(models_dir: Path) -> tuple[Path, Path]:
    """Student and teacher folders from the project's builder (reused when already built from these specs)."""
    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models.tiny import ensure_tiny_model

    student, _ = ensure_tiny_model(models_dir / "student", TinyModelConfig(**STUDENT))
    teacher, _ = ensure_tiny_model(models_dir / "teacher", TinyModelConfig(**TEACHER))
    return student, teacher


def prompt_dataset(tokenizer, n_rows: int):
    """Conversational rows of the synthetic train split; TRL renders them with the chat template."""
    from datasets import Dataset

    from mopd_ray.data.domains import generate_split
    from mopd_ray.data.prompts import render

    per_domain = -(-n_rows // len(DOMAINS))
    rows = generate_split(DOMAINS, per_domain, DATA_SEED, "train")
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    # Same ids as our side's rendering (mopd_ray.data.prompts.render)
    sample = convs[0]
    trl_ids = tokenizer.apply_chat_template(sample, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    assert list(trl_ids) == render(tokenizer, rows[0]["prompt"]), "prompt rendering differs from our side"
    return Dataset.from_dict({"prompt": convs})


class StepTimes:
    """Per optimizer step: wall time, generate time, teacher time, response tokens."""

    def __init__(self):
        self.steps: list[dict] = []
        self._cur: dict | None = None

    def begin(self):
        self._cur = {"t0": time.perf_counter(), "generate": 0.0, "teacher": 0.0, "tokens": 0, "rows": 0}

    def end(self):
        cur, self._cur = self._cur, None
        cur["wall"] = time.perf_counter() - cur.pop("t0")
        self.steps.append(cur)

    def add(self, key, value):
        if self._cur is not None:
            self._cur[key] += value


def instrument(trainer, times: StepTimes) -> None:
    """Time TRL's generate call and teacher forward by wrapping the bound methods on this instance."""
    gen_orig = trainer._generate_single_turn
    hidden_orig = trainer._get_last_hidden_state
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)

    def generate_single_turn(*args, **kwargs):
        t = time.perf_counter()
        completion_ids = gen_orig(*args, **kwargs)
        times.add("generate", time.perf_counter() - t)
        times.add("tokens", sum(len(c) for c in completion_ids))
        times.add("rows", len(completion_ids))
        return completion_ids

    def get_last_hidden_state(unwrapped_model, *args, **kwargs):
        if unwrapped_model is not teacher:
            return hidden_orig(unwrapped_model, *args, **kwargs)
        t = time.perf_counter()
        out = hidden_orig(unwrapped_model, *args, **kwargs)
        times.add("teacher", time.perf_counter() - t)
        return out

    trainer._generate_single_turn = generate_single_turn
    trainer._get_last_hidden_state = get_last_hidden_state


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(a.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["WANDB_DISABLED"] = "true"
    os.environ["WANDB_MODE"] = "disabled"

    import torch

    torch.set_num_threads(a.threads)

    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    transformers.logging.set_verbosity_error()
    student_dir, teacher_dir = build_models(Path(a.models_dir))
    tokenizer = AutoTokenizer.from_pretrained(student_dir, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    dataset = prompt_dataset(tokenizer, a.steps * PROMPTS_PER_STEP)

    times = StepTimes()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.begin()

        def on_step_end(self, args, state, control, **kw):
            times.end()

    with tempfile.TemporaryDirectory(prefix="trl_side_") as out_dir:
        config = DistillationConfig(
            output_dir=out_dir,
            max_steps=a.steps,
            per_device_train_batch_size=PROMPTS_PER_STEP,
            gradient_accumulation_steps=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            beta=1.0,  # reverse KL
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_completion_length=NEW_TOKENS,
            generation_kwargs={"min_new_tokens": NEW_TOKENS},  # EOS suppressed: exactly 32 new tokens
            use_vllm=False,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            seed=0,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer, callbacks=[Timer()])
        instrument(trainer, times)
        trainer.train()

    timed = times.steps[a.warmup:]
    wall = [s["wall"] for s in timed]
    gen = [s["generate"] for s in timed]
    teach = [s["teacher"] for s in timed]
    upd = [s["wall"] - s["generate"] - s["teacher"] for s in timed]
    tokens = sum(s["tokens"] for s in timed)
    rows = sum(s["rows"] for s in timed)
    result = {
        "tool": "trl",
        "trl_version": trl.__version__,
        "steps_timed": len(timed),
        "tokens_per_s": round(tokens / sum(wall), 1),
        "step_s_median": round(statistics.median(wall), 4),
        "generate_s": round(statistics.median(gen), 4),
        "teacher_s": round(statistics.median(teach), 4),
        "update_s": round(statistics.median(upd), 4),
        "mean_response_len": round(tokens / rows, 2),
        "tokens_per_step": round(tokens / len(timed), 1),
        "tokens_per_s_at_median_step": round(tokens / len(timed) / statistics.median(wall), 1),
        "step_s_mean": round(statistics.fmean(wall), 4),
        "threads": a.threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""What the user sees: a progress bar per step, per-step metrics to a JSONL file and to wandb."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Keys whose values must never be logged or saved, whatever a config or environment holds.
SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")


def redact(obj):
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(m in str(k).lower() for m in SECRET_MARKERS) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class MetricsLogger:
    def __init__(self, run_dir: str, cfg_dict: dict, logging_cfg, total_steps: int, run_name: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.path.open("a") if logging_cfg.jsonl else None
        self.wandb = None
        if logging_cfg.wandb_mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=logging_cfg.project, entity=logging_cfg.entity,
                                        name=logging_cfg.run_name or run_name, mode=logging_cfg.wandb_mode,
                                        dir=str(run_dir), config=redact(cfg_dict), reinit="finish_previous")
            except Exception as e:  # logging must not kill a training run
                log.warning("wandb disabled: %s", e)
        self.bar = None
        if logging_cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=run_name, unit="step", dynamic_ncols=True)
        self.t0 = time.time()

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"step": step, "time_s": round(time.time() - self.t0, 3), **clean}
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({"rev_kl": f"{metrics.get('reverse_kl', float('nan')):.4f}",
                                  "tok/s": f"{metrics.get('rollout/tokens_per_s', 0):.0f}",
                                  "loss": f"{metrics.get('loss', float('nan')):.4f}"})

    def log_eval(self, step: int, results: dict) -> dict:
        """Evaluation results {domain: {accuracy, pass@k, n}} -> eval.jsonl and wandb; returns flat metrics."""
        flat = {f"eval/{d}/{k}": v for d, r in results.items() for k, v in r.items() if k != "n"}
        if results:
            flat["eval/mean_accuracy"] = sum(r["accuracy"] for r in results.values()) / len(results)
        with (self.path.parent / "eval.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "time_s": round(time.time() - self.t0, 3), **flat}) + "\n")
        if self.wandb is not None:
            self.wandb.log(flat, step=step)
        if self.bar is not None:
            self.bar.write(f"eval @ step {step}: " + ", ".join(f"{d} {r['accuracy']:.2f}" for d, r in sorted(results.items())))
        return flat

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str, name: str = "metrics.jsonl") -> list:
    p = Path(run_dir) / name
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


__all__ = ["MetricsLogger", "read_metrics", "redact"]

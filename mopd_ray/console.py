"""What a person sees on the console: the plan, a progress bar, warnings, and a closing summary.

Everything else (the resolved config, per-step metrics, engine and library chatter) goes to the run
directory or below the warning level, unless ``logging.verbose=true``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

# Libraries whose INFO output is chatter for a person watching a run (kept at WARNING unless verbose).
CHATTY = ("ray", "ray.data", "ray.tune", "ray.train", "vllm", "DeepSpeed", "deepspeed", "transformers", "wandb",
          "hydra", "filelock", "urllib3", "matplotlib", "PIL", "math_verify")
# Read by the libraries when first imported (so set before): C++ warnings of torch, vLLM's logger, wandb.
QUIET_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR", "VLLM_LOGGING_LEVEL": "ERROR", "WANDB_SILENT": "true",
             "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def configure(verbose: bool) -> None:
    """Console logging: our messages at INFO, libraries at WARNING (or everything at INFO when verbose)."""
    os.environ["MOPD_VERBOSE"] = "1" if verbose else "0"  # inherited by Ray's workers (cluster.WORKER_ENV)
    if not verbose:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", level=logging.INFO)
    logging.getLogger("mopd_ray").setLevel(logging.INFO)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # Ray 2.60's notice that token authentication is on (the default; launch/ scripts use it)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def skip_exit_collection() -> None:
    """Called by a command when its work is done: the interpreter's exit then leaves the heap that torch, vLLM and
    transformers built to the operating system instead of running the cycle collector over it (``gc.freeze``):
    2.7 s of CPU at every exit of a process that imported them, 0.2 s after this (this machine, 2026-12-07)."""
    import gc

    gc.freeze()


def quiet_torch() -> None:
    """torch's import sets up its own "torch" logger (Triton notes at WARNING); quiet it after importing."""
    if os.environ.get("MOPD_VERBOSE") == "1":
        return
    import torch  # noqa: F401

    logging.getLogger("torch").setLevel(logging.ERROR)


def quiet_worker() -> None:
    """Inside a Ray worker process: keep the libraries' INFO logs out of the driver's console."""
    if os.environ.get("MOPD_VERBOSE") == "1":
        return
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch").setLevel(logging.ERROR)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}")
    return str(v)


def summary(run_name: str, steps: int, wall_s: float, first: dict, last: dict, eval_history: list, paths: dict) -> str:
    """The closing lines of a run: headline metrics (first -> last step), held-out accuracy, where outputs are."""
    lines = [f"run {run_name} finished: {steps} steps in {wall_s:.0f} s"]
    heads = [("reverse KL", "reverse_kl"), ("loss", "loss"), ("reward", "reward/mean"),
             ("response length", "rollout/mean_response_len"), ("generated tokens/s", "rollout/tokens_per_s"),
             ("step s", "step_s")]
    for label, key in heads:
        if key in last:
            start = f"{_fmt(first[key])} -> " if key in first and key not in ("step_s", "rollout/tokens_per_s") else ""
            lines.append(f"  {label:<20} {start}{_fmt(last[key])}")
    if eval_history:
        (s0, e0), (s1, e1) = eval_history[0], eval_history[-1]
        doms = sorted({k.split("/")[1] for k in e1 if k.endswith("/accuracy")})
        lines.append(f"  held-out accuracy    step {s0} -> {s1}: " + ", ".join(
            f"{d} {100 * (e0.get(f'eval/{d}/accuracy') or 0):.1f} -> {100 * e1[f'eval/{d}/accuracy']:.1f}%"
            for d in doms))
    for label, p in paths.items():
        if p:
            lines.append(f"  {label:<20} {p}")
    return "\n".join(lines)

"""The evaluation command: model folders on an eval file of one's own, judged by the configured rewards,
through vLLM (real engine, tiny model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _evaluate(*args):
    return subprocess.run([sys.executable, "-m", "mopd_ray.evaluate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_evaluate_command_table_json_and_rewards(tiny_model_dir, tmp_path):
    rows = [{"prompt": "always right", "domain": "easy", "answer": "x"},
            {"prompt": "also right", "domain": "easy", "answer": "y"},
            {"prompt": "never right", "domain": "hard", "answer": "z"},
            {"prompt": "what is half of one", "domain": "math", "answer": r"\frac{1}{2}"},
            {"prompt": "tell me a joke", "domain": "chat", "answer": "ha"}]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res.json"
    proc = _evaluate("--model", tiny_model_dir, "--data", str(data), "--k", "2", "--out", str(out),
                     "data.rewards.easy=tests.rewards_fixture:always_one", "data.rewards.hard=tests.rewards_fixture:never",
                     "data.rewards.math=math_verify", "rollout.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    got = res["results"][tiny_model_dir]
    assert got["easy"] == {"accuracy": 1.0, "n": 2, "pass@2": 1.0}
    assert got["hard"] == {"accuracy": 0.0, "n": 1, "pass@2": 0.0}
    assert got["math"]["n"] == 1 and "chat" not in got  # no reward for chat: skipped, and said so
    assert "chat" in proc.stderr and "no reward" in proc.stderr
    assert res["rewards"]["math"] == "math_verify" and res["k"] == 2
    assert f"| {tiny_model_dir} | 100.0 | 0.0 |" in proc.stdout  # easy acc, hard acc, ...
    assert "INFO" not in proc.stdout + proc.stderr  # vLLM's own logs stay off the console


def test_evaluate_command_bad_inputs_exit_2(tiny_model_dir, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "p", "domain": "d", "answer": "a"}) + "\n")
    proc = _evaluate("--model", str(tmp_path / "nope"), "--data", str(data))
    assert proc.returncode == 2 and "not a transformers model folder" in proc.stderr
    proc = _evaluate("--model", tiny_model_dir, "--data", str(data), "data.rewards.d=nope_mod:fn")
    assert proc.returncode == 2 and "data.rewards.d" in proc.stderr and "cannot be loaded" in proc.stderr
    proc = _evaluate("--model", tiny_model_dir, "--data", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr

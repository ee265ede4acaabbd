"""Pre-flight checks without engines: end-of-turn ids, chat templates, notes, probe arithmetic.
(The log-prob probe on real engines, with a perturbed replica: tests/runtime/test_teachers.py.)"""

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from mopd_ray.models.compat import TokenizerMismatchError, check_compatible, stop_ids, tokenizer_fingerprint
from mopd_ray.preflight import gap, probe_sequences, tolerance

from .helpers import compose_cfg


def _fp(path):
    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(path), 320, str(path))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_teacher_with_other_end_of_turn_ids_fails_naming_both(tiny_model_dir, tmp_path):
    other = _copy(tiny_model_dir, tmp_path / "instruct")
    gen = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [gen["eos_token_id"], 0]}))
    student, teacher = _fp(tiny_model_dir), _fp(other)
    assert student["stop_ids"] == [2] and teacher["stop_ids"] == [0, 2]
    with pytest.raises(TokenizerMismatchError, match=r"teacher 'math \(.*\)' ends a response with ids \[0, 2\], the "
                                                     r"student 'stu' with \[2\].*skip_checks=\[stop_ids\]"):
        check_compatible(student, "stu", teacher, "math (/ckpt)")
    assert check_compatible(student, "stu", teacher, "math (/ckpt)", skip=["stop_ids"]) == []
    # rollouts that stop at the teacher's ids too (rollout.stop_token_ids, by default every folder's): a note
    (note,) = check_compatible(student, "stu", teacher, "math (/ckpt)", run_stop=[0, 2])
    assert "rollouts stop at any of [0, 2]" in note
    with pytest.raises(TokenizerMismatchError, match="rollout.stop_token_ids"):
        check_compatible(student, "stu", teacher, "math (/ckpt)", run_stop=[2])


def test_teacher_folder_with_another_chat_template_cannot_change_the_scored_ids(tiny_model_dir, tmp_path):
    """Prompts are rendered by the student's template only; a teacher folder whose template renders the
    probe conversation differently fails (it would score a format it was not trained on)."""
    from mopd_ray.data.prompts import render

    other = _copy(tiny_model_dir, tmp_path / "other_template")
    (other / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")
    s_tok, t_tok = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(other)
    assert render(s_tok, "2+2") != render(t_tok, "2+2")  # the templates do differ
    with pytest.raises(TokenizerMismatchError, match="another chat template.*rendered once with the student's"):
        check_compatible(_fp(tiny_model_dir), "stu", _fp(other), "chat (x)")
    assert check_compatible(_fp(tiny_model_dir), "stu", _fp(other), "chat (x)", skip=["template"]) == []
    # a teacher folder without any template scores the student's rendering (nothing to compare)
    assert check_compatible(_fp(tiny_model_dir), "stu", {**_fp(other), "template_ids": None, "template_turn_ids": None}, "t") == []


def test_padding_reported_and_probe_arithmetic(tiny_model_dir):
    fp = _fp(tiny_model_dir)
    assert check_compatible(fp, "stu", {**fp, "embedding_rows": fp["vocab_size"] + 64}, "big (x)") == [
        "big: 64 padded embedding rows (masked: never sampled, not in any distribution)"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    probes = probe_sequences(tok, stop_ids(tok, tiny_model_dir))
    # three single-turn probes and a multi-turn one (assistant, tool, assistant turns: mopd_ray/envs/chat.py)
    assert len(probes) == 4 and all(p[-1] == 2 for p in probes)
    assert tok.decode(probes[3]).count("<|im_start|>tool") == 1
    a = [np.array([0.0, -1.0, -2.0]), np.array([0.0, -3.0])]
    b = [np.array([5.0, -1.5, -2.0]), np.array([0.0, -2.0])]
    assert gap(a, b) == pytest.approx((0.5, 1.0))  # position 0 carries no log-prob
    cfg = compose_cfg()
    assert tolerance(cfg, "float32") == 1e-3 and tolerance(cfg, "float32", "bfloat16") == 5e-2
    assert tolerance(compose_cfg("teachers.preflight.logprob_tolerance=0.2"), "float32") == 0.2


def test_unknown_skip_check_is_a_config_error():
    from mopd_ray.config import ConfigError, validate

    with pytest.raises(ConfigError, match="teachers.models.self.skip_checks.*stop_ids, template, probe"):
        validate(compose_cfg("teachers.models.self.skip_checks=[eos]"))


def test_a_full_vocab_head_the_learner_rebuilds_wrongly_is_refused_naming_the_teacher():
    """The full-vocab teacher's rebuilt distribution (hidden states x head x the family's post-processing)
    must be its engine's: a Gemma 2 cap left out gave 0.11 nats/token here (tests/runtime/test_model_families.py)."""
    import numpy as np
    import pytest

    from mopd_ray.preflight import PreflightError, check_head

    engine = [np.array([0.0, -1.0, -2.0], np.float32)]
    out = {"notes": []}
    check_head("chat", "/m/chat", [engine[0] + np.array([0, 1e-6, 0], np.float32)], engine, 1e-3, out)
    assert out["head"] < 1e-5
    with pytest.raises(PreflightError, match=r"teacher 'chat'.*output head of /m/chat.*signal=topk"):
        check_head("chat", "/m/chat", [engine[0] + np.array([0, 0.11, 0.11], np.float32)], engine, 1e-3, out)
    check_head("chat", "/m/chat", "its hf backend applies the model's own head", engine, 1e-3, out)
    assert "full-vocab head not compared" in out["notes"][-1]

import json
import random
import re
import subprocess
import sys

import pytest

from mopd_ray.data import DOMAINS, Domain, generate_split, get_domain, reward_for, write_jsonl

TEMPLATES = {
    "add": re.compile(r"add the numbers: (\d{2})\+(\d{2}) ="),
    "reverse": re.compile(r"reverse the letters: ([A-Z]{4,6})"),
    "sort": re.compile(r"sort the digits: (\d{5,7})"),
}


def recompute_answer(domain, prompt):
    m = TEMPLATES[domain].fullmatch(prompt)
    assert m, f"{domain} prompt does not match its template: {prompt!r}"
    if domain == "add":
        a, b = int(m.group(1)), int(m.group(2))
        assert 10 <= a <= 99 and 10 <= b <= 99
        return str(a + b)
    if domain == "reverse":
        return m.group(1)[::-1]
    return "".join(sorted(m.group(1)))


def test_the_built_in_domains_registered():
    assert set(DOMAINS) == {"add", "reverse", "sort", "count", "calc"}
    assert all(isinstance(d, Domain) and d.name == n for n, d in DOMAINS.items())


def test_the_long_task_writes_2k_tokens_of_working_before_its_answer(tiny_model_dir):
    """count: the working (every number from n down to m) is 2,100-2,550 tokens of the tiny tokenizer."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    lens = []
    for _ in range(50):
        prompt, answer = DOMAINS["count"].make_example(rng)
        n, m = (int(x) for x in prompt.rstrip(":").split()[3::2])
        assert answer.split()[0] == str(n) and answer.split()[-2:] == [str(m), "liftoff"]
        lens.append(len(tok(answer, add_special_tokens=False)["input_ids"]))
    assert 2100 <= min(lens) and max(lens) <= 2550, (min(lens), max(lens))
    assert DOMAINS["count"].reward(answer, answer) == 1.0 and DOMAINS["count"].reward(answer[:-8], answer) == 0.0


@pytest.mark.parametrize("domain", ["add", "reverse", "sort"])
def test_templates_and_answers(domain):
    rows = generate_split([domain], 200, seed=1, split="train")
    assert len(rows) == 200
    for row in rows:
        assert row["domain"] == domain
        assert row["answer"] == recompute_answer(domain, row["prompt"])
        assert reward_for(domain, row["answer"], row["answer"]) == 1.0


def test_make_example_uses_the_whole_payload_range():
    rng = random.Random(0)
    lengths = {len(get_domain("reverse").make_example(rng)[1]) for _ in range(300)}
    assert lengths == {4, 5, 6}
    lengths = {len(get_domain("sort").make_example(rng)[1]) for _ in range(300)}
    assert lengths == {5, 6, 7}


def test_prompts_are_template_words_plus_digits_or_upper_case():
    for row in generate_split(["add", "reverse", "sort"], 50, seed=0, split="eval"):
        assert re.fullmatch(r"[a-z :]+[0-9A-Z+ =]*", row["prompt"]), row["prompt"]


@pytest.mark.parametrize("response,reward", [
    ("123", 1.0), ("123<|im_end|>", 1.0), ("  123 \n", 1.0), (" 123 <|im_end|>\n", 1.0),
    ("123<|endoftext|><|im_end|>", 1.0), ("1234", 0.0), ("12", 0.0), ("", 0.0), ("<|im_end|>123", 0.0),
    ("the answer is 123", 0.0),
])
def test_reward_exact_match_after_marker_and_whitespace(response, reward):
    for name in DOMAINS:
        assert reward_for(name, response, "123") == reward
        assert get_domain(name).reward(response, "123") == reward


def test_reward_for_unknown_domain_is_none():
    assert reward_for("chemistry", "123", "123") is None


def test_get_domain_error_lists_valid_names():
    with pytest.raises(KeyError) as e:
        get_domain("multiply")
    for name in ("multiply", "add", "reverse", "sort"):
        assert name in str(e.value)


def test_generate_split_rows_and_ids():
    rows = generate_split(["add", "sort"], 5, seed=0, split="eval")
    assert [r["id"] for r in rows] == [f"eval-{d}-{i}" for d in ("add", "sort") for i in range(5)]
    assert all(set(r) == {"id", "prompt", "domain", "answer"} for r in rows)


def test_generate_split_is_deterministic_and_seeded():
    a = generate_split(["add", "reverse", "sort"], 30, seed=7, split="train")
    b = generate_split(["add", "reverse", "sort"], 30, seed=7, split="train")
    c = generate_split(["add", "reverse", "sort"], 30, seed=8, split="train")
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    # a domain's rows depend only on (seed, split, domain), not on the other domains asked for
    assert generate_split(["sort"], 30, seed=7, split="train") == [r for r in a if r["domain"] == "sort"]


def test_prompts_are_unique_within_a_split():
    rows = generate_split(["add"], 2000, seed=0, split="train")
    assert len({r["prompt"] for r in rows}) == 2000


@pytest.mark.parametrize("seed", [0, 3])
def test_eval_prompts_never_in_train(seed):
    train = generate_split(["add", "reverse", "sort"], 2000, seed=seed, split="train")
    evals = generate_split(["add", "reverse", "sort"], 100, seed=seed, split="eval")
    assert len(evals) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}


def test_impossible_size_raises_naming_the_domain():
    with pytest.raises(ValueError, match="'add'"):  # only 90 * 90 = 8100 distinct add prompts exist
        generate_split(["add"], 8200, seed=0, split="train")
    with pytest.raises(ValueError, match="'add'"):  # eval holds about a tenth of them
        generate_split(["add"], 2000, seed=0, split="eval")


def test_bad_split_and_domain():
    with pytest.raises(ValueError, match="split"):
        generate_split(["add"], 1, seed=0, split="test")
    with pytest.raises(KeyError, match="valid names"):
        generate_split(["nope"], 1, seed=0, split="train")


def test_write_jsonl_round_trip(tmp_path):
    rows = generate_split(["reverse"], 3, seed=0, split="train")
    path = write_jsonl(rows, tmp_path / "sub" / "train.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_data_layer_imports_no_engine():
    code = ("import sys, mopd_ray.data; bad = [m for m in ('torch', 'ray', 'vllm', 'deepspeed') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

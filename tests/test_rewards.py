"""Rewards for any domain: the registry, math answers, user functions, timeouts and errors."""

import textwrap

import pytest

from mopd_ray.rewards import RewardError, Rewards, edit_distance, exact_match, math_verify_match, numeric_match, similarity

# (response, gold answer, equal?) - math answers written out, as users' data holds them
MATH_CASES = [
    (r"The answer is \frac{1}{2}.", "0.5", True),
    ("so x = 0.5", r"\frac{1}{2}", True),
    (r"\boxed{\frac{3}{4}}", "0.75", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"the result is $x^2+2x+1$", r"(x+1)^2", True),
    ("It equals 1/3", r"\frac{1}{3}", True),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    ("I do not know", "2", False),
    ("", "2", False),
]


@pytest.mark.parametrize("response,answer,equal", MATH_CASES)
def test_math_verify_reward_on_latex_and_numeric_answers(response, answer, equal):
    assert math_verify_match(response + "<|im_end|>", answer) == (1.0 if equal else 0.0)


def test_numeric_and_exact_rewards():
    assert numeric_match("the sum is 1,000", 1000) == 1.0
    assert numeric_match("3 then 1/2", "0.5") == 1.0
    assert numeric_match("about .50", "1/2") == 1.0
    assert numeric_match("0.51", "0.5") == 0.0
    assert numeric_match("no number", "4") == 0.0
    with pytest.raises(ValueError, match="not a number"):
        numeric_match("4", "four")
    assert exact_match(" 42 <|im_end|>tail", "42") == 1.0
    assert exact_match("42!", "42") == 0.0


def test_similarity_gives_partial_credit_and_full_credit_only_for_an_exact_match():
    assert [edit_distance(a, b) for a, b in [("", ""), ("abc", ""), ("kitten", "sitting"), ("1 2 3", "1 3 2")]] == \
        [0, 3, 3, 2]
    assert similarity(" 1 2 3 <|im_end|>junk", "1 2 3") == 1.0
    assert similarity("1 2 4", "1 2 3") == pytest.approx(0.8)  # one of five characters wrong
    assert similarity("3 2 1", "1 2 3") == pytest.approx(0.6)
    assert similarity("", "123") == 0.0 and similarity("", "") == 1.0
    assert 0.0 < similarity("1 2 3 4 5 6", "1 2 3") < similarity("1 2 3 4", "1 2 3") < 1.0  # longer is worse
    r = Rewards({"sort": "similarity"}, builtin_domains=("sort",))
    assert r.score([("sort", "9 1", "1 9"), ("sort", "1 9", "1 9")]) == [pytest.approx(1 / 3), 1.0]


def test_train_rewards_replace_the_judge_for_training_only():
    from mopd_ray.config import compose_config
    from mopd_ray.data.run_rewards import rewards_spec

    cfg = compose_config(["data.rewards.math=numeric", "data.train_rewards.sort=similarity",
                          "data.train_rewards.math=similarity"])
    assert rewards_spec(cfg)["by_domain"] == {"math": "numeric"}
    assert rewards_spec(cfg, train=True)["by_domain"] == {"math": "similarity", "sort": "similarity"}


@pytest.fixture
def user_module(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import time
        def length_is(response, answer):
            return float(len(response) == int(answer))
        def hangs(response, answer):
            time.sleep(30)
            return 1.0
        def raises(response, answer):
            raise KeyError("grader table has no entry")
        def not_a_number(response, answer):
            return "yes"
    """))
    return str(tmp_path)


def test_registry_routes_domains_and_runs_user_functions_in_a_child(user_module):
    r = Rewards({"math": "math_verify", "count": "my_rewards:length_is", "num": "numeric"}, timeout_s=5.0,
                builtin_domains=("add",), search_path=(user_module,))
    try:
        got = r.score([("math", r"\boxed{\frac{1}{2}}", "0.5"), ("count", "abc", 3), ("count", "ab", 3),
                       ("add", "42", "42"), ("num", "x = 7", 7), ("unknown", "x", "x"), ("math", "1", None)])
        assert got == [1.0, 1.0, 0.0, 1.0, 1.0, None, None]
        assert r.has_reward("add") and not r.has_reward("unknown")
        assert r.timeouts == 0
    finally:
        r.close()


def test_a_call_over_the_timeout_scores_zero_and_is_counted(user_module):
    r = Rewards({"slow": "my_rewards:hangs", "count": "my_rewards:length_is"}, timeout_s=0.5,
                search_path=(user_module,))
    try:
        assert r.score([("slow", "a", 1), ("count", "a", 1)]) == [0.0, 1.0]
        assert r.timeouts == 1
        assert r.score([("count", "ab", 2)]) == [1.0]  # the child lives on after a timeout
    finally:
        r.close()


@pytest.mark.parametrize("fn,needle", [("raises", "KeyError: 'grader table has no entry'"),
                                       ("not_a_number", "returned 'yes', not a number")])
def test_a_function_that_fails_names_domain_function_response_and_fix(user_module, fn, needle):
    r = Rewards({"code": f"my_rewards:{fn}"}, search_path=(user_module,))
    try:
        with pytest.raises(RewardError) as e:
            r.score([("code", "print(1)", "1")])
        msg = str(e.value)
        assert f"my_rewards:{fn}" in msg and "domain 'code'" in msg and "print(1)" in msg and needle in msg
        assert "data.rewards.code" in msg
    finally:
        r.close()


def test_a_function_that_cannot_be_imported_is_named():
    r = Rewards({"code": "no_such_module_xyz:score"})
    try:
        with pytest.raises(RewardError, match="no_such_module_xyz:score.*cannot be loaded"):
            r.score([("code", "x", "y")])
    finally:
        r.close()

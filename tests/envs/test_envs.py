"""Environments without engines: chat records, rendering turns as appended ids, replies, the calculator, errors."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from mopd_ray.data.dataset import DataError, load_prompts
from mopd_ray.envs.base import EnvError, as_reply, load_env_class
from mopd_ray.envs.calculator import CalculatorEnv
from mopd_ray.envs.chat import ChatTemplateError, TurnRenderer, render_messages
from mopd_ray.envs.pool import EnvActor

# Qwen2.5's way of rendering tools and tool turns (a system block listing the tools, tool answers as user turns
# wrapped in <tool_response>), trimmed to what the test needs
QWEN_LIKE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Gemma's kind: user and assistant only, strictly alternating
ALTERNATING = ("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
               "{{ raise_exception('Conversation roles must be user or assistant') }}{% endif %}"
               "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _tokenizer(tiny_model_dir, tmp_path, template=None):
    if template is None:
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path / "tpl"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(template)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [None, QWEN_LIKE], ids=["chatml", "qwen_tools"])
def test_an_environment_turn_appended_to_the_ids_equals_the_template_rendering_the_whole_conversation(
        tiny_model_dir, tmp_path, template):
    """prompt ids + the student's turn as generated + the tool turn's ids = the template rendering the whole
    conversation: teachers and learner see what a chat-formatted conversation would be, without re-tokenising."""
    tok = _tokenizer(tiny_model_dir, tmp_path, template)
    tools = [{"type": "function", "function": {"name": "calc"}}]
    first = [{"role": "user", "content": "multiply with the tool: 12*34 ="}]
    ids = render_messages(tok, first, tools)
    ids += tok("calc(12,34)", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    r = TurnRenderer(tok, [tok.convert_tokens_to_ids("<|im_end|>")], "tiny", tools)
    tool_turn = [{"role": "tool", "content": "408"}]
    ids += r.turn_ids(tool_turn)
    whole = render_messages(tok, first + [{"role": "assistant", "content": "calc(12,34)"}] + tool_turn, tools)
    assert ids == whole
    assert r.turn_ids(tool_turn) is r.turn_ids(tool_turn)  # cached


def test_a_template_without_a_tool_role_is_refused_naming_the_fix(tiny_model_dir, tmp_path):
    tok = _tokenizer(tiny_model_dir, tmp_path, ALTERNATING)
    r = TurnRenderer(tok, [2], "gemma-like")
    with pytest.raises(ChatTemplateError, match="gemma-like.*roles.*'tool'.*'user'"):
        r.turn_ids([{"role": "tool", "content": "4"}])
    assert r.turn_ids([{"role": "user", "content": "4"}])[-3:] == render_messages(tok, [{"role": "user", "content": "x"}])[-3:]
    with pytest.raises(ChatTemplateError, match="end-of-turn ids.*rollout.stop_token_ids"):
        TurnRenderer(tok, [299], "gemma-like")


def test_chat_records_load_and_bad_ones_name_file_line_and_fix(tmp_path):
    good = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12*34?"}],
             "domain": "calc", "answer": "408", "tools": [{"type": "function", "function": {"name": "calc"}}],
             "metadata": {"difficulty": 1}},
            {"prompt": "2+2", "domain": "add", "answer": 4}]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_prompts(good)
    assert loaded[0]["prompt"] == "12*34?" and loaded[0]["messages"][0]["role"] == "system"
    assert loaded[0]["tools"][0]["function"]["name"] == "calc" and loaded[0]["metadata"] == {"difficulty": 1}
    assert "messages" not in loaded[1] and loaded[1]["answer"] == "4"
    bad = {"last turn is the assistant's": ({"messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}, "end the conversation"),
           "unknown role": ({"messages": [{"role": "robot", "content": "a"}]}, r"messages\[0\].*one of system"),
           "no user": ({"messages": [{"role": "system", "content": "a"}]}, "no user turn"),
           "empty": ({"messages": []}, "non-empty list"),
           "tools not a list": ({"messages": [{"role": "user", "content": "a"}], "tools": {"calc": 1}},
                                "list of JSON schemas"),
           "metadata not an object": ({"prompt": "a", "metadata": [1]}, "'metadata' must be a JSON object")}
    for name, (record, match) in bad.items():
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps({"domain": "calc", **record}) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl line 1: .*{match}"):
            load_prompts(f)


def test_replies_are_checked_and_the_calculator_plays_its_episode():
    assert as_reply({"done": True, "reward": 1}, "x").reward == 1.0
    for out, match in [({"messages": [{"role": "assistant", "content": "a"}]}, "assistant turns are the student's"),
                       ({"messages": [{"role": "tool"}]}, "each turn is"), ({}, "neither ended"),
                       ({"mesages": []}, "unknown keys"), ("text", "returned str")]:
        with pytest.raises(EnvError, match=match):
            as_reply(out, "x")
    env = CalculatorEnv({"answer": "408"})
    said = [{"role": "user", "content": "multiply with the tool: 12*34 ="}, {"role": "assistant", "content": "calc(12,34)"}]
    assert env.step(said) == {"messages": [{"role": "tool", "content": "408"}]}
    assert env.step(said + [{"role": "tool", "content": "408"}, {"role": "assistant", "content": "408<|im_end|>"}]) == {
        "done": True, "reward": 1.0}
    assert CalculatorEnv({"answer": "408"}).step(said[:1] + [{"role": "assistant", "content": "407"}])["reward"] == 0.0


def test_an_environment_that_cannot_load_or_raises_fails_its_episode_only():
    with pytest.raises(EnvError, match="package.module:Class"):
        load_env_class("tests.envs_fixture.TurnsEnv")
    with pytest.raises(EnvError, match="cannot be loaded.*importable"):
        load_env_class("tests.no_such_module:Env")
    with pytest.raises(EnvError, match="no step"):
        load_env_class("tests.envs_fixture:NoStep")
    actor = EnvActor({})  # the actor's code, called in this process
    row = {"id": "r1", "answer": "1"}
    first = actor.step("e1", "tests.envs_fixture:TurnsEnv", row, [{"role": "assistant", "content": "a"}])
    assert first == {"ok": {"messages": [{"role": "tool", "content": "ok 1"}], "done": False, "reward": None}}
    assert actor.open_episodes() == 1
    actor.step("e1", "tests.envs_fixture:TurnsEnv", row, [{"role": "assistant", "content": "a"}])
    assert actor.step("e1", "tests.envs_fixture:TurnsEnv", row, [{"role": "assistant", "content": "a"}])["ok"]["done"]
    assert actor.open_episodes() == 0  # closed when done
    broken = actor.step("e2", "tests.envs_fixture:FlakyEnv", row, [{"role": "assistant", "content": "a"}])
    assert "raised ValueError: the user's environment broke" in broken["error"]
    assert "cannot be loaded" in actor.step("e3", "tests.nope:Env", row, [])["error"]


def test_config_names_a_bad_environment_and_its_limits():
    from mopd_ray.config import ConfigError, validate

    from ..helpers import compose_cfg

    with pytest.raises(ConfigError, match="data.envs.calc.*cannot be loaded"):
        validate(compose_cfg("data.envs.calc=tests.nope:Env"))
    with pytest.raises(ConfigError, match="env.on_error"):
        validate(compose_cfg("env.on_error=ignore"))
    with pytest.raises(ConfigError, match="env.max_turns"):
        validate(compose_cfg("env.max_turns=0"))
    validate(compose_cfg("data.env=tests.envs_fixture:TurnsEnv", "env.kwargs.turns=3"))


def test_reasoning_blocks_are_stripped_for_rewards_and_cut_from_later_context():
    from mopd_ray.rewards import strip_thinking
    from mopd_ray.workers.episodes import Episode, cut_thinking

    assert strip_thinking("<think>12*34 is...</think> 408") == "408"
    assert strip_thinking("so 408</think>408") == "408"  # the template opened the block in the prompt
    assert strip_thinking("408 <think>unfinished") == "408 " and strip_thinking("408") == "408"
    # prompt [1, 2], then a turn "a <think> b c </think> d" as ids 5, 8, 6, 7, 9, 4 with OPEN=8, CLOSE=9
    ep = Episode("g-0", {}, None, [1, 2, 5, 8, 6, 7, 9, 4], [], 2, action=[1] * 6, lp=[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6],
                 turn_start=2)
    cut_thinking(ep, 8, 9)
    assert ep.seq == [1, 2, 5, 4] and ep.action == [1, 1] and ep.lp == [-0.1, -0.6]
    ep = Episode("g-0", {}, None, [1, 2, 6, 9, 4], [], 2, action=[1] * 3, lp=[0.0] * 3, turn_start=2)
    cut_thinking(ep, 8, 9)  # opened in the prompt
    assert ep.seq == [1, 2, 4]
    ep = Episode("g-0", {}, None, [1, 2, 8, 6], [], 2, action=[1] * 2, lp=[0.0] * 2, turn_start=2)
    cut_thinking(ep, 8, 9)  # never closed: left as generated
    assert ep.seq == [1, 2, 8, 6]

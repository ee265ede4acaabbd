"""Bad input fails at start with a message naming the file, line or key and the fix; nothing starts."""

import json
import logging

import pytest

from mopd_ray.main import run

from .helpers import compose_cfg


@pytest.fixture
def main(artifacts, tmp_path, caplog):
    def call(*overrides):
        cfg = compose_cfg(f"run.artifacts_dir={artifacts}", f"run.output_dir={tmp_path}/out", "run.dry_run=true",
                          *overrides)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = run(cfg)
        return rc, caplog.text
    return call


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _data(path):
    return [f"data.train_path={path}", "data.eval_path=null"]


@pytest.mark.parametrize("lines,expect", [
    (['{"prompt": "add the numbers: 1+2 =", "domain": "add", "answer": "3"}', '{"prompt": "x", "domain": '],
     ["train.jsonl", "line 2", "malformed JSON", "one JSON object"]),
    (['{"domain": "add", "answer": "3"}'], ["train.jsonl", "line 1", "prompt"]),
    (['{"prompt": "   ", "domain": "add", "answer": "3"}'], ["train.jsonl", "line 1", "prompt", "empty"]),
    (['{"prompt": "add the numbers: 1+2 =", "answer": "3"}'], ["train.jsonl", "line 1", "domain"]),
    (['{"prompt": "add the numbers: 1+2 =", "domain": null, "answer": "3"}'],
     ["train.jsonl", "line 1", "'domain'", "is null"]),
    (['{"prompt": "add the numbers: 1+2 =", "domain": "chess", "answer": "3"}'],
     ["chess", "teachers.routing.chess=<teacher>", "teachers.default"]),
])
def test_bad_data_files(main, tmp_path, lines, expect):
    rc, text = main(*_data(_jsonl(tmp_path / "train.jsonl", lines)))
    assert rc == 2
    for e in expect:
        assert e in text, (e, text)


def test_long_prompts_are_filtered_and_counted(main, tmp_path):
    rows = [json.dumps({"prompt": "add the numbers: 1+2 =", "domain": "add", "answer": "3"}),
            json.dumps({"prompt": "sort the digits: " + "7" * 200, "domain": "sort", "answer": "7" * 200})]
    rc, text = main(*_data(_jsonl(tmp_path / "train.jsonl", rows)))
    assert rc == 0
    assert "dropped 1 of 2 prompts longer than data.max_prompt_len=48" in text


def test_missing_and_non_causal_and_pickled_model_folders(main, tmp_path):
    rc, text = main(f"teachers.models.add_expert.model_path={tmp_path}/nope", "teachers.models.add_expert.tiny=null")
    assert rc == 2 and "teacher:add_expert" in text and "no config.json" in text

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    rc, text = main(f"teachers.models.add_expert.model_path={bert}", "teachers.models.add_expert.tiny=null")
    assert rc == 2 and "not a causal language model" in text and "bert" in text


def test_pickled_weights_are_refused(main, artifacts, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(artifacts / "tiny" / "teacher_add", folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    rc, text = main(f"teachers.models.add_expert.model_path={folder}", "teachers.models.add_expert.tiny=null")
    assert rc == 2 and "no .safetensors weights" in text


def test_remote_code_is_not_run_unless_enabled(main, artifacts, tmp_path):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(artifacts / "tiny" / "teacher_add", folder)
    sentinel = tmp_path / "code_ran"
    (folder / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, text = main(f"teachers.models.add_expert.model_path={folder}", "teachers.models.add_expert.tiny=null")
    assert rc == 2 and "trust_remote_code" in text and not sentinel.exists()


def test_jsonl_that_is_not_utf8_names_the_file_and_line(main, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "add the numbers: 1+2 =", "domain": "add", "answer": "3"}\n\xff\xfe{"prompt": 1}\n')
    rc, text = main(*_data(path))
    assert rc == 2
    assert "train.jsonl line 2" in text and "not UTF-8" in text and "0xff" in text


def test_teacher_config_that_is_not_json_names_the_teacher_and_the_file(main, artifacts, tmp_path):
    import shutil

    folder = tmp_path / "broken_teacher"
    shutil.copytree(artifacts / "tiny" / "teacher_add", folder)
    (folder / "config.json").write_text("{architectures: [Qwen2ForCausalLM]")
    rc, text = main(f"teachers.models.add_expert.model_path={folder}", "teachers.models.add_expert.tiny=null")
    assert rc == 2
    assert "teacher:add_expert" in text and f"{folder}/config.json is not valid JSON" in text

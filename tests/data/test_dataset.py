import json
import sys
from collections import Counter

import pytest

from mopd_ray.data import DataError, PromptSampler, check_routes, filter_long_prompts, load_prompts


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(prompt="add the numbers: 12+30 =", domain="math", **extra):
    return json.dumps({"prompt": prompt, "domain": domain, **extra})


# ---------------------------------------------------------------- load_prompts

def test_load_jsonl_normalises_rows(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [
        row(answer="42", id="q-1"),
        "",
        "   ",
        row(prompt="why?", domain="chat", extra="ignored"),
        row(answer=7),
    ])
    rows = load_prompts(path)
    assert rows == [
        {"id": "q-1", "prompt": "add the numbers: 12+30 =", "domain": "math", "answer": "42"},
        {"id": "train.jsonl:4", "prompt": "why?", "domain": "chat", "answer": None},
        {"id": "train.jsonl:5", "prompt": "add the numbers: 12+30 =", "domain": "math", "answer": "7"},
    ]


def test_load_custom_keys_and_json_suffix(tmp_path):
    path = write_lines(tmp_path / "data.json", [json.dumps({"q": "hi", "topic": "chat", "a": "yo"})])
    rows = load_prompts(path, prompt_key="q", domain_key="topic", answer_key="a")
    assert rows == [{"id": "data.json:1", "prompt": "hi", "domain": "chat", "answer": "yo"}]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        load_prompts(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(e.value)


def test_unsupported_suffix(tmp_path):
    path = write_lines(tmp_path / "train.csv", ["prompt,domain"])
    with pytest.raises(DataError, match="train.csv.*.jsonl"):
        load_prompts(path)


def test_malformed_json_names_line_and_quotes_it(tmp_path):
    bad = '{"prompt": "abc", "domain": ' + "x" * 200
    path = write_lines(tmp_path / "train.jsonl", [row(), "", bad])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "train.jsonl" in msg and "line 3" in msg and "malformed JSON" in msg
    assert bad[:80] in msg and bad[:81] not in msg


def test_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [row(), '["a", "b"]'])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "train.jsonl" in msg and "line 2" in msg and "'prompt'" in msg and "list" in msg


@pytest.mark.parametrize("record,key,phrase", [
    ({"domain": "math"}, "prompt", "missing key"),
    ({"prompt": None, "domain": "math"}, "prompt", "is null"),
    ({"prompt": "", "domain": "math"}, "prompt", "empty"),
    ({"prompt": " \t\n", "domain": "math"}, "prompt", "empty"),
    ({"prompt": 5, "domain": "math"}, "prompt", "must be a string"),
    ({"prompt": "hi"}, "domain", "missing key"),
    ({"prompt": "hi", "domain": ""}, "domain", "empty"),
    ({"prompt": "hi", "domain": "  "}, "domain", "empty"),
])
def test_bad_prompt_or_domain_names_file_line_key(tmp_path, record, key, phrase):
    path = write_lines(tmp_path / "user.jsonl", [row(), row(), json.dumps(record)])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "user.jsonl" in msg and "line 3" in msg and f"'{key}'" in msg and phrase in msg


def test_missing_key_message_gives_the_fix(tmp_path):
    path = write_lines(tmp_path / "user.jsonl", [json.dumps({"question": "hi", "domain": "chat"})])
    with pytest.raises(DataError, match=r"data\.prompt_key.*question"):
        load_prompts(path)


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_file_with_no_rows(tmp_path, lines):
    path = write_lines(tmp_path / "empty.jsonl", lines)
    with pytest.raises(DataError, match="empty.jsonl.*no rows"):
        load_prompts(path)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not really parquet")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_prompts(path)


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "domain": ["x", "y"], "answer": ["1", None]}), path)
    assert load_prompts(path) == [
        {"id": "train.parquet:0", "prompt": "a", "domain": "x", "answer": "1"},
        {"id": "train.parquet:1", "prompt": "b", "domain": "y", "answer": None},
    ]
    pq.write_table(pa.table({"prompt": ["a", " "], "domain": ["x", "y"]}), path)
    with pytest.raises(DataError, match="train.parquet row 1.*'prompt'"):
        load_prompts(path)


# ---------------------------------------------------------------- routes and length filter

def test_check_routes_names_each_unrouted_domain_and_count():
    rows = [{"domain": d} for d in ["math"] * 3 + ["chat"] * 2 + ["code"]]
    with pytest.raises(DataError) as e:
        check_routes(rows, {"math": "t_math"}, None, source="train.jsonl")
    msg = str(e.value)
    assert "train.jsonl" in msg and "'math'" not in msg
    assert "'chat' (2 rows)" in msg and "'code' (1 rows)" in msg
    assert "teachers.routing.chat=<teacher>" in msg and "teachers.routing.code=<teacher>" in msg
    assert "teachers.default" in msg


def test_check_routes_passes_when_routed_or_default():
    rows = [{"domain": "math"}, {"domain": "chat"}]
    check_routes(rows, {"math": "a", "chat": "b"}, None, source="s")
    check_routes(rows, {}, "a", source="s")


def test_filter_long_prompts_counts_dropped():
    rows = [{"id": i} for i in range(5)]
    kept, dropped = filter_long_prompts(rows, [3, 10, 8, 9, 2], max_len=8)
    assert [r["id"] for r in kept] == [0, 2, 4] and dropped == 2
    assert filter_long_prompts(rows, [1] * 5, max_len=8) == (rows, 0)
    with pytest.raises(ValueError):
        filter_long_prompts(rows, [1, 2], max_len=8)


# ---------------------------------------------------------------- sampler

def make_rows(n):
    return [{"id": str(i), "domain": "abc"[i % 3]} for i in range(n)]


def ids(batch):
    return [r["id"] for r in batch]


def test_sampler_rejects_empty_rows_and_bad_batch_size():
    with pytest.raises(DataError):
        PromptSampler([], batch_size=2, seed=0)
    with pytest.raises(DataError):
        PromptSampler(make_rows(3), batch_size=0, seed=0)


def test_full_batches_across_epoch_boundary():
    sampler = PromptSampler(make_rows(10), batch_size=4, seed=0)
    batches = [sampler.next_batch() for _ in range(5)]  # 20 rows = exactly two epochs
    assert all(len(b) == 4 for b in batches)
    served = [i for b in batches for i in ids(b)]
    assert sorted(served[:10]) == sorted(served[10:]) == [str(i) for i in range(10)]
    assert sampler.epoch == 2 and sampler.position == 0 and sampler.consumed == 20
    # batch 3 straddles the boundary: the last 2 rows of epoch 0, then the first 2 of epoch 1
    assert ids(batches[2]) == served[8:12]


def test_every_row_once_per_epoch_and_epochs_differ():
    rows = make_rows(50)
    sampler = PromptSampler(rows, batch_size=7, seed=3)
    served = [i for _ in range(50) for i in ids(sampler.next_batch())]  # 350 rows = 7 epochs
    epochs = [served[k * 50:(k + 1) * 50] for k in range(7)]
    for order in epochs:
        assert Counter(order) == Counter(r["id"] for r in rows)
    assert epochs[0] != epochs[1]
    assert epochs[0] != [r["id"] for r in rows]  # shuffled, so domains interleave
    assert sampler.consumed == 350 and sampler.epoch == 7


def test_sampler_is_reproducible_and_shuffle_off_keeps_order():
    a, b = PromptSampler(make_rows(9), 4, seed=5), PromptSampler(make_rows(9), 4, seed=5)
    assert [ids(a.next_batch()) for _ in range(6)] == [ids(b.next_batch()) for _ in range(6)]
    plain = PromptSampler(make_rows(5), 3, seed=5, shuffle=False)
    assert [ids(plain.next_batch()) for _ in range(3)] == [["0", "1", "2"], ["3", "4", "0"], ["1", "2", "3"]]


def test_batch_larger_than_the_data():
    sampler = PromptSampler(make_rows(3), batch_size=7, seed=0)
    batch = ids(sampler.next_batch())
    assert len(batch) == 7 and sampler.epoch == 2 and sampler.position == 1
    assert sorted(batch[:3]) == sorted(batch[3:6]) == ["0", "1", "2"]


@pytest.mark.parametrize("through_json", [False, True])
def test_state_dict_round_trip_gives_identical_batches(through_json):
    rows = make_rows(11)
    sampler = PromptSampler(rows, batch_size=4, seed=9)
    for _ in range(4):  # mid-epoch 1
        sampler.next_batch()
    state = sampler.state_dict()
    assert state == {"seed": 9, "epoch": 1, "position": 5, "consumed": 16, "batch_size": 4, "n_rows": 11}
    if through_json:
        state = json.loads(json.dumps(state))
    expected = [ids(sampler.next_batch()) for _ in range(8)]

    resumed = PromptSampler(rows, batch_size=4, seed=9)
    resumed.next_batch()  # a different position that load_state_dict must overwrite
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position, resumed.consumed) == (1, 5, 16)
    assert [ids(resumed.next_batch()) for _ in range(8)] == expected
    assert resumed.state_dict() == sampler.state_dict()


def test_load_state_dict_rejects_changed_data():
    state = PromptSampler(make_rows(11), batch_size=4, seed=0).state_dict()
    other = PromptSampler(make_rows(12), batch_size=4, seed=0)
    with pytest.raises(DataError, match="11 rows.*12.*data changed"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="missing keys"):
        other.load_state_dict({"seed": 0})

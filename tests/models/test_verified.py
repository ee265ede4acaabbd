"""An architecture outside the verified matrix is named in the pre-flight's summary (and in its errors)."""

import json
import shutil

from mopd_ray.models.compat import architecture_of, unverified


def test_an_architecture_outside_the_matrix_is_named(tiny_model_dir, tmp_path):
    assert architecture_of(str(tiny_model_dir)) == "Qwen2ForCausalLM"
    assert unverified("the student", str(tiny_model_dir)) is None
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForTokenClassificationLike"]
    (other / "config.json").write_text(json.dumps(cfg))
    note = unverified("teacher 'x'", str(other))
    assert "teacher 'x'" in note and "Qwen2ForTokenClassificationLike" in note and "not in the verified matrix" in note
    assert architecture_of(str(tmp_path / "missing")) == "unknown"

"""An engine context longer than its model's is refused before any engine starts, naming the key."""

import json

import pytest

from mopd_ray.config import ConfigError
from mopd_ray.models.compat import check_context_lengths, model_context

from ..helpers import compose_cfg


def test_contexts_longer_than_the_models_are_refused_naming_the_key(artifacts):
    base = [f"run.artifacts_dir={artifacts}"]
    assert model_context(f"{artifacts}/tiny/student") == 256  # the tiny models' max_position_embeddings
    check_context_lengths(compose_cfg(*base))  # the defaults fit
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens.*student's context \(256"):
        check_context_lengths(compose_cfg(*base, "rollout.max_new_tokens=240", "model.max_model_len=512",
                                          *[f"teachers.models.{t}.max_model_len=512" for t in
                                            ("add_expert", "reverse_expert", "self")]))
    with pytest.raises(ConfigError, match=r"teachers.models.add_expert.max_model_len = 320 .*at most 256"):
        check_context_lengths(compose_cfg(*base, "teachers.models.add_expert.max_model_len=320"))
    # a teacher scored by transformers has no engine context to refuse
    check_context_lengths(compose_cfg(*base, "teachers.models.add_expert.max_model_len=320",
                                      "teachers.models.add_expert.backend=hf"))


def test_composite_configs_and_rope_scaling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 128}}))
    assert model_context(str(tmp_path)) == 128
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128,
                                                      "rope_scaling": {"type": "yarn", "factor": 4.0}}))
    assert model_context(str(tmp_path)) is None  # the engine derives the longer limit itself

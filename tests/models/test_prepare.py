"""A model given as a hub id is refused before any engine starts, with the command that fetches it onto
shared storage (workers run offline on nodes that may not share a cache: issue 32, finding 6)."""

import pytest

from mopd_ray.models.prepare import prepare_models

from ..helpers import compose_cfg


def test_a_hub_id_is_refused_at_start_with_the_download_command(tmp_path):
    cfg = compose_cfg(f"run.artifacts_dir={tmp_path}", "model.path=Qwen/Qwen3-4B-Base", "model.tiny=null")
    with pytest.raises(FileNotFoundError, match=r"student: 'Qwen/Qwen3-4B-Base' is not a folder here.*"
                                                r"huggingface-cli download Qwen/Qwen3-4B-Base --local-dir "
                                                r"/shared/models/Qwen3-4B-Base.*model.path=/shared/models/Qwen3-4B-Base"):
        prepare_models(cfg)
    cfg = compose_cfg(f"run.artifacts_dir={tmp_path}", "teachers.models.add_expert.model_path=org/math-rl",
                      "teachers.models.add_expert.tiny=null")
    with pytest.raises(FileNotFoundError, match=r"teachers.models.add_expert.model_path=/shared/models/math-rl"):
        prepare_models(cfg)

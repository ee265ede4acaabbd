"""rollout.stop_token_ids: by default every end-of-turn id of the student's and the teachers' folders, so
a base student with an instruct teacher stops where the teacher expects (issue 32, finding 5)."""

import json
import shutil
from pathlib import Path

from mopd_ray.models.compat import run_stop_ids

from ..helpers import compose_cfg


def test_stop_ids_are_the_union_of_student_and_teacher_end_of_turn_ids(tiny_model_dir, tmp_path):
    instruct = tmp_path / "instruct"
    shutil.copytree(tiny_model_dir, instruct)
    gen = json.loads((instruct / "generation_config.json").read_text())
    own = gen["eos_token_id"]
    gen["eos_token_id"] = [own, 7]  # an instruct teacher that also ends a turn with id 7
    (instruct / "generation_config.json").write_text(json.dumps(gen))
    over = [f"model.path={tiny_model_dir}", "teachers=empty", f"teachers.models.chat.model_path={instruct}",
            "teachers.routing.add=chat", "teachers.routing.reverse=chat", "teachers.routing.sort=chat"]
    assert run_stop_ids(compose_cfg(*over)) == sorted({own, 7})
    assert run_stop_ids(compose_cfg(*over, "rollout.stop_token_ids=[9]")) == [9]  # the user's list as given
    # a teacher folder the driver cannot see adds nothing here (its worker checks its own at start-up)
    assert run_stop_ids(compose_cfg(*over[:2], "teachers.models.chat.model_path=/nowhere/chat",
                                    *over[3:])) == [own]
    assert Path(tiny_model_dir, "config.json").exists()

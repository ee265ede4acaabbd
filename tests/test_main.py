"""The entry point composes, validates, builds the tiny models and prints the plan."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _main(tmp_path, *overrides, artifacts=None):
    """A main run; ``artifacts``: a folder with the tiny models built already (else built under tmp_path)."""
    return subprocess.run(
        [sys.executable, "-m", "mopd_ray.main", f"run.artifacts_dir={artifacts or tmp_path / 'artifacts'}",
         f"hydra.run.dir={tmp_path}/run", *overrides],
        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_dry_run_prints_resolved_config_and_plan(tmp_path):
    proc = _main(tmp_path, "run.dry_run=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher   add_expert" in proc.stdout and "domains=['sort']" in proc.stdout
    assert (tmp_path / "artifacts/tiny/student/model.safetensors").exists()
    assert (tmp_path / "artifacts/tiny/teacher_reverse/config.json").exists()
    assert "algorithm:" in (tmp_path / "run/resolved_config.yaml").read_text()


def test_config_error_exits_2_with_key(tmp_path):
    proc = _main(tmp_path, "learner.world_size=3", "run.dry_run=true")
    assert proc.returncode == 2
    assert "learner.world_size" in proc.stderr + proc.stdout
    assert not (tmp_path / "artifacts").exists()  # nothing is built for a config that cannot run


def test_teacher_with_another_vocabulary_fails_before_any_engine_starts(tmp_path):
    from mopd_ray.config import TinyModelConfig
    from mopd_ray.models import tiny

    old = tiny.TOKENIZER_VOCAB_SIZE
    tiny.TOKENIZER_VOCAB_SIZE = 300
    try:
        other = tiny.build_tiny_model(tmp_path / "other_vocab", TinyModelConfig(seed=4))
    finally:
        tiny.TOKENIZER_VOCAB_SIZE = old
    proc = _main(tmp_path, f"teachers.models.add_expert.model_path={other}", "teachers.models.add_expert.tiny=null")
    assert proc.returncode == 2
    err = proc.stderr + proc.stdout
    assert "teacher 'add_expert" in err and "different tokenizer vocabulary" in err and "artifacts/tiny/student" in err
    assert "teacher   add_expert" not in proc.stdout  # stopped before the plan is printed and Ray started


def test_teacher_with_another_chat_template_fails_before_any_engine_starts(tmp_path, artifacts):
    import shutil

    other = tmp_path / "other_template"
    shutil.copytree(f"{artifacts}/tiny/teacher_add", other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ 'USER: ' + m['content'] + '\n' }}"
                                               "{% endfor %}{% if add_generation_prompt %}{{ 'BOT: ' }}{% endif %}")
    proc = _main(tmp_path, f"teachers.models.add_expert.model_path={other}", "teachers.models.add_expert.tiny=null",
                 artifacts=artifacts)
    assert proc.returncode == 2
    err = proc.stderr + proc.stdout
    assert "teacher 'add_expert" in err and "another chat template" in err and "skip_checks=[template]" in err
    assert "teacher   add_expert" not in proc.stdout


def test_missing_model_folder_is_a_clear_error(tmp_path, artifacts):
    proc = _main(tmp_path, f"teachers.models.add_expert.model_path={tmp_path}/nope", "teachers.models.add_expert.tiny=null",
                 artifacts=artifacts)
    assert proc.returncode == 2
    assert "teacher:add_expert" in proc.stderr + proc.stdout and "config.json" in proc.stderr + proc.stdout


def test_teachers_added_and_removed_from_the_command_line(tmp_path, artifacts):
    proc = _main(tmp_path, "run.dry_run=true", f"teachers.models.cli.model_path={tmp_path}/cli_teacher",
                 "+teachers.models.cli.tiny={seed: 5}", "teachers.models.cli.weight=0.7", "teachers.routing.add=cli",
                 "~teachers.models.add_expert", artifacts=artifacts)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher   cli " in proc.stdout and "weight=0.7" in proc.stdout and "domains=['add']" in proc.stdout
    assert "add_expert" not in proc.stdout
    assert (tmp_path / "cli_teacher/config.json").exists()  # built from its tiny spec (TeacherConfig defaults)
    proc = _main(tmp_path, "run.dry_run=true", "teachers.models.cli.model_path=/x", "teachers.models.cli.replcas=2",
                 artifacts=artifacts)
    assert proc.returncode == 2 and "teachers.models.cli.replcas" in proc.stderr + proc.stdout


def test_teachers_from_a_config_dir_of_ones_own(tmp_path, artifacts):
    mine = tmp_path / "my_conf" / "teachers"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(f"models:\n  expert:\n    model_path: {tmp_path}/expert\n    tiny: {{seed: 6}}\n"
                                    "    weight: 0.25\ndefault: expert\n")
    proc = subprocess.run([sys.executable, "-m", "mopd_ray.main", "--config-dir", str(tmp_path / "my_conf"),
                           "teachers=mine", f"run.artifacts_dir={artifacts}", f"hydra.run.dir={tmp_path}/run",
                           "run.dry_run=true"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher   expert" in proc.stdout and "weight=0.25" in proc.stdout and "domains=['<default>']" in proc.stdout


def test_wrongly_typed_or_unknown_override_exits_2_like_every_config_error(tmp_path):
    for override, key in (("learner.lr=fast", "learner.lr"), ("algorithm.clip_hihg=0.3", "clip_hihg")):
        proc = _main(tmp_path, override, "run.dry_run=true")
        assert proc.returncode == 2, (override, proc.returncode)
        assert key in proc.stderr + proc.stdout

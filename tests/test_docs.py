"""The documentation site builds with warnings as errors, its configuration reference covers the whole schema,
and the options the pages and the README name exist."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mopd_ray import config_reference as ref

ROOT = Path(__file__).resolve().parent.parent

# Fields that had no comment in mopd_ray/config.py when the generated reference came in (2026-12-07). A field
# leaves this list when it gets a comment; a new field needs one (it becomes its description in the reference).
UNDESCRIBED = {
    "ModelConfig": "max_model_len path tokenizer_seed trust_remote_code",
    "TinyModelConfig": "hidden_size intermediate_size max_position_embeddings num_heads num_kv_heads num_layers seed "
                       "tie_word_embeddings",
    "TeacherConfig": "dtype max_model_len num_cpus_per_shard num_gpus_per_shard replicas request_timeout_s "
                     "tensor_parallel_size",
    "TeacherPoolConfig": "custom_resources dtype hidden_dtype max_logprobs max_model_len num_cpus_per_shard "
                         "num_gpus_per_shard replicas tensor_parallel_size",
    "PreflightConfig": "enabled",
    "RolloutConfig": "custom_resources dtype gpu_memory_utilization max_logprobs max_new_tokens n_samples_per_prompt "
                     "num_cpus_per_shard num_gpus_per_shard overlong_buffer overlong_penalty replicas seed temperature "
                     "tensor_parallel_size top_p weight_sync_check_tolerance",
    "LearnerConfig": "betas custom_resources dtype grad_clip gradient_checkpointing lr min_lr num_cpus_per_rank "
                     "num_gpus_per_rank offload_optimizer warmup_steps weight_decay world_size zero_stage",
    "AlgorithmConfig": "advantage clip_high clip_low dual_clip icepop_high icepop_low loss_agg policy_loss tis_cap topk",
    "DataConfig": "answer_key domain_key domains eval_path max_prompt_len num_eval_per_domain num_train_per_domain "
                  "prompt_key prompts_per_step seed shuffle",
    "ClusterConfig": "cpus_per_node dashboard_host gpus_per_node include_dashboard num_gpus object_store_memory "
                     "placement_timeout_s",
    "LoggingConfig": "entity jsonl progress_bar project run_name",
    "RunConfig": "artifacts_dir eval_pass_k name seed total_steps",
    "DemoConfig": "base_lr base_steps batch seed signals teacher_lr teacher_steps",
    "CascadeConfig": "recovery_steps signals",
    "CascadeStageConfig": "domains steps",
}
# names in the pages' code that are not options: typos shown on purpose (what a typo gets you), a role's method
NOT_OPTIONS = {"algorithm.clip_hihg", "teachers.models.math.replcas", "learner.train_step"}


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict`: a broken internal link or anchor, a page missing from the nav, or a failing hook
    (the generated reference) fails the build."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.fail("mkdocs / mkdocs-material missing: they are in the test extra (pip install -e '.[test]')")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    page = (site / "reference" / "configuration" / "index.html").read_text()
    assert "teachers.models.NAME.endpoint" in page and "learner.max_tokens_per_micro_batch" in page
    assert (site / "benchmark-results" / "2026-12-02_10-29-57_demo" / "accuracy.png").exists()


def test_reference_names_every_field_of_every_config_dataclass():
    """Every dataclass of mopd_ray/config.py is reached from MOPDConfig, and every one of its fields is a row of the
    generated page under its full key."""
    sections = ref.sections()
    markdown = ref.render_markdown()
    reached = {s.schema for s in sections}
    missing = [c.__name__ for c in ref.config_dataclasses() if c is not ref.schema.MOPDConfig and c not in reached]
    assert not missing, (f"config dataclasses not reachable from MOPDConfig (so not in the reference): {missing}; "
                         "hold them in a field, or name them in an open mapping's comment as 'name -> XConfig'")
    for sec in sections:
        names = [o.name for o in sec.options]
        assert names == [f.name for f in dataclasses.fields(sec.schema)], sec.key
        for o in sec.options:
            assert f"| `{o.key}` |" in markdown, o.key
    top = [o.key for s in sections for o in s.options if "." not in s.key]
    assert {f.name for f in dataclasses.fields(ref.schema.MOPDConfig)} <= {k.split(".")[0] for k in top}


def test_every_config_field_has_a_description():
    """A field's comment in mopd_ray/config.py is its description in the reference: a new field needs one."""
    sections = ref.sections()
    section_keys = {s.key.replace("[i]", "").removesuffix(".NAME") for s in sections}
    bare = {(s.schema.__name__, o.name) for s in sections for o in s.options
            if not o.description and o.key not in section_keys}
    legacy = {(cls, name) for cls, names in UNDESCRIBED.items() for name in names.split()}
    new = sorted(f"{c}.{n}" for c, n in bare - legacy)
    assert not new, (f"config fields without a description: {new}; add a '# ...' comment on the field's line "
                     "(or the lines right above it) in mopd_ray/config.py")
    fields = {(c.__name__, f.name) for c in ref.config_dataclasses() for f in dataclasses.fields(c)}
    stale = sorted(f"{c}.{n}" for c, n in legacy - (bare & fields))
    assert not stale, f"remove from UNDESCRIBED in tests/test_docs.py (described now, or gone): {stale}"


def test_field_comments_are_read_from_the_source():
    comments = ref.field_comments(ref.schema.LearnerConfig)
    assert comments["packing"].startswith("with a token budget, pack")  # the comment lines above the field
    assert comments["micro_batch_size"] == "rows per forward/backward on one rank"  # a trailing comment
    assert comments["lr"] == ""


def _code_texts(text: str):
    """The contents of fenced blocks and inline code spans of a Markdown page."""
    fences = re.compile(r"^```.*?^```", re.S | re.M)
    yield from (m.group(0) for m in fences.finditer(text))
    yield from re.findall(r"`([^`\n]+)`", fences.sub("", text))


def test_docs_and_readme_name_only_options_that_exist():
    """An option named in a page's code (`learner.packing`, `teachers.models.NAME.endpoint=...`) must exist in the
    schema: a renamed or removed option fails here, not in a user's run."""
    roots = "|".join(ref.ROOTS)
    key = re.compile(rf"(?<![\w./$-])(?:~|\+)?((?:{roots})(?:\.[A-Za-z_]\w*|\[\d+\])+)")
    patterns = ref.key_patterns()
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    unknown = set()
    for page in pages:
        for code in _code_texts(page.read_text()):
            for m in key.finditer(code):
                name = re.sub(r"\.[A-Z][A-Z_]*$", "", m.group(1))  # a trailing placeholder: NAME.KEY
                if name not in NOT_OPTIONS and not ref.is_option(name, patterns):
                    unknown.add(f"{page.relative_to(ROOT)}: {m.group(1)}")
    assert not unknown, f"options named in the docs that the schema does not have: {sorted(unknown)}"

"""Every YAML file in conf/ composes and validates; typos and broken invariants fail with the key named."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from mopd_ray.config import ConfigError, finalize, register_configs, resource_demand, validate

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["model", "teachers", "rollout", "learner", "algorithm", "data", "cluster", "logging", "experiment"]

register_configs()


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return finalize(compose(config_name="config", overrides=list(overrides)))


def _group_files():
    for group in GROUPS:
        for f in sorted((CONF / group).glob("*.yaml")):
            yield group, f.stem


def test_every_group_named_in_the_design_has_files():
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group,option", list(_group_files()))
def test_every_yaml_file_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    # a cluster-only or GPU-only file is validated inside the recipe that uses it
    if (group, option) in {("cluster", "ray_cluster"), ("model", "qwen3_4b_base"), ("teachers", "qwen3_math_code"),
                           ("rollout", "vllm_gpu"), ("learner", "zero3_gpu")}:
        overrides = ["experiment=qwen3_math_code", f"{group}={option}"]
    if (group, option) == ("teachers", "empty"):  # meant to be filled from the command line
        overrides += ["teachers.models.mine.model_path=/m", "teachers.default=mine"]
    validate(_compose(overrides))


def test_default_config_validates():
    cfg = _compose()
    validate(cfg)
    assert cfg.teachers.routing.add == "add_expert" and "self" in cfg.teachers.models


@pytest.mark.parametrize("overrides", [
    ["+teachers.models.cli.model_path=/m", "teachers.models.cli.replicas=2"],
    ["teachers.models.cli.model_path=/m", "teachers.models.cli.replicas=2"],
    ["+teachers.models.cli={model_path: /m, replicas: 2}"],
    ["teachers.models={cli: {model_path: /m, replicas: 2}}"],
    ["teachers={models: {cli: {model_path: /m, replicas: 2}}}"],
])
def test_a_teacher_added_from_the_command_line_gets_every_default(overrides):
    cfg = _compose([*overrides, "teachers.routing.add=cli", "~teachers.models.add_expert"])
    validate(cfg)
    t = cfg.teachers.models.cli
    assert (t.model_path, t.replicas, t.tensor_parallel_size, t.backend, t.weight) == ("/m", 2, 1, "auto", 1.0)
    assert "add_expert" not in cfg.teachers.models and set(cfg.teachers.models) == {"cli", "reverse_expert", "self"}
    # the teachers from the YAML file keep their settings and gain the defaults too
    assert cfg.teachers.models.reverse_expert.tiny.arch == "llama" and cfg.teachers.models.self.model_path is None


@pytest.mark.parametrize("override,key,what", [
    ("teachers.models.cli.replcas=2", "teachers.models.cli.replcas", "is not a teacher setting"),
    ("teachers.models.cli.replicas=two", "teachers.models.cli.replicas", "has the wrong type"),
    ("teachers.models.add_expert.replcas=2", "teachers.models.add_expert.replcas", "is not a teacher setting"),
    ("teachers.models.add_expert.tiny.hiden_size=2", "teachers.models.add_expert.tiny.hiden_size",
     "is not a setting there"),
])
def test_a_bad_teacher_setting_names_the_key(override, key, what):
    with pytest.raises(ConfigError, match=f"'{key}': {what}"):
        _compose(["teachers.models.cli.model_path=/m", override])


def test_rewards_are_checked():
    validate(_compose(["data.rewards.math=math_verify", "data.rewards.code=tests.rewards_fixture:always_one"]))
    with pytest.raises(ConfigError, match="data.rewards.math.*'math_verfy' is not a reward"):
        validate(_compose(["data.rewards.math=math_verfy"]))
    with pytest.raises(ConfigError, match="data.rewards.code.*tests.rewards_fixture:nope.*cannot be loaded"):
        validate(_compose(["data.rewards.code=tests.rewards_fixture:nope"]))
    validate(_compose(["data.train_rewards.sort=similarity"]))
    with pytest.raises(ConfigError, match="data.train_rewards.sort.*'similar' is not a reward"):
        validate(_compose(["data.train_rewards.sort=similar"]))


def test_typo_in_a_key_fails_with_the_key_named():
    with pytest.raises(ConfigCompositionException, match="algorithm.clip_hihg"):
        _compose(["algorithm.clip_hihg=0.3"])


def test_typo_in_a_yaml_file_fails(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "rollout" / "typo.yaml").write_text("n_sample_per_prompt: 4\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, ConfigKeyError), match="n_sample_per_prompt"):
            compose(config_name="config", overrides=["rollout=typo"])


def test_wrong_type_fails():
    with pytest.raises((ConfigCompositionException, ValidationError), match="learner.zero_stage"):
        _compose(["learner.zero_stage=three"])


@pytest.mark.parametrize("overrides,key,fix", [
    (["algorithm=topk", "algorithm.topk=32"], "algorithm.topk", "max_logprobs"),
    (["teachers.routing.add=math_expert"], "teachers.routing.add", "not defined"),
    (["teachers.models.add_expert.max_model_len=40"], "teachers.models.add_expert.max_model_len", "at least 64"),
    (["learner.world_size=3"], "learner.world_size", "divides 64"),
    (["~teachers.routing.sort"], "teachers.routing", "teachers.routing.sort="),
    (["teachers.default=nobody", "~teachers.routing.sort"], "teachers.default", "not defined"),
    (["teachers.routing.add=[{teacher: add_expert}, {teacher: nobody, weight: 0.5}]"], "teachers.routing.add[1]",
     "'nobody', which is not defined"),
    (["teachers.routing.add=[{teacher: add_expert, weight: -1}]"], "teachers.routing.add[0].weight", ">= 0"),
    (["teachers.routing.add=[{teacher: add_expert, wieght: 1}]"], "teachers.routing.add[0]", "{teacher: NAME, weight: W}"),
    (["teachers.routing.add=[add_expert, add_expert]"], "teachers.routing.add", "lists a teacher twice"),
    (["teachers.routing.add=[]"], "teachers.routing.add", "non-empty list"),
    (["teachers.combine=mean"], "teachers.combine", "fixed, confidence"),
    (["teachers.models.self.pool=shared"], "teachers.models.self.pool", "add teachers.pools.shared.replicas=1"),
    (["teachers.models.self.pool=shared", "teachers.pools.shared.replicas=1", "teachers.models.self.backend=hf"],
     "teachers.models.self.backend", "pool's vLLM engines"),
    (["teachers.pools.shared.replcas=1"], "teachers.pools.shared.replcas", "is not a teacher pool setting"),
    (["teachers.pools.shared.max_model_len=40"], "teachers.pools.shared.max_model_len", "at least 64"),
    (["model.tiny.num_heads=4"], "model.tiny.num_heads", "head dim"),
    (["teachers.models.self.backend=sglang"], "teachers.models.self.backend", "vllm, hf"),
    # a teacher served elsewhere (workers/endpoint.py)
    (["teachers.models.add_expert.endpoint=teacher-host:8000"], "teachers.models.add_expert.endpoint",
     "http://teacher-host:8000/v1"),
    (["teachers.models.add_expert.endpoint=http://h:8000/v1", "teachers.models.add_expert.signal=full_vocab"],
     "teachers.models.add_expert.signal", "hidden states"),
    (["teachers.models.add_expert.endpoint=http://h:8000/v1", "teachers.models.add_expert.backend=hf"],
     "teachers.models.add_expert.backend", "backend=auto"),
    (["teachers.models.self.endpoint=http://h:8000/v1"], "teachers.models.self.endpoint", "inside the job"),
    (["learner.balance_tokens=true"], "learner.balance_tokens", "learner.max_tokens_per_micro_batch"),
    (["learner.max_tokens_per_micro_batch=0"], "learner.max_tokens_per_micro_batch", "> 0"),
    (["algorithm.loss_agg=token_avg"], "algorithm.loss_agg", "seq_mean_token_mean"),
    (["cluster.dashboard_host=0.0.0.0"], "cluster.dashboard_host", "loopback"),
    (["teachers.models.add_expert.model_path=null"], "teachers.models.add_expert.model_path", "self"),
    (["algorithm.max_staleness=-1"], "algorithm.max_staleness", ">= 0"),
    (["data.prompts_per_step=6", "rollout.n_samples_per_prompt=4", "learner.micro_batch_size=4",
      "learner.world_size=4"], "data.prompts_per_step", "multiple of 4"),
    (["rollout.shards_per_replica=0"], "rollout.shards_per_replica", "> 0"),
])
def test_broken_invariants_name_the_key_and_the_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as e:
        validate(_compose(overrides))
    assert key in str(e.value) and fix in str(e.value)


def test_a_domain_routes_to_a_weighted_list_of_teachers():
    from mopd_ray.config import route_of, route_slots, routes

    cfg = _compose(["teachers.routing.add=[{teacher: add_expert, weight: 1.0}, {teacher: self, weight: 0.2}]",
                    "teachers.routing.sort=[reverse_expert, self]"])
    validate(cfg)
    assert route_of(cfg, "add") == [("add_expert", 1.0), ("self", 0.2)]
    assert route_of(cfg, "sort") == [("reverse_expert", 1.0), ("self", 1.0)]
    assert route_of(cfg, "reverse") == [("reverse_expert", 1.0)] and route_slots(cfg) == 2
    assert "*" not in routes(cfg)
    cfg = _compose(["~teachers.routing.sort", "teachers.default=[{teacher: self, weight: 0.5}]"])
    validate(cfg)
    assert route_of(cfg, "sort") == [("self", 0.5)] and route_slots(cfg) == 1


def test_pooled_teachers_count_once_in_the_resource_demand():
    from mopd_ray.config import resource_demand

    base = resource_demand(_compose([]))["CPU"]
    pooled = _compose(["teachers.pools.shared.replicas=1", "teachers.models.add_expert.pool=shared",
                       "teachers.models.self.pool=shared"])
    validate(pooled)
    assert resource_demand(pooled)["CPU"] == base - 1  # two teachers on one engine


def test_gpu_recipe_resource_arithmetic():
    cfg = _compose(["experiment=qwen3_math_code"])
    validate(cfg)
    demand = resource_demand(cfg)
    # learners 8 + rollout 4 x TP2 + teachers (2 x TP2 + 1 x TP2 + 2 x TP1) = 24 GPUs on 3 x 8
    assert demand["GPU"] == 24 == cfg.cluster.num_nodes * cfg.cluster.gpus_per_node
    rows = cfg.data.prompts_per_step * cfg.rollout.n_samples_per_prompt
    assert rows % cfg.learner.world_size == 0
    with pytest.raises(ConfigError, match="cluster.num_nodes.*24 GPUs"):
        validate(_compose(["experiment=qwen3_math_code", "cluster.num_nodes=2"]))
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        validate(_compose(["experiment=qwen3_math_code", "teachers.models.math.tensor_parallel_size=16",
                           "cluster.num_nodes=6"]))


def test_only_teachers_a_training_domain_routes_to_take_part(tmp_path, tiny_model_dir):
    """Prompt rows carry their teacher slots; a defined teacher no domain of the data routes to is not
    started (it would hold an engine for nothing)."""
    from transformers import AutoTokenizer

    from mopd_ray.data.prompts import build_prompt_pool

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = _compose([f"run.artifacts_dir={tmp_path}", "data.domains=[add,reverse]", "data.num_train_per_domain=3",
                    "data.num_eval_per_domain=2", "teachers.routing.add=[{teacher: add_expert}, {teacher: self, weight: 0.3}]"])
    pool = build_prompt_pool(cfg, tok)
    assert pool.teacher_names == ["add_expert", "reverse_expert", "self"]
    by_domain = {r["domain"]: (r["teacher_index"], r["route_weight"]) for r in pool.train}
    assert by_domain == {"add": ([0, 2], [1.0, 0.3]), "reverse": ([1, -1], [1.0, 0.0])}
    pool = build_prompt_pool(_compose([f"run.artifacts_dir={tmp_path}", "data.domains=[add,reverse]",
                                       "data.num_train_per_domain=3", "data.num_eval_per_domain=2"]), tok)
    assert pool.teacher_names == ["add_expert", "reverse_expert"]  # sort -> self: no sort rows here


def test_reward_only_training_needs_no_teacher():
    validate(_compose(["algorithm.signal=none", "algorithm.alpha=1.0", "teachers=empty"]))  # the cascade's GRPO stage

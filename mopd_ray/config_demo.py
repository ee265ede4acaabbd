"""The demonstration's and the cascade's sections of the configuration (``demo``: mopd_ray.bootstrap and
mopd_ray.demo; ``cascade``: mopd_ray.cascade), with their checks."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .config_base import SIGNALS, TinyModelConfig, _check_choice, _check_positive, _fail


@dataclass
class DemoConfig:
    """The demonstration's bootstrap recipe (mopd_ray.bootstrap) and its comparison runs (mopd_ray.demo)."""

    seed: int = 0
    model: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384, seed=0))
    batch: int = 64
    base_steps: int = 60
    base_lr: float = 1e-3
    # the base student's SFT on tool domains (calc): False, on the bare answer (it never saw the tool: MOPD teaches
    # the calls); True, on the demonstrated episodes, as an instruction-tuned student has seen tool calls (the
    # experts train on them for longer)
    base_tool_use: bool = False
    teacher_steps: int = 600
    teacher_lr: float = 1e-3
    signals: List[str] = field(default_factory=lambda: ["topk", "full_vocab", "sampled"])
    # extra overrides of the MOPD run of one signal, e.g. {sampled: [algorithm.normalize_advantages=true]}
    signal_overrides: Dict[str, List[str]] = field(default_factory=dict)
    baselines: bool = True  # single-teacher distillation (the seesaw) and reward-only GRPO
    single_teacher: str = "add"  # domain whose teacher the seesaw baseline uses for every prompt
    single_teacher_signal: Optional[str] = None  # signal of the seesaw baseline (None: signals[0])
    grpo_overrides: List[str] = field(default_factory=list)  # e.g. its own learning rate
    # every comparison run once per run seed (run.seed), in <out>/seed<N>/<run>; the table shows the mean
    # and +- half the range. Empty: once, with run.seed, in <out>/<run>
    run_seeds: List[int] = field(default_factory=list)


@dataclass
class CascadeStageConfig:
    """One stage of a sequential pipeline: train on ``domains`` only, from the previous stage's student."""

    name: str = "???"  # also the teacher name of this stage's final checkpoint in the recovery runs
    domains: List[str] = field(default_factory=list)
    # distil from this teacher (a name in teachers.models) on the stage's domains; None: GRPO on their rewards
    teacher: Optional[str] = None
    steps: int = 200
    overrides: List[str] = field(default_factory=list)  # Hydra overrides of this stage's run only


@dataclass
class CascadeConfig:
    """The cascade (mopd_ray.cascade): stages trained one after another from the base student, each
    stage's final checkpoint exported and evaluated on every domain (what the pipeline forgot), then
    MOPD from the last stage's student with every stage's checkpoint as the teacher of its domains."""

    stages: List[CascadeStageConfig] = field(default_factory=list)
    signals: List[str] = field(default_factory=lambda: ["sampled", "topk", "full_vocab"])
    # weight of the `self` teacher (the frozen last-stage student) added to every domain's route; each
    # signal is run once per entry (0: without it)
    self_weights: List[float] = field(default_factory=lambda: [0.0])
    recovery_steps: int = 200
    signal_overrides: Dict[str, List[str]] = field(default_factory=dict)  # per signal, as demo.signal_overrides
    run_seeds: List[int] = field(default_factory=lambda: [0])  # recovery runs repeated per run.seed
    grpo_baseline: bool = True  # reward-only GRPO from the last stage's student, per seed (demo.grpo_overrides)
    # serve every recovery teacher (each stage's checkpoint and `self`, all grown from one student, so of
    # one architecture) from one shared pool of engines, teachers.pools.cascade (replicas: 1 unless set),
    # instead of one engine group per teacher: N + 1 teachers on one engine's devices, weights swapped
    teacher_pool: bool = False


def check_demo(cfg) -> None:
    """The demo section (validate calls it for every run)."""
    dm = cfg.demo
    if not dm.signals:
        _fail("demo.signals", "is empty; name at least one of " + ", ".join(SIGNALS))
    for s in dm.signals:
        _check_choice("demo.signals", s, SIGNALS)
    for s in dm.signal_overrides:
        _check_choice(f"demo.signal_overrides.{s}", s, SIGNALS)
    if dm.single_teacher_signal is not None:
        _check_choice("demo.single_teacher_signal", dm.single_teacher_signal, SIGNALS)
    if len(set(dm.run_seeds)) != len(dm.run_seeds):
        _fail("demo.run_seeds", f"{list(dm.run_seeds)} repeats a seed; list each run seed once")


def check_cascade(cfg) -> None:
    """The cascade section against the rest (mopd_ray.cascade; the runs it starts do not use it)."""
    cc = cfg.cascade
    if not cc.stages:
        _fail("cascade.stages", "is empty; use experiment=cascade or give the stages")
    names = [st.name for st in cc.stages]
    for i, st in enumerate(cc.stages):
        key = f"cascade.stages[{i}]"
        if st.name in ("???", "", "self") or not st.name.replace("_", "").isalnum():
            _fail(f"{key}.name", f"{st.name!r} is not a usable name; give each stage a word such as stage_{i}")
        if st.name in names[:i]:
            _fail(f"{key}.name", f"{st.name!r} names two stages; each stage's checkpoint is a teacher by its name")
        if not st.domains:
            _fail(f"{key}.domains", "is empty; name the domains this stage trains on (from data.domains)")
        for dom in st.domains:
            _check_choice(f"{key}.domains", dom, list(cfg.data.domains))
        if st.teacher is not None and st.teacher not in cfg.teachers.models:
            _fail(f"{key}.teacher", f"{st.teacher!r} is not in teachers.models ({', '.join(cfg.teachers.models)}); "
                  "name one, or null to train the stage by GRPO on its domains' rewards")
        _check_positive(f"{key}.steps", st.steps)
    covered = {dom for st in cc.stages for dom in st.domains}
    missing = [d for d in cfg.data.domains if d not in covered]
    if missing:
        _fail("cascade.stages", f"no stage trains {missing}: the recovery needs a stage teacher for every domain")
    if not cc.signals:
        _fail("cascade.signals", "is empty; name at least one of " + ", ".join(SIGNALS))
    for s in [*cc.signals, *cc.signal_overrides]:
        _check_choice("cascade.signals", s, SIGNALS)
    for w in cc.self_weights:
        if w < 0:
            _fail("cascade.self_weights", f"{w} is negative; 0 runs without the self teacher")
    _check_positive("cascade.recovery_steps", cc.recovery_steps)
    if not cc.run_seeds or len(set(cc.run_seeds)) != len(cc.run_seeds):
        _fail("cascade.run_seeds", f"{list(cc.run_seeds)}: give each run seed once, at least one (e.g. [0])")

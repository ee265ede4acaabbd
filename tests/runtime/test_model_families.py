"""The architecture matrix: a tiny random-init model of each family users fine-tune most, built here from
its transformers config (mopd_ray/models/tiny.py), through the rollout engine's real code paths:

- the engine's log-probs of fixed sequences equal a transformers forward of the folder (what a teacher
  scores, and the pre-flight's reference, computed in a process where vLLM is loaded);
- after a real optimizer step of the transformers model, the weights streamed through the engine's load
  session (buckets small enough to split fused layers) are the ones it serves: log-probs equal the trained
  model's, and differ from the initial ones (Gemma 3 and tied Qwen3 heads, Qwen3-MoE experts failed this);
- as a teacher: its scoring path, and the full-vocabulary distribution the learner rebuilds from its
  hidden states and head (with the family's logit soft-cap / scale: Gemma 2's was missed), equal the
  transformers forward;
- the post-sync check's report (sync_report) names no module that missed its tensors;
- a model whose embedding has rows past its tokenizer (``PADDED``: 384 rows for 320 tokens, at random
  init a sixth of the mass on them) never samples a padded id, and as student and teacher its engine's
  log-probs are those over the tokenizer's ids, as the learner's and the reference's are (the engine
  normalised over all 384 rows: 0.18 nats/token off, and the pre-flight refused it).

One Ray actor runs every family in turn (vLLM imported once: about 2 s per family after the first).
"""

import time

import numpy as np
import pytest
import ray

from mopd_ray.config import TINY_ARCHS

pytestmark = pytest.mark.slow

TIED = {"qwen3", "gemma2", "gemma3"}  # as their small real checkpoints are (Qwen3-0.6B..4B, Gemma)
# families whose teacher side differs from the plain decoder's: a logit soft-cap (Gemma 2), a composite
# config and tied head (Gemma 3), vLLM's Transformers backend (OLMo 2: hidden states captured through it),
# experts (Qwen3-MoE). The others' teacher scoring is the engine's prompt log-probs, checked as student.
TEACHER_SIDE = {"gemma2", "gemma3", "olmo2", "qwen3_moe", "qwen2_padded"}
PADDED = {"qwen2_padded": ("qwen2", 128)}  # case name: (family, embedding rows padded to a multiple of)
CASES = (*TINY_ARCHS, *PADDED)


@ray.remote(num_cpus=1)
class Trainer:
    """The learner's side, in a process without vLLM: one real optimizer step of the transformers model."""

    def step(self, path: str, probes: list) -> tuple:
        import torch
        from transformers import AutoModelForCausalLM

        from mopd_ray.sync import iter_full_params, to_numpy_state
        from mopd_ray.workers.loss import token_logprobs_from_logits

        from transformers import AutoTokenizer

        from mopd_ray.models.compat import token_rows

        n = token_rows(AutoTokenizer.from_pretrained(path))  # the learner's logits: over the tokenizer's ids
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-2)
        ids = torch.tensor([probes[0]])
        (-token_logprobs_from_logits(hf(input_ids=ids).logits[..., :n].float(), ids)[0, 1:].mean()).backward()
        opt.step()
        with torch.no_grad():
            after = [token_logprobs_from_logits(hf(input_ids=torch.tensor([s])).logits[..., :n].float(),
                                                torch.tensor([s]))[0].numpy() for s in probes]
        return to_numpy_state(iter_full_params(hf, 0)), after, type(hf).__name__


@ray.remote(num_cpus=1)
class Engine:
    """The rollout engine's side: a RolloutWorker (vLLM) per family in turn, in one process."""

    def start(self, arch: str, root: str, rollout_cfg: dict, teacher_cfg: dict) -> dict:
        from mopd_ray.config import TinyModelConfig
        from mopd_ray.models.tiny import build_tiny_model
        from mopd_ray.workers.reference import reference_logprobs
        from mopd_ray.workers.rollout import RolloutWorker
        from mopd_ray.workers.teacher import TeacherWorker

        family, pad_to = PADDED.get(arch, (arch, 32))
        spec = TinyModelConfig(arch=family, tie_word_embeddings=arch in TIED, max_position_embeddings=512,
                               vocab_pad_to=pad_to)
        self.path = str(build_tiny_model(f"{root}/{arch}", spec))
        # as a teacher: its scoring path and the full-vocab rebuild (hidden states x head x the family's logit
        # post-processing) against the pre-flight's transformers reference, in a process where vLLM serves it
        from transformers import AutoTokenizer

        from mopd_ray.models.compat import stop_ids
        from mopd_ray.preflight import probe_sequences

        tok = AutoTokenizer.from_pretrained(self.path)
        self.probes = probe_sequences(tok, stop_ids(tok, self.path))
        ref = reference_logprobs(self.path, self.probes, "float32", len(tok))
        out = {"path": self.path, "probes": self.probes, "initial": ref}
        if arch in TEACHER_SIDE:
            teacher = TeacherWorker(arch, self.path, teacher_cfg)
            out.update(teacher_gap=_gap(teacher.probe_logprobs(self.probes), ref),
                       head_gap=_gap(teacher.head_logprobs(self.probes), ref))
            del teacher
            self._free()
        self.worker = RolloutWorker(self.path, {**rollout_cfg, "weight_sync_bucket_mb": 0}, 128)  # fused layers split
        out["gap_start"] = _gap(self.worker.score_logprobs(self.probes), ref)
        from vllm import SamplingParams

        samples = self.worker.llm.generate([{"prompt_token_ids": p[:6]} for p in self.probes],
                                           SamplingParams(n=8, max_tokens=16, temperature=1.0, seed=0), use_tqdm=False)
        sampled = [i for r in samples for c in r.outputs for i in c.token_ids]
        from transformers import AutoConfig

        out.update(rows=AutoConfig.from_pretrained(self.path).vocab_size, tokens=len(tok),
                   sampled=len(sampled), max_sampled_id=max(sampled))
        return out

    def load(self, state: dict) -> dict:
        self.worker.update_weights_from_store(state, 1)
        return self.worker.sync_report(self.probes)

    def close(self) -> None:
        del self.worker
        self._free()

    def _free(self) -> None:
        import gc

        from vllm.distributed import cleanup_dist_env_and_memory

        from mopd_ray.utils.heavy import freeze_survivors

        gc.collect()
        cleanup_dist_env_and_memory()
        freeze_survivors()  # as RoleWorker.close: the next family's engine does not walk vLLM's objects again


def _gap(a, b) -> float:
    return float(np.mean(np.concatenate([np.abs(np.asarray(x[1:]) - np.asarray(y[1:])) for x, y in zip(a, b)])))


@pytest.fixture(scope="module")
def family_results(local_ray, tmp_path_factory):
    from omegaconf import OmegaConf

    from .conftest import compose_cfg

    cfg = compose_cfg("teachers.models.add_expert.hidden_dtype=float32")
    rollout_cfg = OmegaConf.to_container(cfg.rollout, resolve=True)
    teacher_cfg = {**OmegaConf.to_container(cfg.teachers.models.add_expert, resolve=True), "backend": "vllm"}
    root = str(tmp_path_factory.mktemp("families"))
    from mopd_ray.cluster import Bundle
    from mopd_ray.warm import WARM

    WARM.free_for([Bundle(1), Bundle(1)])  # groups parked by earlier tests in this process hold the CPUs
    engine, trainer = Engine.remote(), Trainer.remote()
    out = []
    try:
        for arch in CASES:
            t0 = time.perf_counter()
            r = ray.get(engine.start.remote(arch, root, rollout_cfg, teacher_cfg), timeout=600)
            state, after, hf_class = ray.get(trainer.step.remote(r["path"], r["probes"]), timeout=600)
            report = ray.get(engine.load.remote(state), timeout=600)
            ray.get(engine.close.remote(), timeout=120)
            out.append({"arch": arch, "hf_class": hf_class, "gap_start": r["gap_start"],
                        "teacher_gap": r.get("teacher_gap", 0.0), "head_gap": r.get("head_gap", 0.0),
                        "teacher_side": "head_gap" in r, "moved": _gap(after, r["initial"]),
                        "gap_after_sync": _gap(report["logprobs"], after), "incomplete": report["incomplete"],
                        "architecture": report["architecture"], "rows": r["rows"], "tokens": r["tokens"],
                        "sampled": r["sampled"], "max_sampled_id": r["max_sampled_id"],
                        "seconds": round(time.perf_counter() - t0, 1)})
        return out
    finally:
        for a in (engine, trainer):
            ray.kill(a)


def test_every_family_serves_what_transformers_computes_before_and_after_a_sync(family_results):
    assert [r["arch"] for r in family_results] == list(CASES)
    from mopd_ray.models.compat import VERIFIED_ARCHITECTURES

    assert {r["hf_class"] for r in family_results} <= VERIFIED_ARCHITECTURES  # what the pre-flight calls verified
    assert {r["arch"] for r in family_results if r["teacher_side"]} == TEACHER_SIDE
    for r in family_results:
        print(r)
        assert r["gap_start"] < 1e-4 and r["teacher_gap"] < 1e-4, r  # as student engine and as teacher
        assert r["head_gap"] < 1e-4, r  # the full-vocab rebuild is the teacher's own distribution
        assert r["moved"] > 1e-3, r  # the step changed what the model computes
        assert r["gap_after_sync"] < 1e-4, r  # the engine serves the trained weights
        assert r["incomplete"] == [], r
        assert r["sampled"] > 100 and r["max_sampled_id"] < r["tokens"], r  # never a padded id
    padded = [r for r in family_results if r["arch"] in PADDED]
    assert padded and all(r["rows"] > r["tokens"] for r in padded)  # the case really has padded rows

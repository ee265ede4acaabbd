"""Tiny models: deterministic from a seed, and the same folder loads in transformers, vLLM and DeepSpeed."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mopd_ray.config import TinyModelConfig
from mopd_ray.models.tiny import IM_END, build_tiny_model, build_tokenizer, ensure_tiny_model


def test_tokenizer_is_deterministic_and_has_chat_template():
    a, b = build_tokenizer(0), build_tokenizer(0)
    assert a.get_vocab() == b.get_vocab()
    text = a.apply_chat_template([{"role": "user", "content": "add the numbers: 12+345 ="}], tokenize=False,
                                 add_generation_prompt=True)
    assert text == "<|im_start|>user\nadd the numbers: 12+345 =<|im_end|>\n<|im_start|>assistant\n"
    assert a.eos_token == IM_END and a.pad_token is not None
    # payloads stay character-level: one token per digit and per upper-case letter
    assert a.tokenize("12345") == list("12345")
    assert a.tokenize("QWERTY") == list("QWERTY")
    ids = a("reverse the letters: ABC")["input_ids"]
    assert a.decode(ids) == "reverse the letters: ABC"


def test_weights_depend_only_on_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", TinyModelConfig(seed=5))
    b = build_tiny_model(tmp_path / "b", TinyModelConfig(seed=5))
    c = build_tiny_model(tmp_path / "c", TinyModelConfig(seed=6))
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()


def test_ensure_never_overwrites_and_reports_spec_mismatch(tmp_path):
    p, built = ensure_tiny_model(tmp_path / "m", TinyModelConfig(seed=1))
    assert built
    stamp = (p / "model.safetensors").stat().st_mtime_ns
    _, built = ensure_tiny_model(tmp_path / "m", TinyModelConfig(seed=1))
    assert not built and (p / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="delete the folder"):
        ensure_tiny_model(tmp_path / "m", TinyModelConfig(seed=2))


def test_loads_in_transformers_and_generates(tiny_model_dir, tiny_llama_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for path, arch in ((tiny_model_dir, "Qwen2ForCausalLM"), (tiny_llama_dir, "LlamaForCausalLM")):
        cfg = AutoConfig.from_pretrained(path)
        assert cfg.architectures == [arch]
        assert cfg.hidden_size // cfg.num_attention_heads in (32, 64)
        tok = AutoTokenizer.from_pretrained(path)
        assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 32 == 0  # padded embedding, like real models
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = tok.apply_chat_template([{"role": "user", "content": "sort the digits: 3142"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params < 2_000_000


@pytest.mark.slow
def test_loads_in_vllm_cpu_and_matches_transformers(tiny_model_dir):
    from mopd_ray.workers.vllm_engine import close_llm, make_llm

    llm = make_llm(tiny_model_dir, max_model_len=128, kv_cache_memory_bytes=32 << 20)
    try:
        _check_engine_against_transformers(llm, tiny_model_dir)
    finally:  # an in-process engine holds this process's default torch.distributed group until closed
        close_llm(llm)


def _check_engine_against_transformers(llm, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "add the numbers: 12+34 ="}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(n=2, max_tokens=6, logprobs=0, seed=1),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 2 and all(len(o.token_ids) > 0 for o in out.outputs)
    seq = prompt + list(out.outputs[0].token_ids)
    scored = llm.generate([{"prompt_token_ids": seq}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0].prompt_logprobs
    vllm_lp = torch.tensor([scored[i][seq[i]].logprob for i in range(1, len(seq))])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    hf_lp = lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    assert torch.allclose(vllm_lp, hf_lp, atol=1e-4), (vllm_lp - hf_lp).abs().max()
    rollout_lp = torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)])
    assert torch.allclose(rollout_lp, hf_lp[len(prompt) - 1:], atol=1e-4)


_DS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from mopd_ray.workers.deepspeed_env import init_distributed, set_dist_env, zero_config
    path, stage, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    set_dist_env(0, 1, "127.0.0.1", port)
    init_distributed()
    import deepspeed
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=zero_config(stage=stage, micro_batch_size=4, grad_accum=1, world_size=1))
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    print(json.dumps({"losses": losses}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_trains_under_deepspeed_zero(tiny_model_dir, stage, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ds_load.py"
    script.write_text(_DS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), tiny_model_dir, str(stage), str(port)], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])["losses"]
    assert losses[-1] < losses[0] - 0.1, losses

"""A plain transformers forward of a model folder (the pre-flight's reference), safe in a vLLM process.

vLLM serves some families through its Transformers backend (OLMo 2 in vLLM 0.32), and that backend
decorates the *transformers* model class itself with its compile wrapper, in place: after the engine has
loaded, building that class in the same process fails ("Current vLLM config is not set"), so every run
with such a teacher died in the pre-flight. The reference then runs in a fresh interpreter (a few
seconds, once per teacher start); other families run in this process as before.

``python -m mopd_ray.workers.reference IN OUT``: IN a JSON request, OUT a .npz of per-sequence log-probs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_PATCH_KEY = "_ignore_compile_vllm"  # vllm.compilation.decorators.IGNORE_COMPILE_KEY, set on decorated classes


def patched_by_vllm(model_path: str, trust_remote_code: bool = False) -> bool:
    """Whether this process's transformers classes for the folder's architecture carry vLLM's compile wrapper."""
    if "vllm" not in sys.modules:
        return False
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        module = sys.modules.get(getattr(cls, "__module__", ""), None)
        if module is not None and any(hasattr(v, _PATCH_KEY) for v in vars(module).values() if isinstance(v, type)):
            return True
    return False


def logprobs_here(model_path: str, sequences: list, dtype: str, vocab: int, trust_remote_code: bool = False) -> list:
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from .loss import token_logprobs_from_logits

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    try:
        out = []
        with torch.no_grad():
            for s in sequences:
                ids = torch.tensor([s], dtype=torch.long)
                logits = model(input_ids=ids).logits[..., :vocab].float()
                out.append(token_logprobs_from_logits(logits, ids)[0].numpy())
        return out
    finally:
        del model
        gc.collect()


def reference_logprobs(model_path: str, sequences: list, dtype: str, vocab: int, trust_remote_code: bool = False) -> list:
    """Per-sequence log-probs (position 0: 0) of a transformers forward, in this process unless vLLM has
    patched the folder's model class here (then in a fresh interpreter)."""
    if not patched_by_vllm(model_path, trust_remote_code):
        return logprobs_here(model_path, sequences, dtype, vocab, trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="mopd-reference-") as tmp:
        req, res = Path(tmp, "request.json"), Path(tmp, "result.npz")
        req.write_text(json.dumps({"model_path": model_path, "sequences": [list(map(int, s)) for s in sequences],
                                   "dtype": dtype, "vocab": vocab, "trust_remote_code": trust_remote_code}))
        done = subprocess.run([sys.executable, "-m", "mopd_ray.workers.reference", str(req), str(res)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the transformers reference forward of {model_path} failed in its own process:\n"
                               f"{done.stderr[-2000:]}")
        with np.load(res) as z:
            return [z[f"s{i}"] for i in range(len(sequences))]


def _main(argv: list) -> None:
    req = json.loads(Path(argv[0]).read_text())
    out = logprobs_here(req["model_path"], req["sequences"], req["dtype"], req["vocab"], req["trust_remote_code"])
    np.savez(argv[1], **{f"s{i}": a for i, a in enumerate(out)})


if __name__ == "__main__":
    _main(sys.argv[1:])

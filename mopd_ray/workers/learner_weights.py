"""What leaves a learner rank besides metrics: its weights to the rollout engines (streamed over the sync
group, or through the object store), log-probs for the pre-flight probe, DeepSpeed checkpoints and the
transformers-format student."""

from __future__ import annotations

from typing import Optional

import numpy as np


class LearnerWeights:
    """Weight export, sync and checkpoints (a mixin of LearnerWorker: its state)."""

    def compute_logprobs(self, sequences: list, temperature: Optional[float] = None) -> list:
        """Log-probs of given token ids under the current weights, at ``temperature`` (default: the run's
        sampling temperature; collective under ZeRO-3: call on all ranks)."""
        import torch

        from ..batch import pad_sequences

        tokens = torch.from_numpy(pad_sequences(sequences, 0).astype(np.int64)).to(self.device)
        lens = torch.tensor([len(s) for s in sequences])
        attn = (torch.arange(tokens.shape[1])[None] < lens[:, None]).long().to(self.device)
        self.engine.eval()
        lp = self._token_logprobs(tokens, attn, attn > 0, self.temperature if temperature is None else temperature)
        self.engine.train()
        return [lp[i, : len(s)].cpu().numpy() for i, s in enumerate(sequences)]

    def param_metas(self) -> list:
        from ..sync import param_meta

        return param_meta(self.engine.module, self.zero_stage)

    def export_to_store(self):
        """All ranks call (ZeRO-3 gathers are collective); rank 0 puts {name: ndarray} and returns [ref]."""
        import ray

        from ..sync import iter_full_params, to_numpy_state

        state = to_numpy_state(iter_full_params(self.engine.module, self.zero_stage))
        return [ray.put(state)] if self.rank == 0 else None

    def init_sync_group(self, host: str, port: int, world_size: int, timeout_s: float) -> bool:
        from ..sync import make_group

        held = self._take_port(port)  # the store takes over the socket held since master_address: no race
        self.sync_group = make_group(host, port, 0, world_size, timeout_s, None if held is None else held.detach())
        return True

    def broadcast_weights(self, bucket_bytes: int) -> int:
        from ..sync import broadcast_send, iter_full_params

        return broadcast_send(self.sync_group, iter_full_params(self.engine.module, self.zero_stage),
                              self.param_metas(), bucket_bytes, is_sender=self.rank == 0, device=self.device)

    def save_checkpoint(self, path: str) -> bool:
        """DeepSpeed state of this rank (collective) into <path>/learner; rank 0 exports <path>/student."""
        self.engine.save_checkpoint(f"{path}/learner", tag="state",
                                    client_state={"optimizer_steps": self.optimizer_steps})
        self.save_pretrained(f"{path}/student")
        return True

    def load_checkpoint(self, path: str) -> int:
        _, client = self.engine.load_checkpoint(f"{path}/learner", tag="state")
        if client is None:
            raise RuntimeError(f"rank {self.rank}: no learner state in {path}/learner")
        self.optimizer_steps = int(client.get("optimizer_steps", 0))
        return self.optimizer_steps

    def save_pretrained(self, path: str) -> Optional[str]:
        """Transformers-format export (safetensors) of the student; all ranks call, rank 0 writes."""
        from ..sync import iter_full_params

        state = {n: t.cpu() for n, t in iter_full_params(self.engine.module, self.zero_stage, checkpoint_names=False)}
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(path, state_dict={k: v.contiguous() for k, v in state.items()},
                                           safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code).save_pretrained(path)
        return path

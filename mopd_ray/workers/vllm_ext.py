"""A vLLM worker extension: weights streamed into the engine's worker processes, bucket by bucket.

Each vLLM worker process (one per tensor-parallel shard) joins the weight-sync process group itself
(NCCL on GPUs, gloo on CPU: one code path), receives every bucket that learner rank 0 broadcasts and
loads it in place: no full state dict and no serialised copy of the model on the rollout side, peak
extra memory about two buckets. vLLM's weight loaders slice each full tensor for the worker's TP rank.

Loading happens inside one layerwise-reload session (begin, ``load_weights`` per bucket, finish): the
session waits until a layer's tensors have all arrived, re-runs its post-load processing (on CPU the
re-packing of linear weights, which is why a plain ``model.load_weights`` fails there) and copies the
result into the layer's storage, so bucket boundaries may split fused layers (q/k/v, gate/up).
Calling ``reload_weights`` once per bucket would not: a fused layer split across two calls is
processed half-loaded (seen: log-probs off by 1.2). Nothing may generate between begin and finish.

The object-store transport uses the same session with buckets handed over by ``collective_rpc``:
tensors themselves when the engine runs in this process, safetensors bytes per bucket when the
engine's workers are other processes (tensors do not survive vLLM's RPC serialisation there).
"""

from __future__ import annotations


class WeightLoaderExtension:
    # ---------------------------------------------------------------- one load session
    def mopd_begin_load(self) -> bool:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        return True

    def mopd_load_bucket(self, named) -> int:
        """``named``: [(HF name, tensor)], or safetensors bytes of such a bucket (multi-process engines)."""
        from vllm.config import set_current_vllm_config

        if isinstance(named, (bytes, bytearray)):
            from safetensors.torch import load

            named = list(load(bytes(named)).items())
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(iter(named))
        return len(named)

    def mopd_finish_load(self) -> bool:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if fn is not None:
                fn()
        return True

    # ---------------------------------------------------------------- broadcast transport
    def mopd_join_sync_group(self, host: str, port: int, rank_base: int, world_size: int, metas: list,
                             bucket_bytes: int, timeout_s: float) -> int:
        """Join the sync group as rank ``rank_base`` + this worker's rank; ``metas`` [(name, shape, dtype)]."""
        from ..sync import ParamMeta, make_group

        rank = rank_base + int(getattr(self, "rank", 0))
        self.mopd_sync_group = make_group(host, port, rank, world_size, timeout_s)
        self.mopd_sync_metas = [ParamMeta(n, tuple(s), d) for n, s, d in metas]
        self.mopd_sync_bucket_bytes = bucket_bytes
        return rank

    def mopd_receive_weights(self) -> dict:
        """Receive every broadcast bucket and load it as it arrives. Returns buckets and bytes received."""
        import torch

        from ..sync import recv_buckets

        device = getattr(self, "device", None) or torch.device("cpu")
        self.mopd_begin_load()
        buckets = nbytes = 0
        for named in recv_buckets(self.mopd_sync_group, self.mopd_sync_metas, self.mopd_sync_bucket_bytes, device):
            nbytes += sum(t.numel() * t.element_size() for _, t in named)
            self.mopd_load_bucket(named)  # a fresh buffer per bucket: the session may hold it until its layer is whole
            buckets += 1
        self.mopd_finish_load()
        return {"buckets": buckets, "bytes": nbytes}

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

Teachers use the same extension to capture last-layer hidden states during a prompt-log-prob scoring
pass (the full-vocabulary signal): a forward hook on the top-level model, whose output is the
decoder's post-final-norm state (what transformers returns as ``hidden_states[-1]``). A hook on the
inner decoder would never fire: vLLM's compile decorator replaces its ``__call__``.
"""

from __future__ import annotations

import numpy as np


class WorkerExtension:
    # ---------------------------------------------------------------- one load session
    def mopd_begin_load(self) -> bool:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self.model_runner.get_model()
        self.mopd_tied = tied_modules(model)  # before the session moves the layers' tensors to the meta device
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
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

    def mopd_finish_load(self) -> dict:
        """End the session: layers still waiting for tensors are processed with what they got; tied layers
        (an LM head sharing the embedding) are processed again. Returns {"incomplete": [(module, loaded
        elements, expected)]}: modules that did not receive all their tensors (the post-sync check names them)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        tied = self.mopd_tied
        incomplete = incomplete_modules(model, skip=set(tied))
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            reprocess(tied.values())
            repack_cpu_experts(model)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if fn is not None:
                fn()
        return {"incomplete": incomplete}

    def mopd_free_memory(self) -> int:
        """Bytes this worker could still allocate where it receives weights: its GPU's free memory, or on
        CPU the host's available memory."""
        import torch

        device = getattr(self, "device", None)
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        import psutil

        return int(psutil.virtual_memory().available)

    def mopd_device_uuid(self):
        from ..collectives import device_uuid

        device = getattr(self, "device", None)
        return device_uuid(device) if device is not None and getattr(device, "type", "cpu") == "cuda" else None

    # ---------------------------------------------------------------- padded vocabulary rows
    def mopd_mask_padded_rows(self, rows: int) -> int:
        """Logits of ids >= ``rows`` (embedding padding past the tokenizer) become -inf wherever this
        worker computes them: sampling never picks a padded id, and the sampled, top-k and prompt
        log-probs are normalised over the tokenizer's ids, as the learner's are (models/compat.py
        ``token_rows``). Wraps the model's ``compute_logits``, which vLLM calls outside the compiled or
        graph-captured forward for sampling and prompt log-probs alike; survives weight reloads (the
        model object stays). Returns the number of columns masked."""
        model = self.model_runner.get_model()
        inner = getattr(model, "_mopd_compute_logits", None) or model.compute_logits
        model._mopd_compute_logits = inner

        def compute_logits(hidden_states, *args, **kwargs):
            logits = inner(hidden_states, *args, **kwargs)
            if logits is not None and logits.shape[-1] > rows:  # None on non-last pipeline ranks
                logits[..., rows:] = float("-inf")
            return logits

        model.compute_logits = compute_logits
        return int(self.model_config.get_vocab_size()) - int(rows)

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

    def mopd_receive_weights(self, exit_after_first_bucket: bool = False) -> dict:
        """Receive every broadcast bucket and load it as it arrives. Returns buckets and bytes received.
        ``exit_after_first_bucket`` (chaos testing): the process dies here, mid-receive and half-loaded."""
        import torch

        from ..sync import recv_buckets

        device = getattr(self, "device", None) or torch.device("cpu")
        self.mopd_begin_load()
        buckets = nbytes = 0
        for named in recv_buckets(self.mopd_sync_group, self.mopd_sync_metas, self.mopd_sync_bucket_bytes, device):
            nbytes += sum(t.numel() * t.element_size() for _, t in named)
            self.mopd_load_bucket(named)  # a fresh buffer per bucket: the session may hold it until its layer is whole
            buckets += 1
            if exit_after_first_bucket:
                import os

                os._exit(137)
        done = self.mopd_finish_load()
        return {"buckets": buckets, "bytes": nbytes, **done}

    # ---------------------------------------------------------------- hidden states (teachers)
    def mopd_capture_start(self, keep_from: dict | None = None) -> bool:
        """Record last-layer hidden states until ``mopd_capture_stop``, on tensor-parallel rank 0 only (the
        output is replicated on every rank), and per request only from position ``keep_from[request id]``
        on (the response: a prompt's states carry no signal; requests not named: every position)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        runner = self.model_runner
        self.mopd_captured = {}
        self.mopd_keep_from = dict(keep_from or {})
        if getattr(self, "mopd_hook", None) is None:
            def hook(module, args, kwargs, out):
                if not getattr(self, "mopd_capturing", False) or not hasattr(out, "shape"):
                    return  # a pipeline stage other than the last returns intermediate tensors
                positions = (kwargs["positions"] if "positions" in kwargs else args[1]).cpu().numpy()
                starts = runner.query_start_loc.np  # the flattened batch, request by request
                for i, req in enumerate(runner.input_batch.req_ids):
                    a, b = int(starts[i]), int(starts[i + 1])
                    if b <= a:
                        continue
                    first = int(positions[a])
                    cut = max(0, self.mopd_keep_from.get(req.rsplit("-", 1)[0], 0) - first)
                    if a + cut < b:  # copy: on GPUs the output buffer is reused by the next step
                        self.mopd_captured.setdefault(req, []).append(
                            (first + cut, out[a + cut:b].detach().to("cpu", copy=True)))

            self.mopd_hook = runner.get_model().register_forward_hook(hook, with_kwargs=True)
        self.mopd_capturing = get_tensor_model_parallel_rank() == 0
        return True

    def mopd_capture_stop(self, dtype: str = "float32"):
        """{request id: (first position, rows, H, raw bytes)} of the contiguous run of states from the first
        position captured (bytes survive the RPC of multi-process engines); None on tensor-parallel ranks > 0."""
        import torch
        from vllm.distributed import get_tensor_model_parallel_rank

        self.mopd_capturing = False
        captured, self.mopd_captured = self.mopd_captured, {}
        if get_tensor_model_parallel_rank() != 0:
            return None
        out = {}
        for req, chunks in captured.items():
            first, h = assemble_capture(chunks)
            h = h.to(getattr(torch, dtype))
            arr = h.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else h.numpy()
            # the engine's request id is "<the caller's id>-<random suffix>"
            out[req.rsplit("-", 1)[0]] = (first, arr.shape[0], arr.shape[1], arr.tobytes())
        return out


def assemble_capture(chunks: list) -> tuple:
    """(first position, [rows, H] tensor) from one request's captured (position, [n, H]) chunks in the order
    they were computed. A prefill split over engine steps arrives in order; a preempted request computed
    again arrives a second time (later chunks overwrite the same positions); what follows a gap is cut, so
    the result is the contiguous run from the first position (the caller checks it covers what it needs)."""
    import torch

    first = min(pos for pos, _ in chunks)
    end = max(pos + h.shape[0] for pos, h in chunks)
    buf = torch.zeros(end - first, chunks[0][1].shape[1], dtype=chunks[0][1].dtype)
    have = torch.zeros(end - first, dtype=torch.bool)
    for pos, h in chunks:
        buf[pos - first: pos - first + h.shape[0]] = h
        have[pos - first: pos - first + h.shape[0]] = True
    run = int(have.long().cumprod(0).sum())  # covered rows before the first gap
    return first, buf[:run]


def tied_modules(model) -> dict:
    """{name: module} of modules whose parameter is another module's (a tied LM head and its embedding);
    call outside a load session (its layers' tensors are on the meta device).

    A load session processes a layer when its own tensors arrive; the tied head receives none (the
    checkpoint holds the tensor once), so a head that keeps a processed copy of its weight (on CPU a
    packed GEMM operand; quantised heads on GPUs) would go on using the old one: measured here, a Gemma 3
    / tied Qwen3 engine serving logits 0.75 nats off after one sync. Such modules are processed again."""
    first, tied = {}, {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if p.numel() == 0:
                continue
            key = (p.data_ptr(), tuple(p.shape))
            if key in first and first[key] is not mod:
                tied[name] = mod
            first.setdefault(key, mod)
    return tied


def reprocess(modules) -> None:
    """Re-run the post-load processing of unquantised modules (idempotent: it derives from the weight)."""
    for mod in modules:
        qm = getattr(mod, "quant_method", None)
        if qm is not None and type(qm).__name__.startswith("Unquantized"):
            qm.process_weights_after_loading(mod)


def repack_cpu_experts(model) -> int:
    """vLLM's CPU MoE kernel keeps experts in a prepacked layout made once at start-up: on a weight update
    the unquantised MoE method copies the new weights in as loaded and skips the prepacking (vLLM
    0.32 ``UnquantizedFusedMoEMethod._setup_kernel``), so a reloaded CPU engine multiplies by unpacked
    weights (measured: Qwen3-MoE 0.35 nats/token off after one sync of unchanged weights). Prepack them
    again here; GPU backends convert on every update themselves. Returns the layers repacked."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    n = 0
    for mod in model.modules():
        qm = getattr(mod, "quant_method", None)
        fused = getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)
        if type(qm).__name__ != "UnquantizedFusedMoEMethod" or fused is None:
            continue
        pad = getattr(fused, "_padded_intermediate_size", None)
        cfg = getattr(fused, "moe_config", None)
        if pad is not None and cfg is not None and pad(cfg) != cfg.intermediate_size_per_partition:
            continue  # a padded layout is not re-derivable from the loaded one: the post-sync check decides
        fused.process_weights_after_loading(mod)
        n += 1
    return n


def incomplete_modules(model, skip=frozenset()) -> list:
    """[(module name, elements loaded, elements expected)] of the current load session's layers that have
    not received all their tensors (call before the session's finalize)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    out = []
    for name, mod in model.named_modules():
        info = LAYERWISE_INFO.get(mod)
        if name in skip or info is None or not info.can_load() or not info.load_numel_total:
            continue
        if info.load_numel == 0 and all(n.endswith("_scale") for n, _ in mod.named_parameters(recurse=False)):
            continue  # nothing a checkpoint holds: rotary caches (buffers), attention scales
        if info.load_numel < info.load_numel_total:
            out.append((name, int(info.load_numel), int(info.load_numel_total)))
    return out


def decode_captured(entry, dtype: str) -> tuple:
    """(first position, [rows, H] array) of one ``mopd_capture_stop`` entry (bfloat16 as uint16 bits)."""
    start, rows, H, raw = entry
    return start, np.frombuffer(raw, np.uint16 if dtype == "bfloat16" else np.dtype(dtype)).reshape(rows, H)

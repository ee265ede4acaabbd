"""mopd_ray: multi-teacher on-policy distillation of LLMs on Ray, vLLM and DeepSpeed."""

__version__ = "0.1.0"

"""Runtime tests run the real engines (vLLM CPU, DeepSpeed on gloo, Ray) with tiny models."""

from ..helpers import compose_cfg  # noqa: F401  (imported by the runtime tests)

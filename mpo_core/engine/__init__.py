"""The loop and its scheduling: requests in, token events out.

``core.Engine`` owns the models' thread and runs continuous batching; ``scheduler`` admits
waiting requests; ``requests`` checks a request once; ``events`` and ``streams`` carry each
step's tokens to the callers; ``jobs`` interleaves scoring with decoding.
"""

from .core import Engine, EngineLimits, EngineStats, GenerationRequest

__all__ = ["Engine", "EngineLimits", "EngineStats", "GenerationRequest"]

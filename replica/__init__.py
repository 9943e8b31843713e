"""graphserve's GPU engine: bucketed CUDA-graph decode with continuous batching.

Imports torch, never ray.serve. The same API runs eagerly on CPU.
"""
from replica.config import ConfigError, EngineConfig
from replica.sampling_params import (GenerationChunk, GenerationRequest, InvalidRequestError,
                                     SamplingParams)

__all__ = ["ConfigError", "EngineConfig", "GenerationChunk", "GenerationRequest",
           "InvalidRequestError", "SamplingParams", "Engine"]


def __getattr__(name):  # Engine pulls in torch; keep `import replica` light for config-only users
    if name == "Engine":
        from replica.engine import Engine
        return Engine
    raise AttributeError(name)

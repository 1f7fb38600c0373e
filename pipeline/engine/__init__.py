"""The streaming engine: LiveCC's protocol (session) over a batched model runner and its scheduler (core).

    session.py  one stream's protocol state -> TurnRequest          (CPU, no tensors on the device)
    core.py     EngineCore: continuous batching, one thread per device -> TurnResult
    runner.py   ModelRunner: vision, prefill, one decode step for many rows (CUDA graphs: cuda_graphs.py)
    model.py    TextModel: the weights and one layer function;  kv_cache.py: one row per stream
    quantize.py engine.quantize: the language model's linear weights in int8 / int4 / fp8 (torchao)
"""

from .config import DEFAULT_MODEL, DEFAULT_QUERY, EngineConfig
from .core import EngineCore, TurnRequest, TurnResult, TurnStats
from .loading import LoadedModel, ModelLoadError, load_model
from .session import ContextFullError, StreamingSession, make_core

__all__ = ["DEFAULT_MODEL", "DEFAULT_QUERY", "EngineConfig", "LoadedModel", "ModelLoadError", "load_model",
           "ContextFullError", "EngineCore", "StreamingSession", "TurnRequest", "TurnResult", "TurnStats", "make_core"]

"""The streaming engine: LiveCC's protocol (session) over a batched model runner and its scheduler (core).

    session.py  one stream's protocol state -> TurnRequest          (CPU, no tensors on the device)
    core.py     EngineCore: continuous batching, one thread per device -> TurnResult
    runner.py   ModelRunner: vision, prefill, one decode step for many rows (CUDA graphs: cuda_graphs.py)
    model.py    TextModel: the weights and one layer function;  kv_cache.py: one row per stream
    quantize.py engine.quantize: the language model's linear weights in int8 (torchao) / int4 / fp8
    lowbit.py   a weight in one of the engine's own formats: a few rows through its kernels, more dequantized
    int4.py     4-bit weights: the format, its kernels' configurations and calls
    fp8.py      FP8 E4M3 weights: the layout, its kernels' configurations and calls
    lowbit_kernels.py  the Triton kernels of both: one row and several rows of a decode step

Names are imported on first use, so ``pipeline.engine.config`` (read by the config loader) costs no torch import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_MODEL": ".config", "DEFAULT_QUERY": ".config", "EngineConfig": ".config",
    "EngineCore": ".core", "TurnRequest": ".core", "TurnResult": ".core", "TurnStats": ".core",
    "LoadedModel": ".loading", "ModelLoadError": ".loading", "load_model": ".loading",
    "ContextFullError": ".session", "StreamingSession": ".session", "make_core": ".session",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)

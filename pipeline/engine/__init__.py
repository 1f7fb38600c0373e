"""The streaming engine: LiveCC's protocol on an incremental decode loop over a preallocated KV cache."""

from .config import DEFAULT_MODEL, DEFAULT_QUERY, EngineConfig
from .loading import LoadedModel, ModelLoadError, load_model
from .session import ContextFullError, StreamingSession

__all__ = ["DEFAULT_MODEL", "DEFAULT_QUERY", "EngineConfig", "LoadedModel", "ModelLoadError", "load_model",
           "ContextFullError", "StreamingSession"]

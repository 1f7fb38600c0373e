"""The engine worker: one loaded model and its engine core (the one thread that touches the device).

``livecc run`` makes one with a single KV-cache row; ``livecc serve`` makes one per device and every
stream's pipeline attaches to it. The number of rows (streams) follows from the device's memory and
``engine.max_context`` unless ``engine.max_streams`` says otherwise (see ``slots_that_fit``).
"""

from __future__ import annotations

import logging
import math

from .engine import EngineConfig, StreamingSession, load_model, make_core
from .engine.context import stagger_fraction
from .engine.core import EngineCore
from .engine.kv_cache import KVCache

log = logging.getLogger("livecc.engine")

MEMORY_FRACTION = 0.85  # of the device memory free after loading, given to KV-cache rows
WORKSPACE_BYTES = 4 << 30  # kept free for activations, CUDA graphs and the vision tower (bytes)


def slots_that_fit(model, cfg: EngineConfig, elsewhere: int = 1) -> int:
    """KV-cache rows of ``cfg.max_context`` tokens that fit in the device's free memory (CUDA), else ``elsewhere``.

    Per token: layers · 2 · kv_heads · head_dim · itemsize bytes (LiveCC-7B bf16: 56 KiB; 1.75 GiB a row)."""
    if model.device.type != "cuda":
        return elsewhere
    import torch

    from .engine.model import text_config

    tc = text_config(model.hf)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    per_row = KVCache.bytes_per_token(tc.num_hidden_layers, tc.num_key_value_heads, head_dim, model.dtype) \
        * cfg.max_context
    free, _ = torch.cuda.mem_get_info(model.device)
    return max(1, math.floor((free - WORKSPACE_BYTES) * MEMORY_FRACTION / per_row))


class EngineWorker:
    """A model, its core and the core's thread. ``open_session`` gives each stream its own cache row."""

    def __init__(self, cfg: EngineConfig, model=None, slots: int | None = None, cpu_slots: int = 1):
        self.cfg = cfg
        self.model = model if model is not None else load_model(
            cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
        want = slots or cfg.max_streams or slots_that_fit(self.model, cfg, cpu_slots)
        self.core: EngineCore = make_core(self.model, cfg, slots=want)
        self.slots = want
        log.info("engine: %d stream%s of up to %d context tokens", want, "" if want == 1 else "s", cfg.max_context)

    def start(self) -> "EngineWorker":
        if not self.core.alive:
            self.core.start()
        return self

    @property
    def free_slots(self) -> int:
        return self.core.free_slots

    def open_session(self, cfg: EngineConfig, seed: int | None = None) -> StreamingSession:
        """A session on a free row; RuntimeError naming the capacity when none is free."""
        if self.core.free_slots == 0:
            raise RuntimeError(f"the engine is full: {self.slots} stream{'' if self.slots == 1 else 's'} of "
                               f"{cfg.max_context} context tokens fit on {self.model.device}")
        session = StreamingSession(self.model, cfg, core=self.core, seed=seed)
        # streams opened together roll over at different turns: by cache row (row 0, a lone stream's, on time)
        session.rollover_early = stagger_fraction(session.slot, cfg.rollover_stagger)
        return session

    def stop(self, timeout: float | None = None) -> bool:
        return self.core.stop(timeout)

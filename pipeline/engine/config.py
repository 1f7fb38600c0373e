"""Settings of the streaming engine (one dataclass; the YAML `engine:` block maps onto it)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "chenjoya/LiveCC-7B-Instruct"
DEFAULT_QUERY = "Please describe the video."
QUANTIZE_MODES = ("none", "int8", "int4", "fp8")  # engine.quantize (pipeline/engine/quantize.py)


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    device: str | None = None  # cuda / mps / cpu; None = best available
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 elsewhere
    query: str = DEFAULT_QUERY
    max_new_tokens: int = 16  # per 1-second turn, as LiveCC's live demo
    answer_max_new_tokens: int = 128  # for viewer questions
    repetition_penalty: float = 1.05
    greedy: bool = False  # False = sample with the checkpoint's generation_config (the demo's default)
    temperature: float | None = None  # None = from generation_config.json
    top_k: int | None = None
    top_p: float | None = None
    streaming_eos_base: float = 0.0  # ThresholdLogitsProcessor(base, step) of the reference
    streaming_eos_step: float = 0.0
    positions: str = "seed"  # seed = the reference's 1-D continuation; exact = true 3-D mRoPE per chunk
    max_pixels: int = 384 * 28 * 28
    max_context: int = 32768  # KV cache capacity in tokens (LiveCC's trained window)
    fast: bool | None = None  # CUDA-graph decode; None = on when running on CUDA
    compile: bool | None = None  # fuse the decode step's small kernels (torch.compile); None = on with CUDA graphs
    seed: int | None = None  # sampling seed
    quantize: str = "none"  # language-model weights: none | int8 | int4 | fp8 (see pipeline/engine/quantize.py)
    max_streams: int | None = None  # KV-cache rows (streams) per device; None = 1 for run, what fits for serve
    prefill_batch: int = 4  # turns of different streams prefilled together at most (EngineCore; docs/performance.md)
    decode_steps_per_prefill: int = 2  # decode steps between two prefills while captions decode (EngineCore)
    # context policy for unbounded streams (see pipeline/engine/context.py)
    context: str = "rollover"  # rollover | window | none
    rollover_seconds: float = 120.0  # start a fresh context this often (LiveCC was trained on <= 4 min)
    # a stream in cache row k rolls over early by up to this fraction of its budget (context.stagger_fraction), so
    # streams started together do not all roll over in the same second; row 0 (a lone stream's) never does
    rollover_stagger: float = 0.25
    window_seconds: float = 32.0  # window: the recent video/text kept besides the first turn
    context_headroom: int = 1024  # tokens kept free for the next turn; a full context rolls over / evicts
    history_chars: int = 400  # recent commentary carried into a rolled-over context

    def __post_init__(self):
        if self.positions not in ("seed", "exact"):
            raise ValueError(f"positions must be 'seed' or 'exact', not {self.positions!r}")
        if self.context not in ("rollover", "window", "none"):
            raise ValueError(f"context must be rollover, window or none, not {self.context!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be {', '.join(QUANTIZE_MODES)}, not {self.quantize!r}")
        if self.prefill_batch < 1:
            raise ValueError("prefill_batch must be at least 1")
        if self.decode_steps_per_prefill < 1:
            raise ValueError("decode_steps_per_prefill must be at least 1")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not 0.0 <= self.rollover_stagger < 1.0:
            raise ValueError(f"rollover_stagger must be in [0, 1), not {self.rollover_stagger}")

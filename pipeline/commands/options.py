"""The engine flags (``--model``, ``--device``, ...), defined once for every command that loads a model.

Each flag maps onto the field of the same name in :class:`pipeline.engine.EngineConfig` (the YAML
``engine:`` block); a flag not given is ``None`` and leaves the config's value alone.
"""

from __future__ import annotations

import argparse
import os

#: flag destination == EngineConfig field
ENGINE_FLAGS = ("model", "device", "dtype", "query", "greedy", "max_new_tokens", "repetition_penalty",
                "positions", "seed")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hugging Face id or local folder (default: chenjoya/LiveCC-7B-Instruct)")
    g.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: best available)")
    g.add_argument("--dtype", help="auto (bf16 on GPU), bfloat16, float16, float32")
    g.add_argument("--query", help="commentary instruction (default: 'Please describe the video.')")
    g.add_argument("--greedy", action="store_true", default=None, help="greedy decoding instead of sampling")
    g.add_argument("--max-new-tokens", type=int, help="caption length cap per turn (default 16)")
    g.add_argument("--repetition-penalty", type=float, help="default 1.05")
    g.add_argument("--positions", choices=["seed", "exact"],
                   help="seed: the reference's positions (default); exact: training-consistent 3-D positions")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model's tensor operations (default 1, or $OMP_NUM_THREADS)")


def set_cpu_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count before the model loads; returns the count used.

    Default 1 (unless ``$OMP_NUM_THREADS`` says otherwise): a decode step is hundreds of small operations
    (a sampling step alone sorts, masks and softmaxes the 151,936-entry vocabulary several times), and each
    one forks and joins OpenMP's thread team. On a busy machine a join waits for a descheduled worker:
    ``livecc caption``, which ran the engine on the main thread with torch's default (one thread per core),
    took 2-4x longer per turn than ``livecc run`` with 65 % of it in sampling (docs/performance.md).
    Raise it for a large model on an idle many-core CPU; a GPU does the model's work itself either way.
    """
    import torch

    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    if threads < 1:
        from ..errors import UserError

        raise UserError(f"--threads {threads}: must be at least 1")
    torch.set_num_threads(threads)
    return threads


def engine_overrides(args: argparse.Namespace) -> dict:
    """The engine flags given on the command line: ``{field: value}`` (flags not given are left out)."""
    return {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k, None) is not None}

"""What every command that loads a model shares: the engine flags (``--model``, ``--device``, ...), defined
once, and what to do before the model loads (CPU threads, a model that cannot be there, progress bars).

Each engine flag maps onto the field of the same name in :class:`pipeline.engine.EngineConfig` (the YAML
``engine:`` block); a flag not given is ``None`` and leaves the config's value alone (unless the command
gave it a default of its own: ``livecc ask`` is greedy, 512 tokens per answer).
"""

from __future__ import annotations

import argparse
import os

from ..engine.config import QUANTIZE_MODES

#: flag destination == EngineConfig field
ENGINE_FLAGS = ("model", "device", "dtype", "query", "greedy", "max_new_tokens", "repetition_penalty",
                "positions", "seed", "quantize")


def add_engine_args(p: argparse.ArgumentParser, *, query: bool = True, **defaults) -> None:
    """The engine flags on ``p``. ``query=False`` leaves out ``--query`` (``livecc ask``: the questions are the
    prompt); ``defaults`` are the command's own values for flags not given (``greedy``, ``max_new_tokens``),
    shown in ``--help`` and returned by ``engine_overrides``."""
    greedy, max_new = defaults.get("greedy", False), defaults.get("max_new_tokens", 16)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hugging Face id or local folder (default: chenjoya/LiveCC-7B-Instruct)")
    g.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: best available)")
    g.add_argument("--dtype", help="auto (bf16 on GPU), bfloat16, float16, float32")
    if query:
        g.add_argument("--query", help="commentary instruction (default: 'Please describe the video.')")
    pick = g.add_mutually_exclusive_group()
    pick.add_argument("--greedy", action="store_true", default=None,
                      help="greedy decoding" + (" (the default)" if greedy else " instead of sampling"))
    pick.add_argument("--sample", dest="greedy", action="store_false", default=None,
                      help="sample with the checkpoint's generation_config" + ("" if greedy else " (the default)"))
    g.add_argument("--max-new-tokens", type=int, help=f"length cap per turn, in tokens (default {max_new})")
    g.add_argument("--repetition-penalty", type=float, help="default 1.05")
    g.add_argument("--positions", choices=["seed", "exact"],
                   help="seed: the reference's positions (default); exact: training-consistent 3-D positions")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="language-model weights: none (default), int8, int4 (CUDA), fp8 (CUDA, compute capability 8.9+)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model's tensor operations (default 1, or $OMP_NUM_THREADS)")
    p.set_defaults(**defaults)


def set_cpu_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count before the model loads; returns the count used.

    Default 1 (unless ``$OMP_NUM_THREADS`` says otherwise): a decode step is hundreds of small operations
    (a sampling step alone sorts, masks and softmaxes the 151,936-entry vocabulary several times), each a
    fork/join of OpenMP's thread team, and between two of them libgomp's idle workers spin (its default wait
    policy) on cores the calling thread needs. On a busy machine ``livecc caption`` (the engine on the main
    thread, torch's default of one thread per core) took 2-4x longer per turn than ``livecc run``, 65 % of it
    in sampling; one thread, or ``OMP_WAIT_POLICY=PASSIVE``, removed the difference (docs/performance.md).
    Raise it for a large model on an idle many-core CPU; a GPU does the model's work itself either way.
    """
    import torch

    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP allows "4,2" (nesting)
        threads = int(env) if env.isdigit() else 1
    if threads < 1:
        from ..errors import UserError

        raise UserError(f"--threads {threads}: must be at least 1")
    torch.set_num_threads(threads)
    return threads


HUB_PROBE_TIMEOUT_S = 3.0


def check_model(name: str) -> None:
    """Fail in seconds, before torch and transformers load, where loading ``name`` cannot work.

    A local path (``./X``, ``/X``, ``~/X``) that does not exist: "does not exist". A Hub id with the Hub out
    of reach (``$HF_HUB_OFFLINE`` set, or no TCP connection to ``$HF_ENDPOINT``/huggingface.co:443 within
    3 s): fine when the model is in the local Hub cache (``HF_HUB_OFFLINE=1`` is then set so nothing retries),
    else one line saying how to bring it here. Without this, transformers retried for about a minute
    and logged dozens of warnings before failing.

    Raises:
        UserError: the model cannot be loaded; the message says what to do.
    """
    import socket
    from pathlib import Path
    from urllib.parse import urlparse

    from ..errors import UserError

    local = Path(name).expanduser()
    if local.exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"--model {name}: does not exist (expected a local checkpoint folder, "
                        f"or a Hugging Face id like chenjoya/LiveCC-7B-Instruct)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set"
    if not offline:
        endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            return
        except OSError as e:
            offline, why = True, f"the Hugging Face Hub ({host}:{port}) is unreachable: {e.strerror or e}"
            os.environ["HF_HUB_OFFLINE"] = "1"  # the cache only, no retries (read when huggingface_hub loads)
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # in the local cache: transformers loads it from there
    folder = name.rsplit("/", 1)[-1]
    raise UserError(f"model {name!r} is not on this machine and cannot be downloaded ({why}). Download it where "
                    f"there is internet (`hf download {name} --local-dir {folder}`), copy the folder here and pass "
                    f"--model ./{folder}")


def quiet_progress_bars() -> None:
    """No download / weight-loading progress bars from huggingface_hub and transformers (for a pipe or a log
    file, where each redraw would be a line of its own)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # an older or absent transformers: nothing to quiet
        pass


def engine_overrides(args: argparse.Namespace) -> dict:
    """The engine flags given on the command line: ``{field: value}`` (flags not given are left out)."""
    return {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k, None) is not None}

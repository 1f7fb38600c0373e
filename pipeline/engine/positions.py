"""Qwen2-VL's 3-D mRoPE positions, computed one segment at a time.

Text tokens get (p, p, p) with p counting up. A video item of grid (t, h, w) (h, w after the
2x2 merge) gets (start + ti, start + hi, start + wi) over its tokens, and the text after it
continues at max + 1. ``segment_positions`` does that for a run of new ids that continue a
sequence whose next free position is ``start``; it is what ``get_rope_index`` computes for the
whole sequence, split so a streaming session can extend it turn by turn.
"""

from __future__ import annotations

import torch


def segment_positions(ids: list[int], video_token_id: int, grids: list[tuple[int, int, int]],
                      start: int) -> tuple[torch.Tensor, int]:
    """Positions (3, len(ids)) for ``ids`` and the next free position after them.

    ``grids`` are the (t, h, w) of the video items in ``ids`` in order, h and w already divided
    by the spatial merge size; each item is a contiguous run of ``t*h*w`` video tokens.
    """
    out = torch.empty(3, len(ids), dtype=torch.long)
    pos, i, g = start, 0, 0
    n = len(ids)
    while i < n:
        if ids[i] == video_token_id:
            t, h, w = grids[g]
            g += 1
            count = t * h * w
            ti = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
            hi = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
            wi = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
            out[:, i:i + count] = torch.stack([ti, hi, wi]) + pos
            pos = pos + max(t, h, w)
            i += count
        else:
            j = i
            while j < n and ids[j] != video_token_id:
                j += 1
            out[:, i:j] = torch.arange(pos, pos + j - i)
            pos += j - i
            i = j
    if g != len(grids):
        raise ValueError(f"{len(grids)} video grids given, {g} video items found in the ids")
    return out, pos


def linear_positions(count: int, start: int) -> tuple[torch.Tensor, int]:
    """(p, p, p) for ``count`` tokens from ``start``: the reference's continuation after turn 1."""
    return torch.arange(start, start + count).expand(3, count).clone(), start + count

"""Pixels for the vision tower: Qwen2-VL's normalisation and patch layout, done in torch.

Produces what ``Qwen2VLImageProcessor`` produces for a video (frames already resized to a multiple
of 28, which LiveCC's resize guarantees), without the per-call CPU cost of the processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PatchSpec:
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_processor_config(cls, cfg: dict) -> "PatchSpec":
        return cls(patch=cfg.get("patch_size", 14), merge=cfg.get("merge_size", 2),
                   temporal=cfg.get("temporal_patch_size", 2),
                   mean=tuple(cfg.get("image_mean", CLIP_MEAN)), std=tuple(cfg.get("image_std", CLIP_STD)))


def patchify(frames: np.ndarray, spec: PatchSpec, device=None, dtype=torch.float32):
    """T x H x W x 3 uint8 -> (pixel_values (T/2*gh*gw, 3*2*14*14), grid (t, gh, gw)).

    Rows are ordered merge-window by merge-window, as the vision tower expects.
    """
    t, h, w, c = frames.shape
    p, m, tp = spec.patch, spec.merge, spec.temporal
    if t % tp or h % (p * m) or w % (p * m):
        raise ValueError(f"frames {frames.shape} do not fit patches of {tp}x{p * m}x{p * m}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    # the processor's fused form: (x - mean*255) / (std*255) in float32 (bit-identical to it)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device) * 255.0
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device) * 255.0
    x = (x.float() - mean) / std
    x = x.permute(0, 3, 1, 2)  # T C H W
    gt, gh, gw = t // tp, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(gt * gh * gw, c * tp * p * p)
    return x.to(dtype), (gt, gh, gw)


def video_token_count(grid: tuple[int, int, int], merge: int = 2) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)

"""Frame geometry: frames upright as players show them, and LiveCC's resize rules for the model
(qwen-vl-utils' smart_resize + bicubic)."""

from __future__ import annotations

import math

import av
import numpy as np
import torch
import torch.nn.functional as F

FACTOR = 28  # patch 14 x spatial merge 2
MIN_PIXELS = 100 * FACTOR * FACTOR
MAX_PIXELS = 384 * FACTOR * FACTOR  # LiveCC's default per frame
MAX_RATIO = 200
# FFmpeg demuxers that turn a text file into a "video" (tty: .txt/.nfo/.ans/.asc/... drawn as ANSI art):
# a file opened by one of them is a text file given by mistake, not something to caption
TEXT_DEMUXERS = frozenset({"tty"})


class Upright:
    """Decoded frames -> RGB images turned the way players show them (one per stream or session).

    A phone stores its video as the sensor sees it and records how to turn it for display: an MP4
    track matrix (``ffmpeg -metadata:s:v rotate=90``), or an H.264/HEVC display-orientation SEI in a
    live stream. FFmpeg exports either as DISPLAYMATRIX side data on the decoded frames (libavutil
    display.h), which PyAV reads as ``VideoFrame.rotation``: degrees counterclockwise, what FFmpeg's
    own autorotation (the ``ffmpeg``/``ffplay`` default) applies. An SEI comes with one frame and
    holds for the frames after it; PyAV says 0 both for "no matrix" and "a matrix of 0", so a
    non-zero rotation holds until another non-zero one. Rotations are rounded to quarter turns; a
    flip in the matrix is not applied. (``VideoFrame.side_data`` would tell the two apart, but reading
    it on every frame made PyAV 18 start native threads without end on a live H.264 stream.)
    """

    def __init__(self) -> None:
        self.degrees = 0  # counterclockwise, one of 0, 90, 180, 270

    def turn(self, frame: av.VideoFrame) -> int:
        """The quarter turn (degrees counterclockwise) that ``frame`` is shown with."""
        rotation = round(frame.rotation / 90) % 4 * 90
        if rotation:
            self.degrees = rotation
        return self.degrees

    def image(self, frame: av.VideoFrame, turn: int | None = None) -> np.ndarray:
        """``frame`` -> H x W x 3 uint8 RGB, turned upright (H and W swap for 90 / 270); ``turn`` from
        :meth:`turn` (None: work it out here)."""
        degrees = self.turn(frame) if turn is None else turn
        image = frame.to_ndarray(format="rgb24")
        if degrees:  # np.rot90 turns counterclockwise, as the matrix does
            image = np.ascontiguousarray(np.rot90(image, degrees // 90))
        return image


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The size qwen-vl-utils gives a frame: multiples of ``factor``, area within the limits."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"frame aspect ratio {max(height, width) / min(height, width):.0f} is over {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resize_frames(frames: np.ndarray, max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS) -> np.ndarray:
    """T x H x W x 3 uint8 RGB -> T x H' x W' x 3 uint8, exactly as the reference resizes.

    The reference calls torchvision's tensor resize (bicubic, antialias) on uint8 TCHW; that is
    interpolate on float32, then clamp and round back to uint8, which is what this does.
    """
    t, h, w, _ = frames.shape
    nh, nw = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    if (nh, nw) == (h, w):
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    y = y.clamp_(0, 255).round_().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def even_frames(frames: np.ndarray) -> np.ndarray:
    """Qwen2-VL's temporal patch is 2: pad an odd count by repeating the last frame."""
    if len(frames) % 2:
        frames = np.concatenate([frames, frames[-1:]], axis=0)
    return frames

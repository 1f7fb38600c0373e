"""Live capture: sources -> capture thread -> ring buffer -> 2 fps sampler -> clip queue."""

from pipeline.capture.clipqueue import ClipQueue
from pipeline.capture.errors import CaptureError
from pipeline.capture.live import LiveCapture
from pipeline.capture.reader import Backoff, CaptureThread
from pipeline.capture.ringbuffer import RingBuffer
from pipeline.capture.sampler import LiveSampler, clips_from_file, reference_pick
from pipeline.capture.sources import Source, SourceOptions, register_source, resolve

__all__ = ["Backoff", "CaptureError", "CaptureThread", "ClipQueue", "LiveCapture", "LiveSampler", "RingBuffer", "Source",
           "SourceOptions", "clips_from_file", "reference_pick", "register_source", "resolve"]

"""Live capture: sources -> capture thread -> ring buffer -> 2 fps sampler -> clip queue."""

from pipeline.capture.clipqueue import ClipQueue
from pipeline.capture.errors import CaptureError
from pipeline.capture.live import LiveCapture
from pipeline.backoff import Backoff
from pipeline.capture.reader import CaptureThread
from pipeline.capture.ringbuffer import RingBuffer
from pipeline.capture.sampler import LiveSampler
from pipeline.capture.sources import Source, SourceOptions, resolve

__all__ = ["Backoff", "CaptureError", "CaptureThread", "ClipQueue", "LiveCapture", "LiveSampler", "RingBuffer", "Source",
           "SourceOptions", "resolve"]

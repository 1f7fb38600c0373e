"""livecc-pipeline: live video in, LiveCC captions out."""

__version__ = "0.1.0"

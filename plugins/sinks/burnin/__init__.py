"""Burn-in and restream sinks (see ``sink.py``): rendering, outputs and CEA-608 in submodules."""

from .output import Output, nvenc_available, resolve
from .render import CaptionRenderer, FontChain, find_font, fit_into
from .sink import BurninSettings, BurninSink, RestreamSettings, RestreamSink

__all__ = ["BurninSettings", "BurninSink", "CaptionRenderer", "FontChain", "Output", "RestreamSettings",
           "RestreamSink", "find_font", "fit_into", "nvenc_available", "resolve"]

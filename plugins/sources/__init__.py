"""Built-in source plugins that PyAV does not open (the FFmpeg kinds live in pipeline/capture/sources.py)."""

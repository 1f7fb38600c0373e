"""Streams spread over the GPUs and machines of a Ray cluster (``livecc serve --cluster``; docs/cluster.md).

``worker.py``: the GPU worker (one engine, the sessions of its streams); ``stream.py``: a stream's capture,
sampler and sinks with its engine on a worker; ``service.py``: placement, failure and drain, the HTTP API.
Ray is imported only by these modules' functions, and only with ``--cluster``.
"""

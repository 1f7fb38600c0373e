"""The ``livecc`` commands, one module each: ``caption`` (and its ``evaluation`` protocol), ``run``, ``serve``,
``ask``, ``demo``; ``options`` holds the flags they share.

Each module has ``add_parser(subparsers)`` and a command function; nothing here imports torch at import time.
"""

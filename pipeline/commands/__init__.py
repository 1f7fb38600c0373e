"""The ``livecc`` commands, one module each: ``caption``, ``run``, ``demo``; ``options`` holds the flags they share.

Each module has ``add_parser(subparsers)`` and a ``cmd_*`` function; nothing here imports torch at import time.
"""

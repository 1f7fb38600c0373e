"""The ``livecc`` subcommands, one module each (``add_parser(subparsers)`` + ``main(args)``)."""

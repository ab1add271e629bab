"""The ``instaprune`` command line: argument parsing (options generated from the config dataclasses) and the
subcommands, which render what the library returns. The only place that prints.
"""

from instaprune.cli.main import build_parser, main

__all__ = ["main", "build_parser"]

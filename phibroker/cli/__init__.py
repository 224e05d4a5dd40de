"""The `phibroker` command: thin click commands over the library."""

from phibroker.cli.commands import main

__all__ = ["main"]

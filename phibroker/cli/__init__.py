"""The `phibroker` command: thin click commands, one module per group, over the library.

Each command parses its options, calls one library function, and turns a `PhibrokerError` into one
line on stderr and its exit code. Importing the modules registers their commands on `main`.
"""

from phibroker.cli import approvals, choreography, interop, ops, processes, runs, web  # noqa: F401 - registers the commands
from phibroker.cli.app import main

__all__ = ["main"]

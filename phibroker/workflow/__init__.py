"""Workflow files, pure: the schema (spec), expressions (expr), the graph (dag), reading a file's bytes
(decoding), and loading + checking a file (loader), whose entry points are here."""

from phibroker.workflow.decoding import decode
from phibroker.workflow.loader import Workflow, check, from_stored, load, names_a_file

__all__ = ["Workflow", "check", "decode", "from_stored", "load", "names_a_file"]

"""The `hgdeploy` command line. Parses arguments, calls one pipeline, evaluation or tune
function, prints the result; imports nothing heavy until a command needs it."""

from hgdeploy.cli.main import main

__all__ = ["main"]

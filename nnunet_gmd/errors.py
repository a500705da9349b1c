"""The one error type for bad user input, shared by every command and integration.

It lives here, not in ``cli.py``, so that library modules never import the command-line layer, and so that
``python -m nnunet_gmd.cli`` (which runs ``cli.py`` as ``__main__``) still catches the same class.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (a file, a flag, a name); printed as one line, without a traceback."""

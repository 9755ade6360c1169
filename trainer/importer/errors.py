"""The importer's one error: a message a person understands, on one line, naming the input."""
from __future__ import annotations


class ImportFailure(Exception):
    """Bad input or a refused import; str(e) is the whole one-line message."""

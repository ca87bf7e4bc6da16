"""The one exception type the command line turns into a one-line error (no traceback)."""


class FacetoolError(Exception):
    """A user-facing error: the message names the file (and record and byte offset where relevant)."""

"""The one error type a user sees as a one-line message (no traceback)."""


class SlackdistError(Exception):
    """Bad input or a failed precondition; the message names the file and what is wrong."""

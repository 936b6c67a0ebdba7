"""The one error type a user sees as a one-line message (no traceback)."""


class SlackdistError(Exception):
    """Bad input or a failed precondition; the message names the file and what is wrong."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

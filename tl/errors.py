"""The one exception type tl raises for bad input, so front ends can report it cleanly.

Every message names what was wrong, echoes the offending value and says what to do
instead; the command-line scripts print it without a traceback.
"""


class TLError(ValueError):
    """Bad input or settings: a message for the user, not a bug in tl."""


def known_names(names, limit: int = 40) -> str:
    """Join names for an error message, eliding the middle of very long lists."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    head, tail = names[: limit // 2], names[-limit // 4 :]
    skipped = len(names) - len(head) - len(tail)
    return ", ".join([*head, f"... ({skipped} more) ...", *tail])

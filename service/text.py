"""Client text inside error messages; a leaf module (no FastAPI), so pure modules can quote too.

Nothing a client sends comes back at its own size: a quoted value is cut to QUOTED_CHARS characters,
a list of the client's items (unknown options, validation errors) to LISTED_ITEMS with their total
count, and a whole error message to MESSAGE_CHARS, whatever it quotes."""

from __future__ import annotations

QUOTED_CHARS = 64  # one quoted value: a name, a content type, a parameter
LISTED_ITEMS = 10  # client items listed in one error
MESSAGE_CHARS = 2048  # one error message


def quoted(text: object, limit: int = QUOTED_CHARS) -> str:
    """A client's text in an error message: quoted, and at most its first `limit` characters (a 10 MB
    model name must not come back as a 10 MB error)."""
    value = str(text)
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def clipped(text: object, limit: int = MESSAGE_CHARS) -> str:
    """`text` as it is, cut to `limit` characters (marked with "...") where longer, a lone surrogate
    (which JSON may carry, UTF-8 may not) escaped."""
    value = str(text)
    value = value if len(value) <= limit else value[:limit] + "..."
    return value if value.isascii() else value.encode("utf-8", "backslashreplace").decode("utf-8")


def encodable(text: str) -> bool:
    """False for lone surrogates: JSON can escape them, but no encoder (UTF-8, a tokenizer) can write them."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True

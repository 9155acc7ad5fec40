"""Client text inside error messages; a leaf module (no FastAPI), so pure modules can quote too."""

from __future__ import annotations


def quoted(text: object, limit: int = 64) -> str:
    """A client's text in an error message: quoted, and at most its first `limit` characters (a 10 MB
    model name must not come back as a 10 MB error)."""
    value = str(text)
    return repr(value[:limit]) + ("..." if len(value) > limit else "")

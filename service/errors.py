"""The one exception a request's failure raises anywhere in the service: an HTTP status, a stable
code and a message. The web adapters turn it into the one error shape (service/error_responses.py)."""

from __future__ import annotations


class ServiceError(Exception):
    """An error a client caused or should know about, with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

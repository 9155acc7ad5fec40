"""Logging set-up: one line per request from `service.access`, as text or as JSON."""

from __future__ import annotations

import json
import logging
import time

# fields a request's log line carries, besides the message
REQUEST_FIELDS = ("request_id", "method", "path", "status", "ms", "model")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}  # fmt: skip
        line.update({field: getattr(record, field) for field in REQUEST_FIELDS if hasattr(record, field)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class Collapse(logging.Filter):
    """Lets each kind of warning or error (its logger and message template) through once per `every`
    seconds, the next one saying how many were held back: uvicorn warns once per malformed request
    ("Invalid HTTP request received."), python-multipart once per malformed body, so a client could
    otherwise write the log as fast as it sends. Requests' own lines (INFO) all pass."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self.seen: dict[str, tuple[float, int]] = {}  # message -> (when last let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind, now = f"{record.name}: {record.msg}", time.monotonic()
        last, held = self.seen.get(kind, (-self.every, 0))
        if now - last < self.every:
            self.seen[kind] = (last, held + 1)
            return False
        if len(self.seen) > 1000:  # distinct kinds are few; bound the memory all the same
            self.seen.clear()
        self.seen[kind] = (now, 0)
        if held:
            message = record.getMessage()
            record.msg, record.args = f"{message} ({held} more like it in the last {now - last:.0f} s)", None
        return True


def configure(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Collapse())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)

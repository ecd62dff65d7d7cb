"""Logging setup both CLIs share: `--log-format text|json`, and the fields a log line may carry.

JSON is one object per line (what journald, Loki or Elasticsearch ingest without a parser):

    {"time": "2026-12-01T09:14:03.512Z", "level": "INFO", "logger": "satellite.agent",
     "message": "flipped to 3f2a...", "lockfile_hash": "3f2a...", "duration_seconds": 1.82}

Structured fields come from `extra=` on the logging call; only the names in FIELDS are emitted,
so an `extra` added for some other purpose never leaks into the output. Values are what the
caller passed (hashes, names, numbers): never put a token or a URL with credentials there.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The structured fields, by the name a log line carries them under. Keep them few and stable:
# dashboards and alerts are built on these names.
FIELDS = (
    "lockfile_hash",
    "sequence",
    "satellite",
    "environment",
    "phase",
    "duration_seconds",
    "status",
    "offset",
    "blob",
    "bytes",
    "blobs",
    "error",
)


def fields(**values: Any) -> dict[str, Any]:
    """`log.info("...", extra=fields(lockfile_hash=h, sequence=n))`: names checked here."""
    unknown = set(values) - set(FIELDS)
    if unknown:  # pragma: no cover - a programming error, caught by any test that logs it
        raise ValueError(f"unknown log fields {sorted(unknown)}; add them to shared.logs.FIELDS")
    return values


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, logger, message, FIELDS, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = _plain(value)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created * 1000) % 1000:03d}Z"


def _plain(value: object) -> object:
    if isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def setup_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once, for a CLI process (replaces earlier handlers)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_spk_cli", False)]
    if len(ours) < len(root.handlers):
        return  # configured by someone else (pytest, an embedding program): as basicConfig
    for old in ours:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    text = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    handler._spk_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request's full URL at INFO and httpcore every step at DEBUG: the query
    # of a presigned blob URL is a bearer secret, and the steps are noise. Our own code logs
    # what an operator needs (the host, the outcome).
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python warnings (RuntimeWarning from a library, say) go through logging too, so they are
    # one JSON line like everything else rather than a raw dump on stderr.
    logging.captureWarnings(True)

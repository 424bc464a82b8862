"""One function that takes secrets out of text before it leaves the build pod. Pure, except for
the process-wide list of literal secrets that ``remember`` fills.

Everything a user can read comes from a few sinks: the report (its reason, in the result
ConfigMap, the report file and, through the operator, status, conditions and Events), the
progress line, and the log (which is also the pod's termination message, as the Job uses
``FallbackToLogsOnError``). Libraries put whatever they like into exception text: an HTTP
client that refuses a header value with a newline in it echoes the whole ``Authorization``
header. So redaction is not left to each place that formats a message: every sink calls
``redact`` on what it is about to write, and the log handler's formatter does the same for
every line, tracebacks included.

What is removed: the literal values handed to ``remember`` (the hub token, raw and stripped),
and anything shaped like a credential whatever its origin: Hugging Face tokens (``hf_...``),
``Bearer ...`` values, and the value of an ``Authorization`` header.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback

MASK = "[redacted]"

_MIN_SECRET = 4
"""Shorter literal values are not remembered: masking every ``abc`` would garble messages, and a
token that short is no secret worth the name (the patterns below still apply)."""

_PATTERNS = (
    # Hugging Face user and organisation tokens: hf_ and api_org_ followed by 30-odd letters.
    re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{8,}"),
    # HTTP bearer credentials wherever they are printed: headers, dict reprs, curl lines.
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{4,}"),
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+(?:\s+[^'\"\s,}]+)?"),
)

_lock = threading.Lock()
_secrets: set[str] = set()


def remember(value: str | None) -> None:
    """Mask ``value`` (and its stripped form, and each of its lines) wherever it appears later."""
    if not value:
        return
    forms = {value, value.strip(), *(line.strip() for line in value.splitlines())}
    with _lock:
        _secrets.update(f for f in forms if len(f) >= _MIN_SECRET)


def forget_all() -> None:
    """For tests: drop the remembered values."""
    with _lock:
        _secrets.clear()


def redact(text: str) -> str:
    """``text`` with every remembered secret and every credential-shaped word masked."""
    if not text:
        return text
    with _lock:
        literals = sorted(_secrets, key=len, reverse=True)  # the longest first: no half-masked token
    for secret in literals:
        text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        # A pattern with a group keeps it (the header name) and masks what follows.
        text = pattern.sub(lambda m: (m.group(1) if m.re.groups else "") + MASK, text)
    return text


class Formatter(logging.Formatter):
    """A log formatter whose output, message, arguments and traceback alike, is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install(root: logging.Logger | None = None) -> None:
    """Redact every log record where it is made (a record factory), so that a library's own
    handler that does not propagate (modelscope_hub and transformers add one) writes no secret
    either; and put the redacting formatter on every handler of ``root`` (the root logger by
    default), keeping each handler's format string."""
    _redact_records()
    logger = root or logging.getLogger()
    for handler in logger.handlers:
        current = handler.formatter
        fmt = current._fmt if current is not None else None  # the only way to copy it
        datefmt = current.datefmt if current is not None else None
        handler.setFormatter(Formatter(fmt, datefmt))


def _redact_records() -> None:
    """Wrap the process's log-record factory once: each new record carries its message, and its
    traceback, already redacted."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacting(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: the handler reports it
            return record
        if (clean := redact(message)) != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            # Formatters print exc_text when it is set: the traceback, redacted, in its place.
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info))).rstrip("\n")
        return record

    redacting.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)

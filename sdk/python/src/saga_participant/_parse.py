"""Parsing and checking a command message; anything off is a :class:`MalformedCommand`."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any, Mapping

from . import _json
from ._types import Command, MalformedCommand

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _uuid(body: Mapping[str, Any], name: str) -> uuid.UUID:
    value = body.get(name)
    if not isinstance(value, str):
        raise MalformedCommand(f"field {name!r} is missing or not a string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise MalformedCommand(f"field {name!r} is not a UUID: {value[:64]!r}") from None


def _str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedCommand(f"field {name!r} is missing or not a non-empty string")
    return value


def _int(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedCommand(f"field {name!r} is missing or not a non-negative integer")
    return value


def _header_str(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def parse_command(
    body: bytes,
    *,
    message_id: str | None,
    headers: Mapping[str, Any] | None,
    timestamp: datetime | None = None,
    redelivered: bool = False,
) -> Command:
    """Builds a :class:`Command` from a message, or raises :class:`MalformedCommand` saying why."""
    try:
        parsed = _json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedCommand(f"the body is not JSON: {str(e)[:200]}") from None
    if not isinstance(parsed, dict):
        raise MalformedCommand("the body is not a JSON object")
    command_id = _uuid(parsed, "command_id")
    if message_id is not None and message_id != str(command_id):
        try:
            same = uuid.UUID(message_id) == command_id
        except ValueError:
            same = False
        if not same:
            # De-duplication keys on the command id: a message whose two ids disagree cannot be
            # de-duplicated safely.
            raise MalformedCommand(
                f"message_id {message_id[:64]!r} differs from the body's command_id {command_id}"
            )
    kind = _str(parsed, "kind")
    if kind not in ("action", "compensation"):
        raise MalformedCommand(f"field 'kind' is {kind[:64]!r}, not 'action' or 'compensation'")
    if "input" not in parsed:
        raise MalformedCommand("field 'input' is missing")
    outputs = parsed.get("outputs")
    if outputs is None:
        outputs = {}
    if not isinstance(outputs, dict):
        raise MalformedCommand("field 'outputs' is not a JSON object")
    headers = dict(headers or {})
    traceparent = _header_str(headers, "traceparent")
    if traceparent is not None and not _TRACEPARENT.match(traceparent):
        traceparent = None
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=timezone.utc)
    return Command(
        command_id=command_id,
        saga_id=_uuid(parsed, "saga_id"),
        definition=_str(parsed, "definition"),
        definition_version=_int(parsed, "definition_version"),
        step=_str(parsed, "step"),
        kind=kind,  # type: ignore[arg-type]
        command=_str(parsed, "command"),
        attempt=_int(parsed, "attempt"),
        input=parsed["input"],
        outputs=outputs,
        traceparent=traceparent,
        timestamp=timestamp,
        headers=headers,
        redelivered=redelivered,
    )


def child_traceparent(traceparent: str | None) -> str | None:
    """The context of the span that handles a command: the command's trace, a new span id."""
    if traceparent is None:
        return None
    m = _TRACEPARENT.match(traceparent)
    if m is None:
        return None
    version, trace_id, _parent, flags = m.groups()
    span_id = uuid.uuid4().hex[:16]
    if span_id == "0" * 16:
        span_id = "0" * 15 + "1"
    return f"{version}-{trace_id}-{span_id}-{flags}"

"""Command parsing and exact JSON, without servers."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest

from saga_participant import MalformedCommand, parse_command
from saga_participant import _json
from saga_participant._parse import child_traceparent

GOOD = {
    "command_id": "0190f5a4-6a5e-7d3c-9a0e-1b2c3d4e5f60",
    "saga_id": "0190f5a4-6a40-7c11-8f00-aabbccddeeff",
    "definition": "order_fulfillment",
    "definition_version": 1,
    "step": "authorize_payment",
    "kind": "action",
    "command": "authorize_payment",
    "attempt": 1,
    "input": {"order_id": "A-1001", "amount": 1.00000000000000000001, "big": 0},
    "outputs": {"create_order": {"order_ref": "ord-17"}},
}


def body(**changes: object) -> bytes:
    text = json.dumps({**GOOD, **changes})
    # Exact numbers as sagad sends them.
    return text.replace('"big": 0', '"big": 123456789012345678901234567890').replace(
        "1.0,", "1.00000000000000000001,"
    ).encode()


def test_a_command_parses_with_exact_numbers() -> None:
    c = parse_command(body(), message_id=GOOD["command_id"], headers={"traceparent": b"x"})
    assert c.command_id == uuid.UUID(str(GOOD["command_id"]))
    assert (c.kind, c.step, c.attempt, c.definition_version) == ("action", "authorize_payment", 1, 1)
    assert c.input["amount"] == Decimal("1.00000000000000000001")
    assert c.input["big"] == 123456789012345678901234567890
    assert c.outputs == {"create_order": {"order_ref": "ord-17"}}
    assert c.traceparent is None  # not a valid traceparent
    assert _json.dumps(c.input) == (
        '{"order_id":"A-1001","amount":1.00000000000000000001,"big":123456789012345678901234567890}'
    )


@pytest.mark.parametrize(
    "raw, message_id, why",
    [
        (b"{nope", None, "not JSON"),
        (b"[]", None, "not a JSON object"),
        (body(command_id="x"), None, "not a UUID"),
        (body(kind="undo"), None, "'kind'"),
        (body(attempt=True), None, "'attempt'"),
        (body(attempt=-1), None, "'attempt'"),
        (body(step=""), None, "'step'"),
        (body(outputs=[1]), None, "'outputs'"),
        (body(), "0190f5a4-0000-7000-8000-000000000000", "differs"),
        (b"\xff", None, "not JSON"),
    ],
)
def test_malformed_commands_say_why(raw: bytes, message_id: str | None, why: str) -> None:
    with pytest.raises(MalformedCommand, match=why):
        parse_command(raw, message_id=message_id, headers=None)


def test_json_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError):
        _json.dumps({"x": Decimal("NaN")})
    with pytest.raises(TypeError):
        _json.dumps({"x": object()})
    assert _json.dumps([None, True, 1.5, "é"]) == '[null,true,1.5,"\\u00e9"]'


def test_the_reply_span_continues_the_trace() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    child = child_traceparent(parent)
    assert child is not None and child.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert child.endswith("-01") and child != parent
    assert child_traceparent(None) is None and child_traceparent("garbage") is None

"""The shop participants (tests/shop.py) on saga_participant, against the real sagad, PostgreSQL
and RabbitMQ. Every assertion is on the participants' own database or on the saga as sagad
recorded it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from conftest import Env, Sagad, poll

SHOP = str(Path(__file__).parent / "shop.py")


def attempts_of(saga: dict[str, Any], step: str, kind: str = "action") -> list[dict[str, Any]]:
    return [a for a in saga["attempts"] if a["step"] == step and a["kind"] == kind]


async def effects(env: Env, saga_id: str) -> dict[str, int]:
    rows = await env.rows(
        "SELECT command, count(*) FROM effect_log WHERE saga_id = %s GROUP BY command", saga_id
    )
    return {command: count for command, count in rows}


async def test_sagas_complete_and_compensate_with_python_participants(
    env: Env, sagad: Sagad, shop_factory: Any
) -> None:
    await shop_factory()
    ok = await sagad.start(
        "order_fulfillment",
        {"order_id": "A-1", "amount_cents": 4200, "raise_once": "authorize_payment"},
    )
    failed = await sagad.start(
        "order_fulfillment", {"order_id": "A-2", "amount_cents": 10, "fail_at": "schedule_delivery"}
    )
    saga = await sagad.wait_status(ok, "completed")
    assert await env.rows("SELECT order_id, state FROM orders WHERE saga_id = %s", ok) == [
        ("A-1", "approved")
    ]
    assert await env.rows("SELECT amount_cents, state FROM payments WHERE saga_id = %s", ok) == [
        (4200, "authorized")
    ]
    assert await env.rows("SELECT state FROM deliveries WHERE saga_id = %s", ok) == [
        ("scheduled",)
    ]
    # The handler that raised on its first attempt applied nothing then: one effect each.
    assert await effects(env, ok) == {
        "create_order": 1, "authorize_payment": 1, "schedule_delivery": 1, "approve_order": 1,
    }
    pay = attempts_of(saga, "authorize_payment")
    assert [a["outcome"] for a in pay] == ["failure", "success"]
    assert "bad day" in pay[0]["reason"]
    assert pay[1]["output"] == {"authorization": f"auth-{ok.replace('-', '')[:8]}"}
    # Outputs travel to later commands: approve_order read create_order's.
    assert attempts_of(saga, "approve_order")[0]["output"] == {
        "approved_ref": f"ord-{ok.replace('-', '')[:8]}"
    }

    await sagad.wait_status(failed, "compensated")
    assert await env.rows("SELECT state FROM orders WHERE saga_id = %s", failed) == [
        ("cancelled",)
    ]
    assert await env.rows("SELECT state FROM payments WHERE saga_id = %s", failed) == [
        ("refunded",)
    ]
    assert await env.rows("SELECT * FROM deliveries WHERE saga_id = %s", failed) == []
    assert await effects(env, failed) == {
        "create_order": 1, "authorize_payment": 1, "refund_payment": 1, "cancel_order": 1,
    }
    steps = await env.rows(
        "SELECT step, state, tombstone FROM saga_barrier_steps WHERE saga_id = %s ORDER BY step",
        failed,
    )
    assert steps == [
        ("authorize_payment", "compensated", False),
        ("create_order", "compensated", False),
    ]


async def _get(queue: aio_pika.abc.AbstractQueue, what: str) -> aio_pika.abc.AbstractIncomingMessage:
    async def check() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(no_ack=False, fail=False)

    return await poll(what, check, timeout=30)


def _copy(message: aio_pika.abc.AbstractIncomingMessage, **changes: Any) -> aio_pika.Message:
    props: dict[str, Any] = dict(
        body=message.body,
        headers=dict(message.headers or {}),
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        reply_to=message.reply_to,
        type=message.type,
        timestamp=message.timestamp,
    )
    props.update(changes)
    return aio_pika.Message(**props)


async def test_a_command_delivered_twice_is_applied_once_and_gets_the_same_reply(
    env: Env, sagad: Sagad, shop_factory: Any
) -> None:
    connection = await aio_pika.connect(env.amqp_url)
    async with connection:
        ch = await connection.channel()
        # A tap: a second queue bound like the payment queue gets a copy of every command.
        tap = await ch.declare_queue("test.tap.payment", exclusive=True)
        await tap.bind("saga.commands", routing_key="payment")
        replies = await ch.declare_queue("test.replies", exclusive=True)
        await shop_factory()
        saga_id = await sagad.start("order_fulfillment", {"order_id": "A-3", "amount_cents": 99})
        saga = await sagad.wait_status(saga_id, "completed")
        command = await _get(tap, "the tapped authorize_payment command")
        recorded = attempts_of(saga, "authorize_payment")[0]
        assert command.message_id == recorded["command_id"]

        # The same command again, three times, two of them at once; answers to our own queue.
        for copies in (1, 2):
            await asyncio.gather(*(
                ch.default_exchange.publish(
                    _copy(command, reply_to=replies.name), routing_key="saga.participant.payment"
                )
                for _ in range(copies)
            ))
        answers = [await _get(replies, f"reply {i + 1} to the duplicate") for i in range(3)]
        for answer in answers:
            assert answer.correlation_id == command.message_id
            assert json.loads(answer.body) == {
                "command_id": command.message_id,
                "outcome": "success",
                "output": recorded["output"],
            }
            await answer.ack()
        await command.ack()

    assert await effects(env, saga_id) == {
        "create_order": 1, "authorize_payment": 1, "schedule_delivery": 1, "approve_order": 1,
    }
    assert await env.rows("SELECT state FROM payments WHERE saga_id = %s", saga_id) == [
        ("authorized",)
    ]
    assert await env.rows(
        "SELECT deliveries FROM saga_barrier_commands WHERE command_id = %s", command.message_id
    ) == [(4,)]
    # sagad saw one answer per attempt: nothing changed there.
    saga = await sagad.show(saga_id)
    assert saga["status"] == "completed" and len(attempts_of(saga, "authorize_payment")) == 1


OVERTAKE = """
name = "overtake"
version = 1

[defaults]
timeout = "500ms"
retry = { max_attempts = 1, initial_backoff = "50ms", max_backoff = "100ms" }

[[steps]]
name = "create_order"
participant = "order"
action = "create_order"
compensation = "cancel_order"
"""


@pytest.fixture
def overtake(definitions: Path) -> Path:
    (definitions / "overtake.toml").write_text(OVERTAKE)
    return definitions


async def test_a_compensation_that_overtakes_its_action_blocks_the_late_action(
    env: Env, overtake: Path, sagad: Sagad, shop_factory: Any
) -> None:
    connection = await aio_pika.connect(env.amqp_url)
    async with connection:
        ch = await connection.channel()
        queue = await ch.get_queue("saga.participant.order")
        saga_id = await sagad.start("overtake", {"order_id": "A-4"})
        # Nobody serves the order queue yet: the action times out, the saga compensates the
        # step, and both commands wait in the queue, the action first.
        action = await _get(queue, "the create_order command")
        compensation = await _get(queue, "the cancel_order command")
        assert json.loads(action.body)["kind"] == "action"
        assert json.loads(compensation.body)["kind"] == "compensation"
        # Swap them: the compensation arrives first.
        for message in (compensation, action):
            await ch.default_exchange.publish(_copy(message), routing_key=queue.name)
        await compensation.ack()
        await action.ack()

    # One command at a time, so they are handled in the order they arrive.
    await shop_factory(prefetch=1)
    await sagad.wait_status(saga_id, "compensated")

    async def action_answered() -> Any:
        rows = await env.rows(
            "SELECT reply FROM saga_barrier_commands WHERE command_id = %s AND reply IS NOT NULL",
            action.message_id,
        )
        return rows[0][0] if rows else None

    reply = await poll("the late action to be answered", action_answered)
    assert reply["outcome"] == "failure" and reply["retryable"] is False
    assert "already compensated" in reply["reason"]
    assert await env.rows("SELECT * FROM orders WHERE saga_id = %s", saga_id) == []
    assert await effects(env, saga_id) == {}
    assert await env.rows(
        "SELECT state, tombstone, action_command_id FROM saga_barrier_steps WHERE saga_id = %s",
        saga_id,
    ) == [("compensated", True, None)]

    # sagad recorded the late answer on the timed-out attempt.
    async def late_reply() -> Any:
        saga = await sagad.show(saga_id)
        first = attempts_of(saga, "create_order")[0]
        return first if first["outcome"] == "failure" else None

    first = await poll("sagad to record the late reply", late_reply)
    assert first["timed_out"] and "already compensated" in first["reason"]


async def test_a_participant_killed_between_commit_and_ack_applies_the_effect_once(
    env: Env, sagad: Sagad, tmp_path: Path
) -> None:
    marker = tmp_path / "killed"
    child_env = {
        **os.environ,
        "SHOP_KILL_AFTER_COMMIT": "authorize_payment",
        "SHOP_KILL_MARKER": str(marker),
    }

    def spawn(log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, SHOP, env.amqp_url, env.shop_url],
            env=child_env,
            stdout=open(tmp_path / log, "wb"),
            stderr=subprocess.STDOUT,
        )

    first = spawn("shop-1.log")
    try:
        saga_id = await sagad.start("order_fulfillment", {"order_id": "A-5", "amount_cents": 7})

        async def died() -> int | None:
            return first.poll()

        assert await poll("the participant to kill itself", died) == -signal.SIGKILL
        command_id = marker.read_text()
        # The payment committed; the reply never left and the command was not acked.
        assert await env.rows("SELECT state FROM payments WHERE saga_id = %s", saga_id) == [
            ("authorized",)
        ]
        assert await env.rows(
            "SELECT deliveries FROM saga_barrier_commands WHERE command_id = %s", command_id
        ) == [(1,)]
        assert (await sagad.show(saga_id))["status"] == "running"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    second = spawn("shop-2.log")
    try:
        saga = await sagad.wait_status(saga_id, "completed")
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()
    assert second.returncode == 0, (tmp_path / "shop-2.log").read_text()
    # Redelivered, answered with the stored reply, applied once.
    assert await env.rows(
        "SELECT deliveries, reply->>'outcome' FROM saga_barrier_commands WHERE command_id = %s",
        command_id,
    ) == [(2, "success")]
    assert await effects(env, saga_id) == {
        "create_order": 1, "authorize_payment": 1, "schedule_delivery": 1, "approve_order": 1,
    }
    pay = attempts_of(saga, "authorize_payment")
    assert [(a["command_id"], a["outcome"]) for a in pay] == [(command_id, "success")]


async def test_malformed_commands_go_to_the_dead_letter_queue(
    env: Env, sagad: Sagad, shop_factory: Any
) -> None:
    await shop_factory()
    connection = await aio_pika.connect(env.amqp_url)
    async with connection:
        ch = await connection.channel()
        dead = await ch.get_queue("saga.dead-letter")
        good = {
            "command_id": "0190f5a4-6a5e-7d3c-9a0e-1b2c3d4e5f60",
            "saga_id": "0190f5a4-6a40-7c11-8f00-aabbccddeeff",
            "definition": "order_fulfillment", "definition_version": 1,
            "step": "create_order", "kind": "action", "command": "create_order",
            "attempt": 1, "input": {}, "outputs": {},
        }
        bad = [
            (b"{not json", None),
            (json.dumps({**good, "command_id": "not-a-uuid"}).encode(), None),
            (json.dumps({k: v for k, v in good.items() if k != "saga_id"}).encode(), None),
            (json.dumps({**good, "kind": "undo"}).encode(), None),
            # The body's id and the message id disagree: cannot be de-duplicated safely.
            (json.dumps(good).encode(), "0190f5a4-0000-7000-8000-000000000000"),
        ]
        for body, message_id in bad:
            await ch.default_exchange.publish(
                aio_pika.Message(body, message_id=message_id, reply_to="saga.replies"),
                routing_key="saga.participant.order",
            )
        got = [await _get(dead, f"dead letter {i + 1}") for i in range(len(bad))]
        assert sorted(m.body for m in got) == sorted(body for body, _ in bad)
        for m in got:
            death = (m.headers or {})["x-death"][0]
            assert death["reason"] == "rejected" and death["queue"] == "saga.participant.order"
            await m.ack()

    # Nothing was applied or recorded, and the participants still serve sagas.
    assert await env.rows("SELECT count(*) FROM saga_barrier_commands") == [(0,)]
    saga_id = await sagad.start("order_fulfillment", {"order_id": "A-6"})
    await sagad.wait_status(saga_id, "completed")
    assert await env.rows("SELECT count(*) FROM orders") == [(1,)]

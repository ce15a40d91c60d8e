"""The barrier's rules, one scenario each, with the test kit (saga_participant.testing) playing
the orchestrator against a participant on a real vhost and database (no sagad needed)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any, AsyncIterator

import aio_pika
import psycopg
import pytest

from conftest import Env, poll
from saga_participant import Command, Failure, Participant, Success, transient
from saga_participant.testing import CommandKit

Conn = psycopg.AsyncConnection[Any]


class Bank:
    """A payment participant: one row per saga in `payments`."""

    def __init__(self, env: Env, **options: Any) -> None:
        self.env = env
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        p = self.participant = Participant(
            "payment", amqp_url=env.amqp_url, database_url=env.shop_url, **options
        )

        @p.action("authorize_payment")
        async def authorize(cmd: Command, conn: Conn) -> Success | Failure:
            await conn.execute(
                "INSERT INTO payments (saga_id, amount, state) VALUES (%s, %s, 'authorized')",
                (cmd.saga_id, cmd.input.get("amount")),
            )
            self.entered.set()
            if self.gate is not None:
                await self.gate.wait()
            if cmd.input.get("explode"):
                raise RuntimeError("the card network is down")
            if cmd.input.get("amount", 0) > 1000:
                return Failure("amount over the limit")
            if cmd.input.get("busy"):
                return transient("try again later")
            return Success({"authorization": f"auth-{cmd.saga_id.hex[:8]}",
                            "amount": cmd.input.get("amount")})

        @p.compensation("refund_payment")
        async def refund(cmd: Command, conn: Conn) -> Success | Failure:
            await conn.execute(
                "UPDATE payments SET state = 'refunded' WHERE saga_id = %s", (cmd.saga_id,)
            )
            return Success({"refunded": True})

    async def payments(self, saga_id: Any) -> list[tuple[Any, ...]]:
        return await self.env.rows(
            "SELECT amount, state FROM payments WHERE saga_id = %s", saga_id
        )


@pytest.fixture
async def bank(env: Env) -> AsyncIterator[Bank]:
    async with await psycopg.AsyncConnection.connect(env.shop_url, autocommit=True) as c:
        await c.execute(
            "CREATE TABLE payments (saga_id uuid PRIMARY KEY, amount numeric, state text NOT NULL)"
        )
    b = Bank(env)
    task = asyncio.create_task(b.participant.run())
    await asyncio.wait_for(b.participant.wait_ready(), 30)
    yield b
    b.participant.stop()
    await asyncio.wait_for(task, 30)


async def test_duplicates_retries_and_compensations(env: Env, bank: Bank) -> None:
    async with CommandKit(env.amqp_url, "payment") as kit:
        amount = Decimal("12.345678901234567890123")
        cmd = kit.command("authorize_payment", input={"amount": amount})
        await kit.send(cmd)
        await kit.send(cmd)
        first, again = await kit.reply(cmd), await kit.reply(cmd)
        assert first == again == {
            "command_id": str(cmd.command_id),
            "outcome": "success",
            "output": {"authorization": f"auth-{cmd.saga_id.hex[:8]}", "amount": amount},
        }
        # A retry of an applied step (new command id) gets the same output, applies nothing.
        retry = cmd.retry()
        await kit.send(retry)
        assert (await kit.reply(retry))["output"] == first["output"]
        assert await bank.payments(cmd.saga_id) == [(amount, "authorized")]

        # Compensated, then a late attempt of the action: blocked.
        undo = kit.command("refund_payment", saga_id=cmd.saga_id, step="authorize_payment",
                           kind="compensation")
        await kit.send(undo)
        assert (await kit.reply(undo))["output"] == {"refunded": True}
        late = retry.retry()
        await kit.send(late)
        blocked = await kit.reply(late)
        assert blocked["outcome"] == "failure" and "already compensated" in blocked["reason"]
        assert await bank.payments(cmd.saga_id) == [(amount, "refunded")]

        # A compensation before any action: a tombstone, and the action never applies.
        early = kit.command("refund_payment", step="authorize_payment", kind="compensation")
        await kit.send(early)
        assert await kit.reply(early) == {
            "command_id": str(early.command_id), "outcome": "success", "output": None,
        }
        action = kit.command("authorize_payment", saga_id=early.saga_id, input={"amount": 5})
        await kit.send(action)
        assert (await kit.reply(action))["outcome"] == "failure"
        assert await bank.payments(early.saga_id) == []


async def test_failures_roll_the_handlers_work_back(env: Env, bank: Bank) -> None:
    async with CommandKit(env.amqp_url, "payment") as kit:
        final = kit.command("authorize_payment", input={"amount": 5000})
        busy = kit.command("authorize_payment", input={"amount": 5, "busy": True})
        boom = kit.command("authorize_payment", input={"amount": 5, "explode": True})
        unknown = kit.command("capture_payment")
        for c in (final, busy, boom, unknown):
            await kit.send(c)
        assert await kit.reply(final) == {
            "command_id": str(final.command_id), "outcome": "failure",
            "reason": "amount over the limit", "retryable": False,
        }
        assert (await kit.reply(busy))["retryable"] is True
        exploded = await kit.reply(boom)
        assert exploded["retryable"] is True and "card network is down" in exploded["reason"]
        refused = await kit.reply(unknown)
        assert refused["retryable"] is False and "capture_payment" in refused["reason"]
        # Each handler inserted its row before failing: all rolled back.
        assert await env.rows("SELECT count(*) FROM payments") == [(0,)]
        # The step was not applied, so a retry that succeeds applies it.
        retry = boom.with_(input={"amount": 5}).retry()
        await kit.send(retry)
        assert (await kit.reply(retry))["outcome"] == "success"
        assert await bank.payments(boom.saga_id) == [(5, "authorized")]


async def test_the_reply_continues_the_trace_and_answers_the_command_id(
    env: Env, bank: Bank
) -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    async with CommandKit(env.amqp_url, "payment") as kit:
        cmd = kit.command("authorize_payment", input={"amount": 1},
                          traceparent=f"00-{trace}-b7ad6b7169203331-01")
        await kit.send(cmd)
        message = await kit.reply_message(str(cmd.command_id))
        assert message.correlation_id == str(cmd.command_id)
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        version, trace_id, span, flags = str((message.headers or {})["traceparent"]).split("-")
        assert (version, trace_id, flags) == ("00", trace, "01") and span != "b7ad6b7169203331"


async def test_malformed_commands_are_dead_lettered_and_the_rest_served(
    env: Env, bank: Bank
) -> None:
    async with CommandKit(env.amqp_url, "payment") as kit:
        await kit.send_raw(b"[1, 2")
        dead = await kit.dead_letter()
        assert dead.body == b"[1, 2"
        assert (dead.headers or {})["x-death"][0]["reason"] == "rejected"
        cmd = kit.command("authorize_payment", input={"amount": 3})
        await kit.send(cmd)
        assert (await kit.reply(cmd))["outcome"] == "success"


async def test_stop_finishes_the_commands_in_flight_then_stops_consuming(env: Env) -> None:
    async with await psycopg.AsyncConnection.connect(env.shop_url, autocommit=True) as c:
        await c.execute(
            "CREATE TABLE payments (saga_id uuid PRIMARY KEY, amount numeric, state text NOT NULL)"
        )
    b = Bank(env)
    b.gate = asyncio.Event()
    run = asyncio.create_task(b.participant.run())
    await asyncio.wait_for(b.participant.wait_ready(), 30)
    async with CommandKit(env.amqp_url, "payment") as kit:
        busy = kit.command("authorize_payment", input={"amount": 1})
        await kit.send(busy)
        await asyncio.wait_for(b.entered.wait(), 10)
        b.participant.stop()

        connection = await aio_pika.connect(env.amqp_url)
        async with connection:
            ch = await connection.channel()

            async def consumers_gone() -> bool:
                q = await ch.declare_queue("saga.participant.payment", passive=True)
                return q.declaration_result.consumer_count == 0

            await poll("the participant to stop consuming", consumers_gone)
            after = kit.command("authorize_payment", input={"amount": 2})
            await kit.send(after)
            b.gate.set()
            await asyncio.wait_for(run, 30)
            # The command in flight was finished and answered; the later one waits its turn.
            assert (await kit.reply(busy))["outcome"] == "success"
            assert await b.payments(busy.saga_id) == [(1, "authorized")]
            q = await ch.declare_queue("saga.participant.payment", passive=True)
            assert q.declaration_result.message_count == 1
            assert await b.payments(after.saga_id) == []


async def test_the_guide_example_runs(env: Env) -> None:
    import importlib.util
    import os
    from pathlib import Path

    async with await psycopg.AsyncConnection.connect(env.shop_url, autocommit=True) as c:
        await c.execute(
            "CREATE TABLE payments (saga_id uuid PRIMARY KEY, amount_cents bigint, state text)"
        )
    path = Path(__file__).parents[1] / "examples" / "payment.py"
    os.environ["AMQP_URL"], os.environ["DATABASE_URL"] = env.amqp_url, env.shop_url
    try:
        spec = importlib.util.spec_from_file_location("guide_payment", path)
        assert spec is not None and spec.loader is not None
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
    finally:
        del os.environ["AMQP_URL"], os.environ["DATABASE_URL"]
    participant: Participant = example.payment
    task = asyncio.create_task(participant.run())
    try:
        await asyncio.wait_for(participant.wait_ready(), 30)
        async with CommandKit(env.amqp_url, "payment") as kit:
            pay = kit.command("authorize_payment", input={"amount_cents": 4200})
            await kit.send(pay)
            assert (await kit.reply(pay))["outcome"] == "success"
            undo = pay.with_(command_id=pay.retry().command_id, command="refund_payment",
                             kind="compensation", step="authorize_payment")
            await kit.send(undo)
            assert (await kit.reply(undo))["outcome"] == "success"
        assert await env.rows("SELECT amount_cents, state FROM payments") == [(4200, "refunded")]
    finally:
        participant.stop()
        await asyncio.wait_for(task, 30)


async def test_a_handler_that_swallows_a_database_error_is_a_transient_failure(env: Env) -> None:
    async with await psycopg.AsyncConnection.connect(env.shop_url, autocommit=True) as c:
        await c.execute("CREATE TABLE notes (saga_id uuid PRIMARY KEY)")
    p = Participant("notes", amqp_url=env.amqp_url, database_url=env.shop_url)

    @p.action("note")
    async def note(cmd: Command, conn: Conn) -> Success:
        await conn.execute("INSERT INTO notes VALUES (%s)", (cmd.saga_id,))
        try:
            await conn.execute("SELECT 1/0")
        except psycopg.Error:
            pass  # the transaction is failed now; returning success cannot commit it
        return Success()

    task = asyncio.create_task(p.run())
    try:
        await asyncio.wait_for(p.wait_ready(), 30)
        async with CommandKit(env.amqp_url, "notes") as kit:
            cmd = kit.command("note")
            await kit.send(cmd)
            reply = await kit.reply(cmd)
            assert reply["retryable"] is True and "transaction failed" in reply["reason"]
        assert await env.rows("SELECT count(*) FROM notes") == [(0,)]
    finally:
        p.stop()
        await asyncio.wait_for(task, 30)


def _close_connections(vhost: str) -> int:
    """Closes every client connection of ``vhost`` (only that vhost's), as a broker restart
    would."""
    import subprocess

    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "vhost", "pid"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    pids = [line.split("\t", 1)[1] for line in listed if line.split("\t", 1)[0] == vhost]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: broker restart"],
                       capture_output=True, check=True)
    return len(pids)


async def test_the_participant_reconnects_after_losing_the_broker(env: Env, bank: Bank) -> None:
    assert await asyncio.to_thread(_close_connections, env.vhost) >= 1

    async def served_again() -> bool:
        try:
            async with CommandKit(env.amqp_url, "payment") as kit:
                cmd = kit.command("authorize_payment", input={"amount": 4})
                await kit.send(cmd)
                return (await kit.reply(cmd, timeout=5))["outcome"] == "success"
        except TimeoutError:
            return False

    assert await poll("the participant to serve commands again", served_again, timeout=60)

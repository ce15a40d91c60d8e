"""The order, payment and delivery services of sagas/order_fulfillment.toml, written on
saga_participant, each with its own table in one database. Used by the tests in-process, and as
a separate process (``python shop.py AMQP_URL DATABASE_URL``) by the crash test.

A saga input may ask for failures: ``"fail_at": "authorize_payment"`` (a final failure) or
``"raise_once": "authorize_payment"`` (the handler raises on the first attempt: a transient
failure, then the retry succeeds). Setting ``SHOP_KILL_AFTER_COMMIT=<command>`` and
``SHOP_KILL_MARKER=<path>`` makes the process SIGKILL itself once, after that command's
transaction committed and before its reply is published.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import psycopg

from saga_participant import Command, Failure, Participant, Success

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    saga_id uuid PRIMARY KEY, order_id text, state text NOT NULL, changes int NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS payments (
    saga_id uuid PRIMARY KEY, amount_cents bigint, state text NOT NULL,
    changes int NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS deliveries (
    saga_id uuid PRIMARY KEY, state text NOT NULL, changes int NOT NULL DEFAULT 1);
-- Every effect applied, one row each: the tests count them.
CREATE TABLE IF NOT EXISTS effect_log (
    id bigserial PRIMARY KEY, saga_id uuid NOT NULL, command text NOT NULL, attempt int NOT NULL);
"""

Conn = psycopg.AsyncConnection[Any]


def _wants(cmd: Command, key: str) -> bool:
    value = cmd.input.get(key) if isinstance(cmd.input, dict) else None
    return value == cmd.command or (isinstance(value, list) and cmd.command in value)


async def _log(conn: Conn, cmd: Command) -> None:
    await conn.execute(
        "INSERT INTO effect_log (saga_id, command, attempt) VALUES (%s, %s, %s)",
        (cmd.saga_id, cmd.command, cmd.attempt),
    )


def _checks(cmd: Command) -> Failure | None:
    if _wants(cmd, "raise_once") and cmd.attempt == 1:
        raise RuntimeError(f"{cmd.command} is having a bad day")
    if _wants(cmd, "fail_at"):
        return Failure(f"injected failure at {cmd.command}")
    return None


def build(
    amqp_url: str, database_url: str, payment_options: dict[str, Any] | None = None, **options: Any
) -> list[Participant]:
    """The three participants; ``payment_options`` override ``options`` for the payment service
    (e.g. another broker user and replies over gRPC)."""
    order = Participant("order", amqp_url=amqp_url, database_url=database_url, **options)
    payment = Participant(
        "payment",
        **{"amqp_url": amqp_url, "database_url": database_url, **options,
           **(payment_options or {})},
    )
    delivery = Participant("delivery", amqp_url=amqp_url, database_url=database_url, **options)

    @order.action("create_order")
    async def create_order(cmd: Command, conn: Conn) -> Success | Failure:
        if (refused := _checks(cmd)) is not None:
            return refused
        await conn.execute(
            "INSERT INTO orders (saga_id, order_id, state) VALUES (%s, %s, 'created')",
            (cmd.saga_id, cmd.input.get("order_id")),
        )
        await _log(conn, cmd)
        return Success({"order_ref": f"ord-{cmd.saga_id.hex[:8]}"})

    @order.action("approve_order")
    async def approve_order(cmd: Command, conn: Conn) -> Success | Failure:
        if (refused := _checks(cmd)) is not None:
            return refused
        await conn.execute(
            "UPDATE orders SET state = 'approved', changes = changes + 1 WHERE saga_id = %s",
            (cmd.saga_id,),
        )
        await _log(conn, cmd)
        return Success({"approved_ref": cmd.outputs["create_order"]["order_ref"]})

    @order.compensation("cancel_order")
    async def cancel_order(cmd: Command, conn: Conn) -> Success | Failure:
        await conn.execute(
            "UPDATE orders SET state = 'cancelled', changes = changes + 1 WHERE saga_id = %s",
            (cmd.saga_id,),
        )
        await _log(conn, cmd)
        return Success({"cancelled": True})

    @payment.action("authorize_payment")
    async def authorize_payment(cmd: Command, conn: Conn) -> Success | Failure:
        if (refused := _checks(cmd)) is not None:
            return refused
        await conn.execute(
            "INSERT INTO payments (saga_id, amount_cents, state) VALUES (%s, %s, 'authorized')",
            (cmd.saga_id, cmd.input.get("amount_cents")),
        )
        await _log(conn, cmd)
        return Success({"authorization": f"auth-{cmd.saga_id.hex[:8]}"})

    @payment.compensation("refund_payment")
    async def refund_payment(cmd: Command, conn: Conn) -> Success | Failure:
        await conn.execute(
            "UPDATE payments SET state = 'refunded', changes = changes + 1 WHERE saga_id = %s",
            (cmd.saga_id,),
        )
        await _log(conn, cmd)
        return Success({"refunded": True})

    @delivery.action("schedule_delivery")
    async def schedule_delivery(cmd: Command, conn: Conn) -> Success | Failure:
        if (refused := _checks(cmd)) is not None:
            return refused
        await conn.execute(
            "INSERT INTO deliveries (saga_id, state) VALUES (%s, 'scheduled')", (cmd.saga_id,)
        )
        await _log(conn, cmd)
        return Success({"tracking": f"trk-{cmd.saga_id.hex[:8]}"})

    @delivery.compensation("cancel_delivery")
    async def cancel_delivery(cmd: Command, conn: Conn) -> Success | Failure:
        await conn.execute(
            "UPDATE deliveries SET state = 'cancelled', changes = changes + 1 WHERE saga_id = %s",
            (cmd.saga_id,),
        )
        await _log(conn, cmd)
        return Success({"cancelled": True})

    return [order, payment, delivery]


async def create_schema(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(SCHEMA.encode())


def _kill_after_commit(participants: list[Participant], command: str, marker: str) -> None:
    """Wraps the reply publication: the first time ``command``'s reply is about to go out (its
    transaction has committed), the process kills itself, leaving the command unacked."""
    for p in participants:
        original = p._publish_reply

        async def publish(publisher: Any, message: Any, cmd: Command, reply: str,
                          traceparent: str | None, _original: Any = original) -> None:
            if cmd.command == command and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(cmd.command_id))
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            await _original(publisher, message, cmd, reply, traceparent)

        p._publish_reply = publish  # type: ignore[method-assign]


async def main(amqp_url: str, database_url: str) -> None:
    await create_schema(database_url)
    participants = build(amqp_url, database_url, prefetch=8)
    kill = os.environ.get("SHOP_KILL_AFTER_COMMIT")
    if kill:
        _kill_after_commit(participants, kill, os.environ["SHOP_KILL_MARKER"])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [p.stop() for p in participants])
    runs = [asyncio.create_task(p.run()) for p in participants]
    await asyncio.gather(*(p.wait_ready() for p in participants))
    print("ready", flush=True)
    await asyncio.gather(*runs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2]))

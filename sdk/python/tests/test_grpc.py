"""Replies over sagad's gRPC API (``reply_via_grpc``), against the real sagad with a tokens file:
a payment service whose RabbitMQ user may consume its queue and nothing else, reporting with a
token bound to the payment participant."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aio_pika
import pytest

from conftest import Env, Sagad, poll
from saga_participant import GrpcReplies, Participant, Success
from saga_participant._grpc import Refused, Reporter
from saga_participant.testing import CommandKit
from test_sagas import attempts_of, effects

CHECKOUT_TOKEN = "checkout-token-0123456789"
PAYMENT_TOKEN = "payment-token-0123456789"
ORDER_TOKEN = "order-token-0123456789"
TOKENS = f"""
[[token]]
name = "checkout"
scope = "participant"
token = "{CHECKOUT_TOKEN}"

[[token]]
name = "payment-service"
scope = "participant"
token = "{PAYMENT_TOKEN}"
participants = ["payment"]

[[token]]
name = "order-service"
scope = "participant"
token = "{ORDER_TOKEN}"
participants = ["order"]
"""
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
GENERATED = Path(__file__).resolve().parents[1] / "src" / "saga_participant" / "_proto"


@pytest.fixture
async def sagad(env: Env, definitions: Path, tmp_path: Path) -> AsyncIterator[Sagad]:
    """sagad with participant tokens; sagactl uses the unbound one."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    s = Sagad(
        env, definitions, tmp_path / "sagad.log",
        extra_args=("--tokens-file", str(tokens)), token=CHECKOUT_TOKEN,
    )
    try:
        await s.wait_ready()
        yield s
    finally:
        s.stop()


def _rabbitmqctl(*args: str) -> None:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args}: {out.stderr.strip()}")


@pytest.fixture
def consume_only(env: Env) -> Iterator[str]:
    """The AMQP URL of a user that may consume the payment queue of the test's vhost and do
    nothing else: not publish (not even to the default exchange), not declare."""
    user = f"{env.name}_payment"
    _rabbitmqctl("add_user", user, "consume-only")
    try:
        _rabbitmqctl(
            "set_permissions", "-p", env.vhost, user, "^$", "^$", r"^saga\.participant\.payment$"
        )
        yield f"amqp://{user}:consume-only@127.0.0.1:5672/{env.vhost}"
    finally:
        _rabbitmqctl("delete_user", user)


def test_the_committed_grpc_code_is_what_the_proto_generates(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", SCRIPTS / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    gen_proto.generate(tmp_path)
    for name in gen_proto.FILES:
        assert (tmp_path / name).read_text() == (GENERATED / name).read_text(), (
            f"{name} is stale: run python sdk/python/scripts/gen_proto.py"
        )


async def test_a_participant_that_replies_over_grpc_takes_part_like_the_others(
    env: Env, sagad: Sagad, consume_only: str, shop_factory: Any
) -> None:
    # Were a reply published instead, the broker would close the payment service's channel
    # (ACCESS_REFUSED) and no payment step would complete.
    await shop_factory(payment_options={
        "amqp_url": consume_only,
        "declare_topology": False,
        "reply_via_grpc": GrpcReplies(sagad.server, token=PAYMENT_TOKEN),
    })
    ok = await sagad.start(
        "order_fulfillment",
        {"order_id": "G-1", "amount_cents": 4200, "raise_once": "authorize_payment"},
    )
    failed = await sagad.start(
        "order_fulfillment", {"order_id": "G-2", "amount_cents": 10, "fail_at": "schedule_delivery"}
    )
    saga = await sagad.wait_status(ok, "completed")
    pay = attempts_of(saga, "authorize_payment")
    # The transient failure went over gRPC too, retryable, with its reason.
    assert [a["outcome"] for a in pay] == ["failure", "success"]
    assert "bad day" in pay[0]["reason"]
    assert pay[1]["output"] == {"authorization": f"auth-{ok.replace('-', '')[:8]}"}
    assert await env.rows("SELECT state FROM payments WHERE saga_id = %s", ok) == [
        ("authorized",)
    ]
    assert await effects(env, ok) == {
        "create_order": 1, "authorize_payment": 1, "schedule_delivery": 1, "approve_order": 1,
    }

    saga = await sagad.wait_status(failed, "compensated")
    refund = attempts_of(saga, "authorize_payment", "compensation")
    assert [a["outcome"] for a in refund] == ["success"]
    assert refund[0]["output"] == {"refunded": True}
    assert await env.rows("SELECT state FROM payments WHERE saga_id = %s", failed) == [
        ("refunded",)
    ]


async def test_sagad_refusing_a_report_for_good_acks_the_command_other_errors_requeue_it(
    env: Env, sagad: Sagad
) -> None:
    reporter = Reporter(GrpcReplies(sagad.server, token=PAYMENT_TOKEN))
    try:
        unknown = f'{{"command_id":"{uuid.uuid4()}","outcome":"success","output":null}}'
        with pytest.raises(Refused, match="NOT_FOUND"):
            await reporter.report(unknown, None)
    finally:
        await reporter.close()

    stored = "SELECT deliveries FROM saga_barrier_commands WHERE command_id = %s"

    async def serve(name: str, command: str, token: str) -> tuple[Participant, Any]:
        p = Participant(
            name, amqp_url=env.amqp_url, database_url=env.shop_url,
            reply_via_grpc=GrpcReplies(sagad.server, token=token), requeue_delay=0.05,
        )

        @p.action(command)
        async def handle(cmd: Any, conn: Any) -> Success:
            return Success({"ok": True})

        task = asyncio.create_task(p.run())
        await asyncio.wait_for(p.wait_ready(), timeout=30)
        return p, task

    # A command sagad never sent (the kit's): NOT_FOUND is final, so the command is acked.
    async with CommandKit(env.amqp_url, "payment") as kit:
        p, task = await serve("payment", "authorize_payment", PAYMENT_TOKEN)
        try:
            lost = kit.command("authorize_payment")
            await kit.send(lost)

            async def answered() -> Any:
                return await env.rows(stored, lost.command_id) or None

            assert await poll("the command to be handled", answered) == [(1,)]
        finally:
            p.stop()
            await task
    connection = await aio_pika.connect(env.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("saga.participant.payment", passive=True)
        assert queue.declaration_result.message_count == 0
    assert await env.rows(stored, lost.command_id) == [(1,)]

    # sagad's create_order command reported with a token bound to payment: PERMISSION_DENIED is
    # no final answer, so the command is requeued, and answered from the barrier each time.
    p, task = await serve("order", "create_order", PAYMENT_TOKEN)
    try:
        saga_id = await sagad.start("order_fulfillment", {"order_id": "G-3"})
        command_id = attempts_of(await sagad.show(saga_id), "create_order")[0]["command_id"]

        async def redelivered() -> Any:
            rows = await env.rows(stored, command_id)
            return rows if rows and rows[0][0] >= 3 else None

        await poll("the denied command to be requeued and redelivered", redelivered)
    finally:
        p.stop()
        await task
    saga = await sagad.show(saga_id)
    assert saga["status"] == "running" and attempts_of(saga, "create_order")[0]["outcome"] is None

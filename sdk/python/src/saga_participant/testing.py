"""A test kit: play the orchestrator's side of the contract against a running participant, on a
real RabbitMQ vhost, without ``sagad``. Commands are sent as ``sagad`` sends them; replies come
back to a private queue of the kit::

    async with CommandKit(AMQP_URL, "payment") as kit:
        cmd = kit.command("authorize_payment", input={"amount_cents": 4200})
        await kit.send(cmd)
        await kit.send(cmd)                      # the same command delivered twice
        first, second = await kit.reply(cmd), await kit.reply(cmd)
        assert first == second and first["outcome"] == "success"

        undo = kit.command("refund_payment", kind="compensation", step="authorize_payment")
        late = kit.command("authorize_payment")  # a new saga: its compensation comes first
        ...
        await kit.send_raw(b"{not json")         # goes to saga.dead-letter
        dead = await kit.dead_letter()

Assert on your participant's own tables afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from . import _json
from .participant import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    participant_queue,
)


@dataclass(frozen=True)
class TestCommand:
    """A command to send; ``with_(...)`` makes a changed copy (e.g. a retry: a new id, the
    next attempt)."""

    command: str
    saga_id: uuid.UUID = field(default_factory=uuid.uuid4)
    command_id: uuid.UUID = field(default_factory=uuid.uuid4)
    step: str | None = None
    kind: str = "action"
    attempt: int = 1
    input: Any = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    definition: str = "test"
    definition_version: int = 1
    traceparent: str | None = None

    __test__ = False  # not a pytest test class

    def with_(self, **changes: Any) -> "TestCommand":
        return replace(self, **changes)

    def retry(self) -> "TestCommand":
        """The next attempt of the same step: a new command id."""
        return replace(self, command_id=uuid.uuid4(), attempt=self.attempt + 1)

    def body(self) -> bytes:
        return _json.dumps(
            {
                "command_id": str(self.command_id),
                "saga_id": str(self.saga_id),
                "definition": self.definition,
                "definition_version": self.definition_version,
                "step": self.step or self.command,
                "kind": self.kind,
                "command": self.command,
                "attempt": self.attempt,
                "input": self.input,
                "outputs": self.outputs,
            }
        ).encode()


class CommandKit:
    """Sends commands to one participant's queue and collects its replies (an async context
    manager). The participant under test must run on the same vhost."""

    def __init__(self, amqp_url: str, participant: str) -> None:
        self.amqp_url = amqp_url
        self.participant = participant
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._replies: AbstractQueue | None = None
        self._received: dict[str, list[AbstractIncomingMessage]] = {}

    async def __aenter__(self) -> "CommandKit":
        self._connection = await aio_pika.connect(self.amqp_url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        ch = self._channel
        dlx = await ch.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        dlq = await ch.declare_queue(DEAD_LETTER_QUEUE, durable=True)
        await dlq.bind(dlx, routing_key="")
        commands = await ch.declare_exchange(COMMANDS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await ch.declare_queue(
            participant_queue(self.participant),
            durable=True,
            arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
        )
        await queue.bind(commands, routing_key=self.participant)
        self._replies = await ch.declare_queue(exclusive=True)
        return self

    async def __aexit__(self, *_: Any) -> None:
        if self._connection is not None:
            await self._connection.close()

    def command(self, command: str, **fields: Any) -> TestCommand:
        """A new command (new saga id and command id unless given)."""
        return TestCommand(command, **fields)

    async def send(self, command: TestCommand) -> None:
        """Publishes ``command`` as sagad does (to ``saga.commands``, routed by participant)."""
        headers: dict[str, Any] = {
            "saga-id": str(command.saga_id),
            "saga-definition": command.definition,
            "saga-step": command.step or command.command,
            "saga-kind": command.kind,
            "saga-attempt": command.attempt,
        }
        if command.traceparent:
            headers["traceparent"] = command.traceparent
        await self._publish(
            command.body(),
            routing_key=self.participant,
            exchange=COMMANDS_EXCHANGE,
            message_id=str(command.command_id),
            correlation_id=str(command.saga_id),
            type=command.command,
            headers=headers,
        )

    async def send_raw(self, body: bytes, *, message_id: str | None = None) -> None:
        """Publishes any body to the participant's queue (e.g. a malformed command)."""
        await self._publish(body, routing_key=self.participant, exchange=COMMANDS_EXCHANGE,
                            message_id=message_id)

    async def _publish(self, body: bytes, *, routing_key: str, exchange: str, **props: Any) -> None:
        assert self._channel is not None and self._replies is not None, "use `async with`"
        ex = await self._channel.get_exchange(exchange, ensure=False)
        await ex.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=self._replies.name,
                timestamp=datetime.now(timezone.utc),
                **props,
            ),
            routing_key=routing_key,
        )

    async def reply(self, command: TestCommand | uuid.UUID | str, timeout: float = 10.0) -> dict[str, Any]:
        """The next reply to ``command`` not returned yet (parsed JSON); fails after
        ``timeout`` seconds."""
        key = str(command.command_id if isinstance(command, TestCommand) else command)
        message = await self.reply_message(key, timeout)
        parsed: dict[str, Any] = _json.loads(message.body)
        return parsed

    async def reply_message(self, command_id: str, timeout: float = 10.0) -> AbstractIncomingMessage:
        """Like :meth:`reply`, the whole message (headers, ``correlation_id``)."""
        assert self._replies is not None, "use `async with`"
        waiting = self._received.setdefault(command_id, [])
        deadline = time.monotonic() + timeout
        while not waiting:
            message = await self._replies.get(no_ack=True, fail=False)
            if message is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to command {command_id} within {timeout}s")
                await asyncio.sleep(0.02)
                continue
            self._received.setdefault(message.correlation_id or "", []).append(message)
        result: AbstractIncomingMessage = waiting.pop(0)
        return result

    async def dead_letter(self, timeout: float = 10.0) -> AbstractIncomingMessage:
        """The next message of ``saga.dead-letter`` (acknowledged)."""
        assert self._channel is not None, "use `async with`"
        queue = await self._channel.get_queue(DEAD_LETTER_QUEUE)
        deadline = time.monotonic() + timeout
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing dead-lettered within {timeout}s")
            await asyncio.sleep(0.02)


__all__ = ["CommandKit", "TestCommand"]

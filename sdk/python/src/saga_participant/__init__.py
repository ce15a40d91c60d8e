"""Saga participants in Python for the ``sagad`` orchestrator.

A participant registers a handler per command name; the SDK consumes the participant's queue,
wraps every handler in the barrier (de-duplication by command id, the stored reply, tombstones
for compensations that overtake their action) in the same PostgreSQL transaction as the
handler's own work, publishes the reply with publisher confirms and acks the command after::

    from saga_participant import Participant, Success, Failure

    payment = Participant("payment", amqp_url=AMQP, database_url=DB)

    @payment.action("authorize_payment")
    async def authorize(cmd, conn):
        if cmd.input.get("amount_cents", 0) > 100_000:
            return Failure("amount over the limit")
        await conn.execute("INSERT INTO payments (saga_id, state) VALUES (%s, 'authorized')",
                           (cmd.saga_id,))
        return Success({"authorization": f"auth-{cmd.saga_id.hex[:8]}"})

    asyncio.run(payment.run())

See docs/participants.md in the repository for the guide, and docs/participant-contract.md for
the wire contract.
"""

from ._grpc import GrpcReplies
from ._parse import parse_command
from ._types import (
    Command,
    Failure,
    Handler,
    Kind,
    MalformedCommand,
    Outcome,
    Success,
    transient,
)
from .participant import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    REPLIES_QUEUE,
    Participant,
    ensure_schema,
    participant_queue,
    schema_sql,
)

__all__ = [
    "COMMANDS_EXCHANGE",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "REPLIES_QUEUE",
    "Command",
    "Failure",
    "GrpcReplies",
    "Handler",
    "Kind",
    "MalformedCommand",
    "Outcome",
    "Participant",
    "Success",
    "ensure_schema",
    "parse_command",
    "participant_queue",
    "schema_sql",
    "transient",
]

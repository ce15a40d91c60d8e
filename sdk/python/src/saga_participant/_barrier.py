"""The barrier: one PostgreSQL transaction per command that claims its id, runs the handler (in a
savepoint) unless the step's record says otherwise, and stores the reply.

See ``schema.sql`` for the tables and docs/participants.md for why each rule exists."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from . import _json
from ._types import Command, Failure, Handler, Outcome, Success

log = logging.getLogger("saga_participant")

#: Longest failure reason sent (the orchestrator shows reasons to operators).
MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class Processed:
    """The result of a command's transaction."""

    #: The reply body (JSON text), as stored.
    reply: str
    #: An earlier delivery of the same command id stored this reply.
    duplicate: bool
    #: For logs: "applied", "failed", "already applied", "blocked", "tombstone", ...
    how: str


def _reason(text: str) -> str:
    text = text.strip() or "no reason given"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def success_reply(command: Command, output_json: str) -> str:
    return (
        '{"command_id":' + _json.dumps(str(command.command_id))
        + ',"outcome":"success","output":' + output_json + "}"
    )


def failure_reply(command: Command, reason: str, retryable: bool) -> str:
    return _json.dumps(
        {
            "command_id": str(command.command_id),
            "outcome": "failure",
            "reason": _reason(reason),
            "retryable": retryable,
        }
    )


class _Rollback(Exception):
    """Rolls the handler's savepoint back and carries the reply to store instead."""

    def __init__(self, reply: str, how: str) -> None:
        super().__init__(how)
        self.reply = reply
        self.how = how


async def _call(handler: Handler, command: Command, conn: psycopg.AsyncConnection[Any]) -> str:
    """Runs the handler; returns the output JSON on success, raises _Rollback otherwise."""
    try:
        outcome: Outcome = await handler(command, conn)
    except Exception as e:  # a handler's error is a transient failure, never a crash
        log.warning(
            "handler for %s raised; answering a transient failure",
            command.command,
            exc_info=True,
            extra={"saga_id": str(command.saga_id), "command_id": str(command.command_id)},
        )
        raise _Rollback(
            failure_reply(command, f"{type(e).__name__}: {e}", True), "raised"
        ) from None
    if isinstance(outcome, Failure):
        how = "transient failure" if outcome.retryable else "failed"
        raise _Rollback(failure_reply(command, outcome.reason, outcome.retryable), how)
    if not isinstance(outcome, Success):
        raise _Rollback(
            failure_reply(
                command,
                f"handler returned {type(outcome).__name__}, not Success or Failure",
                True,
            ),
            "bad outcome",
        )
    try:
        return _json.dumps(outcome.output)
    except (TypeError, ValueError) as e:
        raise _Rollback(
            failure_reply(command, f"the output cannot be sent as JSON: {e}", True), "bad output"
        ) from None


async def _record(
    conn: psycopg.AsyncConnection[Any], command: Command, sql: str, params: tuple[Any, ...]
) -> None:
    """Records the step after a successful handler, in its savepoint. If that fails while the
    connection is fine, the handler left the transaction failed (it caught a database error
    and returned success anyway): a transient failure, rolled back, not a redelivery loop."""
    try:
        await conn.execute(sql, params)
    except psycopg.Error as e:
        if conn.broken or conn.closed:
            raise
        raise _Rollback(
            failure_reply(command, f"the handler left its transaction failed: {e}", True),
            "transaction failed",
        ) from None


async def process(
    conn: psycopg.AsyncConnection[Any],
    participant: str,
    command: Command,
    handler: Handler | None,
) -> Processed:
    """Runs one command's transaction on ``conn`` and returns the reply to send."""
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO saga_barrier_commands"
            " (command_id, saga_id, participant, step, kind, command, attempt)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (command_id) DO NOTHING",
            (
                command.command_id,
                command.saga_id,
                participant,
                command.step,
                command.kind,
                command.command,
                command.attempt,
            ),
        )
        if cur.rowcount == 0:
            # Claimed by an earlier delivery: the insert waited for its transaction, so its row
            # (and reply) is committed. Answer with the same reply.
            cur = await conn.execute(
                "UPDATE saga_barrier_commands SET deliveries = deliveries + 1"
                " WHERE command_id = %s RETURNING reply::text",
                (command.command_id,),
            )
            row = await cur.fetchone()
            if row is None or row[0] is None:
                raise RuntimeError(f"command {command.command_id} was claimed without a reply")
            return Processed(row[0], True, "duplicate")

        if handler is None:
            reply = failure_reply(
                command,
                f"participant {participant!r} has no {command.kind} handler"
                f" for command {command.command!r}",
                False,
            )
            how = "no handler"
        elif command.kind == "action":
            reply, how = await _action(conn, command, handler)
        else:
            reply, how = await _compensation(conn, command, handler)
        await conn.execute(
            "UPDATE saga_barrier_commands SET reply = %s::jsonb WHERE command_id = %s",
            (reply, command.command_id),
        )
    return Processed(reply, False, how)


async def _action(
    conn: psycopg.AsyncConnection[Any], command: Command, handler: Handler
) -> tuple[str, str]:
    try:
        async with conn.transaction():
            # Claims the step: a concurrent attempt or compensation of it waits here.
            cur = await conn.execute(
                "INSERT INTO saga_barrier_steps (saga_id, step, state, action_command_id)"
                " VALUES (%s, %s, 'applied', %s) ON CONFLICT (saga_id, step) DO NOTHING",
                (command.saga_id, command.step, command.command_id),
            )
            if cur.rowcount == 1:
                output = await _call(handler, command, conn)
                await _record(
                    conn,
                    command,
                    "UPDATE saga_barrier_steps SET action_output = %s::jsonb"
                    " WHERE saga_id = %s AND step = %s",
                    (output, command.saga_id, command.step),
                )
                return success_reply(command, output), "applied"
    except _Rollback as r:
        return r.reply, r.how
    cur = await conn.execute(
        "SELECT state, coalesce(action_output, 'null'::jsonb)::text FROM saga_barrier_steps"
        " WHERE saga_id = %s AND step = %s FOR UPDATE",
        (command.saga_id, command.step),
    )
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("the step's barrier row vanished")
    state, output = row
    if state == "applied":
        # An earlier attempt applied: the orchestrator never got (or gave up on) its answer.
        return success_reply(command, output), "already applied"
    return (
        failure_reply(command, f"step {command.step!r} was already compensated for this saga", False),
        "blocked",
    )


async def _compensation(
    conn: psycopg.AsyncConnection[Any], command: Command, handler: Handler
) -> tuple[str, str]:
    cur = await conn.execute(
        "INSERT INTO saga_barrier_steps"
        " (saga_id, step, state, compensation_command_id, compensation_output, tombstone)"
        " VALUES (%s, %s, 'compensated', %s, 'null'::jsonb, true)"
        " ON CONFLICT (saga_id, step) DO NOTHING",
        (command.saga_id, command.step, command.command_id),
    )
    if cur.rowcount == 1:
        # Nothing to undo (the action never applied here, or has not arrived yet): the row is a
        # tombstone that blocks a late action.
        return success_reply(command, "null"), "tombstone"
    cur = await conn.execute(
        "SELECT state, coalesce(compensation_output, 'null'::jsonb)::text FROM saga_barrier_steps"
        " WHERE saga_id = %s AND step = %s FOR UPDATE",
        (command.saga_id, command.step),
    )
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("the step's barrier row vanished")
    state, output = row
    if state == "compensated":
        return success_reply(command, output), "already compensated"
    try:
        async with conn.transaction():
            output = await _call(handler, command, conn)
            await _record(
                conn,
                command,
                "UPDATE saga_barrier_steps SET state = 'compensated',"
                " compensation_command_id = %s, compensation_output = %s::jsonb,"
                " updated_at = now() WHERE saga_id = %s AND step = %s",
                (command.command_id, output, command.saga_id, command.step),
            )
            return success_reply(command, output), "compensated"
    except _Rollback as r:
        return r.reply, r.how

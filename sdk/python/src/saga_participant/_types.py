"""Commands as handlers see them, and the outcomes handlers return."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Literal, Mapping, Union

import psycopg

Kind = Literal["action", "compensation"]


@dataclass(frozen=True)
class Command:
    """One command from the orchestrator (see docs/participant-contract.md, *Commands*).

    The fields come from the message body; ``traceparent`` and ``timestamp`` from the message's
    header and properties.
    """

    #: The command id (the message's ``message_id``): unique per attempt.
    command_id: uuid.UUID
    #: The saga this command belongs to.
    saga_id: uuid.UUID
    #: Definition name, e.g. ``order_fulfillment``.
    definition: str
    definition_version: int
    #: Step name, e.g. ``authorize_payment``. Effects should be keyed by ``(saga_id, step)``.
    step: str
    #: ``action`` to do the step, ``compensation`` to undo it.
    kind: Kind
    #: The command name (the step's ``action`` or ``compensation``).
    command: str
    #: 1 for the first attempt, 2 for the first retry, ...
    attempt: int
    #: The saga's input (the JSON given to ``StartSaga``); non-integer numbers are ``Decimal``.
    input: Any
    #: The output of every step that has succeeded so far, by step name.
    outputs: Mapping[str, Any]
    #: W3C trace context of the command's publish span, if any.
    traceparent: str | None = None
    #: When the orchestrator created the command.
    timestamp: datetime | None = None
    #: Every AMQP header of the message, as received.
    headers: Mapping[str, Any] = field(default_factory=dict)
    #: True when the broker delivers this message again (an earlier delivery was not acked).
    redelivered: bool = False


@dataclass(frozen=True)
class Success:
    """The local transaction is to commit; ``output`` (any JSON value) becomes the step's output,
    passed to later commands in ``Command.outputs``."""

    output: Any = None


@dataclass(frozen=True)
class Failure:
    """Nothing happened (the handler's work is rolled back). ``retryable=False`` is a final
    answer: a step at or before the pivot makes the saga compensate. Use :func:`transient` for a
    failure that may go away (the orchestrator retries with back-off)."""

    reason: str
    retryable: bool = False


def transient(reason: str) -> Failure:
    """A failure that may succeed later: the handler's work is rolled back and the orchestrator
    retries the step (a new attempt, a new command id) within its retry policy."""
    return Failure(reason, retryable=True)


Outcome = Union[Success, Failure]

#: A handler: gets the command and a connection inside the command's open transaction in the
#: participant's database; returns the outcome. Raising an exception is a transient failure.
Handler = Callable[[Command, psycopg.AsyncConnection[Any]], Awaitable[Outcome]]


class MalformedCommand(ValueError):
    """A message on a participant queue that is not a command this contract describes."""

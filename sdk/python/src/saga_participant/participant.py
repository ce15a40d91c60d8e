"""The participant runtime: consumes a participant's command queue, runs each command through the
barrier, publishes the reply with publisher confirms and acks the command only after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from importlib import resources
from typing import Any, Callable

import aio_pika
import aiormq
import psycopg
from aio_pika.abc import AbstractIncomingMessage
from psycopg_pool import AsyncConnectionPool

from . import _barrier, _grpc
from ._grpc import GrpcReplies
from ._parse import child_traceparent, parse_command
from ._types import Command, Handler, Kind, MalformedCommand

log = logging.getLogger("saga_participant")

COMMANDS_EXCHANGE = "saga.commands"
REPLIES_QUEUE = "saga.replies"
DEAD_LETTER_EXCHANGE = "saga.dead-letter"
DEAD_LETTER_QUEUE = "saga.dead-letter"


def participant_queue(participant: str) -> str:
    """The queue a participant consumes: ``saga.participant.<participant>``."""
    return f"saga.participant.{participant}"


def schema_sql() -> str:
    """The barrier tables' DDL (``schema.sql`` in this package), idempotent."""
    return resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """Creates the barrier tables if missing. Safe to run from every process at start."""
    async with conn.transaction():
        # Two processes starting at once would race on CREATE TABLE IF NOT EXISTS.
        await conn.execute("SELECT pg_advisory_xact_lock(7265812349)")
        await conn.execute(schema_sql().encode())


class Participant:
    """One participant (one command queue) of the saga orchestrator.

    Register a handler per command name with :meth:`action` and :meth:`compensation`, then
    ``await participant.run()`` until :meth:`stop` is called (or the task is cancelled).

    Each command runs in one transaction of the participant's own PostgreSQL database: the
    barrier claims the command id, the handler does its work on the connection it is given (in
    a savepoint), the reply is stored; then the reply is published (persistent, confirmed) and
    only then is the command acknowledged.

    :param name: the participant's name in the saga definitions (``participant = "payment"``).
    :param amqp_url: RabbitMQ URL, the path is the vhost (``amqp://guest:guest@host:5672/%2f``).
    :param database_url: the participant's database (a libpq URL or DSN); a pool is made.
    :param pool: or an ``AsyncConnectionPool`` of your own (not closed by ``run``).
    :param prefetch: unacknowledged commands held at once (AMQP ``basic.qos``).
    :param concurrency: commands handled at once (default: ``prefetch``); also the pool size
        when the pool is made here.
    :param ensure_schema: create the barrier tables at start (see :func:`ensure_schema`).
    :param declare_topology: declare the exchanges and queue of the contract at start (the
        same arguments as ``sagad``, so either may start first).
    :param reconnect_initial, reconnect_max: back-off between connection attempts, doubling.
    :param requeue_delay: wait before requeueing a command whose transaction or reply failed
        (database or broker trouble), so an outage does not become a hot redelivery loop.
    :param shutdown_grace: how long :meth:`stop` lets in-flight commands finish.
    :param reply_via_grpc: send replies with sagad's ``ReportStepResult`` instead of publishing
        them (:class:`GrpcReplies`; needs the ``grpc`` extra), for a participant that may
        consume its queue but not publish. A report sagad refuses for good (``NOT_FOUND``,
        ``INVALID_ARGUMENT``) is logged and the command acked; any other error requeues it.
    """

    def __init__(
        self,
        name: str,
        *,
        amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2f",
        database_url: str | None = None,
        pool: AsyncConnectionPool[Any] | None = None,
        prefetch: int = 16,
        concurrency: int | None = None,
        ensure_schema: bool = True,
        declare_topology: bool = True,
        reconnect_initial: float = 0.5,
        reconnect_max: float = 30.0,
        requeue_delay: float = 0.5,
        shutdown_grace: float = 30.0,
        reply_via_grpc: GrpcReplies | None = None,
    ) -> None:
        if (database_url is None) == (pool is None):
            raise ValueError("give exactly one of database_url and pool")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.name = name
        self.amqp_url = amqp_url
        self.prefetch = prefetch
        self.concurrency = concurrency or prefetch
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._database_url = database_url
        self._pool = pool
        self._own_pool = pool is None
        self._ensure_schema = ensure_schema
        self._declare_topology = declare_topology
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.requeue_delay = requeue_delay
        self.shutdown_grace = shutdown_grace
        if reply_via_grpc is not None:
            reply_via_grpc.target()  # a malformed address fails here, not at the first reply
        self._grpc_config = reply_via_grpc
        self._reporter: _grpc.Reporter | None = None
        self._handlers: dict[tuple[Kind, str], Handler] = {}
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.concurrency)

    # Registration ---------------------------------------------------------------------------

    def action(self, command: str) -> Callable[[Handler], Handler]:
        """Decorator: ``handler`` performs the action command ``command``."""
        return self._register("action", command)

    def compensation(self, command: str) -> Callable[[Handler], Handler]:
        """Decorator: ``handler`` undoes a step, for the compensation command ``command``.

        It is called only when the step's action applied here; a compensation that finds
        nothing to undo is answered ``success`` (output ``null``) by the barrier itself."""
        return self._register("compensation", command)

    def _register(self, kind: Kind, command: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if (kind, command) in self._handlers:
                raise ValueError(f"a {kind} handler for {command!r} is already registered")
            if not asyncio.iscoroutinefunction(handler):
                raise TypeError(f"the {kind} handler for {command!r} must be an async function")
            self._handlers[(kind, command)] = handler
            return handler

        return register

    # Running ---------------------------------------------------------------------------------

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The connection pool (available once :meth:`run` has started)."""
        if self._pool is None:
            raise RuntimeError("the pool exists once run() has started")
        return self._pool

    async def wait_ready(self) -> None:
        """Returns once the participant consumes its queue (for tests and start-up probes)."""
        await self._ready.wait()

    def stop(self) -> None:
        """Asks :meth:`run` to stop: it stops consuming, lets in-flight commands finish (at
        most ``shutdown_grace`` seconds), closes the connections and returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Serves commands until :meth:`stop`, reconnecting with back-off on any failure."""
        if not self._handlers:
            raise RuntimeError(f"participant {self.name!r} has no handler")
        if self._pool is None:
            self._pool = AsyncConnectionPool(
                self._database_url or "",
                min_size=1,
                max_size=self.concurrency,
                kwargs={"autocommit": True},
                open=False,
            )
        if self._grpc_config is not None:
            self._reporter = _grpc.Reporter(self._grpc_config)
        try:
            if self._own_pool:
                await self._pool.open()
            await self._until_stopped(self._prepare_database, "preparing the database")
            backoff = self.reconnect_initial
            while not self._stopping.is_set():
                try:
                    await self._session()
                    backoff = self.reconnect_initial
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning(
                        "participant %s: broker session failed (%s); reconnecting in %.1fs",
                        self.name,
                        e or type(e).__name__,
                        backoff,
                    )
                    await self._sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, self.reconnect_max)
        finally:
            self._ready.clear()
            if self._reporter is not None:
                await self._reporter.close()
                self._reporter = None
            if self._own_pool and self._pool is not None:
                await self._pool.close()
                self._pool = None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _until_stopped(self, step: Callable[[], Any], what: str) -> None:
        backoff = self.reconnect_initial
        while not self._stopping.is_set():
            try:
                await step()
                return
            except Exception as e:
                log.warning("participant %s: %s failed (%s); retrying", self.name, what, e)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max)

    async def _prepare_database(self) -> None:
        if self._ensure_schema:
            async with self.pool.connection() as conn:
                await ensure_schema(conn)

    async def _session(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        closed = asyncio.Event()
        connection.close_callbacks.add(lambda *_: closed.set())
        try:
            consume_channel = await connection.channel(publisher_confirms=False)
            await consume_channel.set_qos(prefetch_count=self.prefetch)
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=False)
            # A channel the broker closed (a channel error) ends the session too: without it the
            # consumer would be gone while the connection looks healthy.
            for channel in (consume_channel, publisher):
                channel.close_callbacks.add(lambda *_: closed.set())
            queue = await self._topology(consume_channel)

            async def on_message(message: AbstractIncomingMessage) -> None:
                task = asyncio.create_task(self._handle(message, publisher))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

            tag = await queue.consume(on_message, no_ack=False)
            self._ready.set()
            log.info("participant %s: consuming %s", self.name, queue.name)
            stop_wait = asyncio.create_task(self._stopping.wait())
            closed_wait = asyncio.create_task(closed.wait())
            try:
                await asyncio.wait({stop_wait, closed_wait}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
                closed_wait.cancel()
            self._ready.clear()
            if closed.is_set():
                # Commands in flight cannot be acked on a dead channel: the broker requeues them
                # and the stored replies answer their redeliveries.
                for task in list(self._in_flight):
                    task.cancel()
                raise ConnectionError("the broker closed the connection or a channel")
            # Graceful stop: no new commands, finish the ones in flight, then close.
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            if self._in_flight:
                log.info(
                    "participant %s: finishing %d command(s) in flight",
                    self.name,
                    len(self._in_flight),
                )
                _done, pending = await asyncio.wait(
                    set(self._in_flight), timeout=self.shutdown_grace
                )
                for task in pending:
                    task.cancel()
        finally:
            self._ready.clear()
            with contextlib.suppress(Exception):
                await connection.close()

    async def _topology(self, channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        queue_name = participant_queue(self.name)
        if not self._declare_topology:
            return await channel.get_queue(queue_name, ensure=True)
        dlx = await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dlq = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)
        await dlq.bind(dlx, routing_key="")
        commands = await channel.declare_exchange(
            COMMANDS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
        )
        await queue.bind(commands, routing_key=self.name)
        return queue

    # One command -------------------------------------------------------------------------------

    async def _handle(
        self, message: AbstractIncomingMessage, publisher: aio_pika.abc.AbstractChannel
    ) -> None:
        try:
            command = parse_command(
                message.body,
                message_id=message.message_id,
                headers=message.headers,
                timestamp=message.timestamp,
                redelivered=bool(message.redelivered),
            )
        except MalformedCommand as e:
            log.warning(
                "participant %s: rejecting a malformed command to the dead-letter queue: %s",
                self.name,
                e,
            )
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)
            return
        try:
            async with self._slots:
                handler = self._handlers.get((command.kind, command.command))
                async with self.pool.connection() as conn:
                    processed = await _barrier.process(conn, self.name, command, handler)
                traceparent = child_traceparent(command.traceparent)
                reporter = self._reporter
                if reporter is None:
                    await self._publish_reply(
                        publisher, message, command, processed.reply, traceparent
                    )
                else:
                    await self._report(reporter, command, processed.reply, traceparent)
            await message.ack()
            log.info(
                "participant %s: %s %s of saga %s (attempt %d): %s%s",
                self.name,
                command.kind,
                command.command,
                command.saga_id,
                command.attempt,
                processed.how,
                ", stored reply re-sent" if processed.duplicate else "",
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error(
                "participant %s: handling command %s failed (%s); requeueing it",
                self.name,
                command.command_id,
                e or type(e).__name__,
                exc_info=True,
            )
            await self._sleep(self.requeue_delay)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def _publish_reply(
        self,
        publisher: aio_pika.abc.AbstractChannel,
        message: AbstractIncomingMessage,
        command: Command,
        reply: str,
        traceparent: str | None,
    ) -> None:
        """Publishes the reply (persistent, to the command's ``reply_to``) and returns once the
        broker confirmed it; raises if the broker refused it or the channel failed."""
        headers: dict[str, Any] = {}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        reply_to = message.reply_to or REPLIES_QUEUE
        result = await publisher.default_exchange.publish(
            aio_pika.Message(
                reply.encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=str(command.command_id),
                headers=headers,
            ),
            routing_key=reply_to,
            mandatory=True,
        )
        if isinstance(result, aiormq.abc.DeliveredMessage):
            # Nobody declared the reply queue: requeueing cannot help. The step times out and
            # the orchestrator retries or compensates, as the contract says.
            log.warning(
                "participant %s: reply to %s unroutable (queue %r); dropped",
                self.name,
                command.command_id,
                reply_to,
            )

    async def _report(
        self, reporter: _grpc.Reporter, command: Command, reply: str, traceparent: str | None
    ) -> None:
        """Reports the reply over gRPC; raises (the command is requeued) unless sagad answered
        or refused it for good."""
        try:
            applied = await reporter.report(reply, traceparent)
        except _grpc.Refused as e:
            # As for an unroutable reply: asking again cannot help; the step times out and
            # the orchestrator retries or compensates.
            log.warning(
                "participant %s: sagad refused the report for %s (%s); the step will time out",
                self.name,
                command.command_id,
                e,
            )
            return
        log.debug(
            "participant %s: reported %s over gRPC (applied: %s)",
            self.name,
            command.command_id,
            applied,
        )

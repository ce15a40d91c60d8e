//! The participant runtime: consumes a participant's command queue, runs each command through
//! the barrier, publishes the reply with publisher confirms (or reports it over gRPC) and acks
//! the command only after that.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use saga_contract::amqp;
use saga_contract::render::H_TRACEPARENT;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};
use uuid::Uuid;

use crate::barrier::{self, Processed};
use crate::command::{self, Command, Kind};
use crate::grpc::{GrpcReplies, Reported, Reporter};
use crate::testing::CrashSwitch;
use crate::trace::TraceParent;
use crate::{Handler, HandlerFuture};

/// Why [`Participant::run`] refused to start. Everything after the start (servers down, a
/// broken connection) is retried until shutdown instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("participant {participant:?}: {problem}")]
    Config {
        participant: String,
        problem: String,
    },
}

/// Whether the participant consumes its queue now (for tests and readiness probes).
#[derive(Clone)]
pub struct Ready(watch::Receiver<bool>);

impl Ready {
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the participant consumes its queue (at once if it does already).
    pub async fn wait(&mut self) {
        // An error means the participant is gone: nothing to wait for.
        let _ = self.0.wait_for(|ready| *ready).await;
    }
}

enum Replies {
    Amqp,
    Grpc(GrpcReplies),
}

/// One participant (one command queue, `saga.participant.<name>`) of the saga orchestrator.
///
/// Register a handler per command name with [`Participant::action`] and
/// [`Participant::compensation`], set options, then [`Participant::run`] it until its
/// cancellation token is cancelled. Several participants run in one process as several `run`
/// futures (they may share the pool).
pub struct Participant {
    name: String,
    handlers: HashMap<(Kind, String), Arc<Handler>>,
    problems: Vec<String>,
    amqp_url: String,
    amqp_ca: Option<String>,
    prefetch: u16,
    concurrency: Option<usize>,
    ensure_schema: bool,
    declare_topology: bool,
    reconnect_initial: Duration,
    reconnect_max: Duration,
    requeue_delay: Duration,
    shutdown_grace: Duration,
    replies: Replies,
    ready: watch::Sender<bool>,
    crash: Option<CrashSwitch>,
}

impl Participant {
    /// The participant named `name` in the saga definitions (`participant = "payment"`).
    pub fn new(name: impl Into<String>) -> Participant {
        Participant {
            name: name.into(),
            handlers: HashMap::new(),
            problems: Vec::new(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            amqp_ca: None,
            prefetch: 16,
            concurrency: None,
            ensure_schema: true,
            declare_topology: true,
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            requeue_delay: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(30),
            replies: Replies::Amqp,
            ready: watch::Sender::new(false),
            crash: None,
        }
    }

    /// `handler` performs the action command `command`.
    pub fn action<F>(self, command: &str, handler: F) -> Participant
    where
        F: for<'a> Fn(&'a Command, &'a mut PgConnection) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        self.register(Kind::Action, command, Arc::new(handler))
    }

    /// `handler` undoes a step, for the compensation command `command`. It is called only when
    /// the step's action applied here; a compensation that finds nothing to undo is answered
    /// `success` (output `null`) by the barrier itself.
    pub fn compensation<F>(self, command: &str, handler: F) -> Participant
    where
        F: for<'a> Fn(&'a Command, &'a mut PgConnection) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        self.register(Kind::Compensation, command, Arc::new(handler))
    }

    fn register(mut self, kind: Kind, command: &str, handler: Arc<Handler>) -> Participant {
        // Reported by `run`: a builder that panics would take the service down at start-up
        // with less to say.
        if self
            .handlers
            .insert((kind, command.to_string()), handler)
            .is_some()
        {
            self.problems
                .push(format!("two {kind} handlers for command {command:?}"));
        }
        self
    }

    /// RabbitMQ URL, the path is the vhost (default `amqp://guest:guest@127.0.0.1:5672/%2f`);
    /// `amqps://` is always TLS.
    pub fn amqp_url(mut self, url: impl Into<String>) -> Participant {
        self.amqp_url = url.into();
        self
    }

    /// PEM certificate authorities trusted for `amqps://`, besides the system's.
    pub fn amqp_ca(mut self, pem: impl Into<String>) -> Participant {
        self.amqp_ca = Some(pem.into());
        self
    }

    /// Unacknowledged commands held at once (AMQP `basic.qos`, default 16).
    pub fn prefetch(mut self, prefetch: u16) -> Participant {
        self.prefetch = prefetch;
        self
    }

    /// Commands handled at once (default: the prefetch). Each holds a pool connection while its
    /// transaction runs, so keep the pool at least this large.
    pub fn concurrency(mut self, concurrency: usize) -> Participant {
        self.concurrency = Some(concurrency);
        self
    }

    /// Create the barrier tables at start (default on); off when [`crate::SCHEMA`] is applied
    /// with your migrations.
    pub fn ensure_schema(mut self, on: bool) -> Participant {
        self.ensure_schema = on;
        self
    }

    /// Declare the contract's exchanges and this participant's queue at each connect (default
    /// on; the same arguments as sagad, so either may start first).
    pub fn declare_topology(mut self, on: bool) -> Participant {
        self.declare_topology = on;
        self
    }

    /// Back-off between connection attempts, doubling from `initial` to `max` (default 0.5 s
    /// to 30 s).
    pub fn reconnect(mut self, initial: Duration, max: Duration) -> Participant {
        self.reconnect_initial = initial;
        self.reconnect_max = max;
        self
    }

    /// Wait before requeueing a command whose transaction or reply failed (database or broker
    /// trouble), so an outage is not a hot redelivery loop (default 0.5 s).
    pub fn requeue_delay(mut self, delay: Duration) -> Participant {
        self.requeue_delay = delay;
        self
    }

    /// How long shutdown lets the commands in flight finish (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Participant {
        self.shutdown_grace = grace;
        self
    }

    /// Send replies with `ReportStepResult` on sagad's gRPC API instead of publishing them.
    pub fn reply_via_grpc(mut self, grpc: GrpcReplies) -> Participant {
        self.replies = Replies::Grpc(grpc);
        self
    }

    /// For tests of recovery: commands armed in `switch` make the participant drop its broker
    /// connection right after their transaction committed, before the reply, as a crash would
    /// ([`crate::testing::CommandKit::crash_after_commit`]).
    pub fn crash_switch(mut self, switch: CrashSwitch) -> Participant {
        self.crash = Some(switch);
        self
    }

    /// Its name in the saga definitions.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it consumes its queue; valid before and during [`Participant::run`].
    pub fn ready(&self) -> Ready {
        Ready(self.ready.subscribe())
    }

    /// Serves commands until `shutdown` is cancelled: then it stops consuming, lets the
    /// commands in flight finish (at most the shutdown grace), closes the connection and
    /// returns. A lost broker or database is retried with back-off meanwhile. Fails at once
    /// only on a configuration that cannot work.
    pub async fn run(self, pool: PgPool, shutdown: CancellationToken) -> Result<(), Error> {
        let config_error = |problem: String| Error::Config {
            participant: self.name.clone(),
            problem,
        };
        if self.handlers.is_empty() {
            return Err(config_error("no handler registered".into()));
        }
        if let Some(problem) = self.problems.first() {
            return Err(config_error(problem.clone()));
        }
        if self.prefetch == 0 || self.concurrency == Some(0) {
            return Err(config_error(
                "prefetch and concurrency must be at least 1".into(),
            ));
        }
        if self.reconnect_initial.is_zero() || self.reconnect_max < self.reconnect_initial {
            return Err(config_error(
                "the reconnect back-off must start above zero and end at or above its start".into(),
            ));
        }
        let reporter = match &self.replies {
            Replies::Amqp => None,
            Replies::Grpc(grpc) => Some(grpc.client().map_err(config_error)?),
        };
        let concurrency = self.concurrency.unwrap_or(usize::from(self.prefetch));
        let runtime = Arc::new(Runtime {
            name: self.name.clone(),
            queue: saga_contract::participant_queue(&self.name),
            handlers: self.handlers.clone(),
            pool,
            slots: Arc::new(Semaphore::new(concurrency)),
            requeue_delay: self.requeue_delay,
            reporter,
            crash: self.crash.clone(),
        });
        if self.ensure_schema && !self.prepare_database(&runtime, &shutdown).await {
            return Ok(());
        }
        let mut backoff = self.reconnect_initial;
        while !shutdown.is_cancelled() {
            match self.session(&runtime, &shutdown).await {
                Ok(()) => break,
                Err(SessionError { cause, consumed }) => {
                    if consumed {
                        backoff = self.reconnect_initial;
                    }
                    let wait = jitter(backoff);
                    warn!(participant = %self.name, error = %cause, retry_in = ?wait, "broker session ended; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(self.reconnect_max);
                }
            }
        }
        self.ready.send_replace(false);
        info!(participant = %self.name, "participant stopped");
        Ok(())
    }

    /// Creates the barrier tables, retrying until it works; false if shutdown came first.
    async fn prepare_database(&self, runtime: &Runtime, shutdown: &CancellationToken) -> bool {
        let mut backoff = self.reconnect_initial;
        loop {
            let attempt = async {
                let mut conn = runtime.pool.acquire().await?;
                barrier::ensure_schema(&mut conn).await
            };
            match attempt.await {
                Ok(()) => return true,
                Err(e) => {
                    warn!(participant = %self.name, error = %e, retry_in = ?backoff, "cannot create the barrier tables; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.reconnect_max);
        }
    }

    /// One broker connection, consuming until shutdown (`Ok`) or until it breaks.
    async fn session(
        &self,
        runtime: &Arc<Runtime>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let early = |cause: String| SessionError {
            cause,
            consumed: false,
        };
        let connection = amqp::connect(&self.amqp_url, self.amqp_ca.as_deref())
            .await
            .map_err(|e| early(format!("cannot connect to RabbitMQ: {e}")))?;
        let opened = self.open(runtime, &connection).await;
        let (channel, publisher, consumer) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let _ = connection.close(320, "reconnecting".into()).await;
                return Err(early(format!("cannot consume {}: {e}", runtime.queue)));
            }
        };
        self.ready.send_replace(true);
        info!(participant = %self.name, queue = %runtime.queue, prefetch = self.prefetch, "consuming");

        // Cancelled by a command that finds the connection broken, so the session is rebuilt.
        let broken = CancellationToken::new();
        // Cancelled when the session ends: commands still waiting for a slot go back to the
        // queue instead of starting.
        let stopping = CancellationToken::new();
        let session = Session {
            publisher: publisher.clone(),
            broken: broken.clone(),
            stopping: stopping.clone(),
        };
        let mut in_flight = JoinSet::new();
        let lost = amqp::disconnected(|| {
            connection.status().connected()
                && channel.status().connected()
                && publisher.status().connected()
        });
        tokio::pin!(lost);
        let mut deliveries = consumer.clone();
        let ended: Option<String> = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                _ = broken.cancelled() => break Some("a command found the connection broken".into()),
                _ = &mut lost => break Some("the connection or a channel closed".into()),
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(e) = done {
                        error!(participant = %self.name, error = %e, "a command task failed");
                    }
                }
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let runtime = Arc::clone(runtime);
                        let session = session.clone();
                        in_flight.spawn(async move { runtime.handle(session, delivery).await });
                    }
                    Some(Err(e)) => break Some(format!("the consumer failed: {e}")),
                    None => break Some("the broker cancelled the consumer".into()),
                },
            }
        };
        self.ready.send_replace(false);
        stopping.cancel();
        match ended {
            None => {
                // Graceful: no new commands; the ones in flight finish (ack or requeue) unless
                // the connection dies meanwhile or the grace runs out. Then the broker requeues
                // them, and a command whose transaction committed is answered from its stored
                // reply when it comes back.
                if let Err(e) = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                {
                    warn!(participant = %self.name, error = %e, "cancelling the consumer");
                }
                if !in_flight.is_empty() {
                    info!(participant = %self.name, commands = in_flight.len(), "finishing the commands in flight");
                }
                let drained = async {
                    while let Some(done) = in_flight.join_next().await {
                        if let Err(e) = done {
                            error!(participant = %self.name, error = %e, "a command task failed");
                        }
                    }
                };
                tokio::select! {
                    _ = drained => {}
                    _ = &mut lost => warn!(participant = %self.name, "the connection closed while commands were in flight"),
                    _ = tokio::time::sleep(self.shutdown_grace) => {
                        warn!(participant = %self.name, grace = ?self.shutdown_grace, "commands still in flight at the end of the shutdown grace; the broker requeues them");
                    }
                }
                in_flight.abort_all();
                if let Err(e) = connection.close(200, "shutdown".into()).await {
                    debug!(participant = %self.name, error = %e, "closing the broker connection");
                }
                Ok(())
            }
            Some(cause) => {
                // Nothing can be acked on a dead connection: the broker requeues the commands
                // in flight.
                in_flight.abort_all();
                let _ = connection.close(320, "reconnecting".into()).await;
                Err(SessionError {
                    cause,
                    consumed: true,
                })
            }
        }
    }

    async fn open(
        &self,
        runtime: &Runtime,
        connection: &Connection,
    ) -> Result<(Channel, Channel, lapin::Consumer), lapin::Error> {
        let channel = connection.create_channel().await?;
        if self.declare_topology {
            saga_contract::declare_participant_topology(&channel, [self.name.as_str()]).await?;
        }
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let tag = format!("saga-participant-{}-{}", self.name, Uuid::now_v7().simple());
        let consumer = channel
            .basic_consume(
                runtime.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, publisher, consumer))
    }
}

/// A back-off of ±20 %, so participants that lost the broker together do not come back in step.
fn jitter(delay: Duration) -> Duration {
    let (random, _) = Uuid::new_v4().as_u64_pair();
    let factor = 0.8 + (random % 401) as f64 / 1000.0;
    delay.mul_f64(factor)
}

struct SessionError {
    cause: String,
    /// The session got as far as consuming: the back-off starts over.
    consumed: bool,
}

/// What every command task of one participant shares.
struct Runtime {
    name: String,
    queue: String,
    handlers: HashMap<(Kind, String), Arc<Handler>>,
    pool: PgPool,
    slots: Arc<Semaphore>,
    requeue_delay: Duration,
    reporter: Option<Reporter>,
    crash: Option<CrashSwitch>,
}

/// What the command tasks of one broker session share.
#[derive(Clone)]
struct Session {
    publisher: Channel,
    broken: CancellationToken,
    stopping: CancellationToken,
}

/// Why a command could not be answered: it is requeued.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("database: {0}")]
    Database(#[from] barrier::BarrierError),
    #[error("the database pool: {0}")]
    Pool(#[source] sqlx::Error),
    #[error("publishing the reply: {0}")]
    Publish(String),
    #[error("reporting the reply over gRPC: {0}")]
    Report(String),
}

/// How a command ended, for the log.
enum Answered {
    Sent(Processed),
    /// The crash switch fired: nothing is acked; the session is being torn down.
    Crashed,
}

impl Runtime {
    async fn handle(self: Arc<Self>, session: Session, delivery: Delivery) {
        let props = &delivery.properties;
        let headers = props.headers().clone().unwrap_or_default();
        let parsed = command::parse(
            &delivery.data,
            props.message_id().as_ref().map(ShortString::as_str),
            saga_contract::header_str(&headers, H_TRACEPARENT),
            *props.timestamp(),
            delivery.redelivered,
        );
        let handler = parsed.as_ref().ok().and_then(|c| {
            self.handlers
                .get(&(c.kind, c.command.clone()))
                .map(Arc::clone)
        });
        let (command, handler) = match (parsed, handler) {
            (Ok(command), Some(handler)) => (command, handler),
            (parsed, _) => {
                let why = match parsed {
                    Err(why) => why,
                    Ok(c) => format!(
                        "participant {:?} has no {} handler for command {:?}",
                        self.name, c.kind, c.command
                    ),
                };
                // Poison: to saga.dead-letter; the step times out and is retried or compensated.
                warn!(participant = %self.name, reason = %why, "rejecting a malformed command to the dead-letter queue");
                if let Err(e) = delivery.reject(BasicRejectOptions { requeue: false }).await {
                    warn!(participant = %self.name, error = %e, "rejecting a command");
                }
                return;
            }
        };
        let parent = command.traceparent.as_deref().and_then(TraceParent::parse);
        let child = parent.as_ref().map(TraceParent::child);
        let span = tracing::info_span!(
            "saga command",
            participant = %self.name,
            command = %command.command,
            kind = %command.kind,
            saga_id = %command.saga_id,
            step = %command.step,
            command_id = %command.command_id,
            attempt = command.attempt,
            redelivered = command.redelivered,
            trace_id = parent.as_ref().map(|p| p.trace_id),
            parent_span_id = parent.as_ref().map(|p| p.parent_id),
            span_id = child.as_ref().map(|(_, span)| span.as_str()),
        );
        let traceparent = child.map(|(tp, _)| tp);
        self.handle_command(session, delivery, command, handler, traceparent)
            .instrument(span)
            .await;
    }

    async fn handle_command(
        &self,
        session: Session,
        delivery: Delivery,
        command: Command,
        handler: Arc<Handler>,
        traceparent: Option<String>,
    ) {
        let slot = tokio::select! {
            slot = Arc::clone(&self.slots).acquire_owned() => slot.ok(),
            _ = session.stopping.cancelled() => None,
        };
        let Some(_slot) = slot else {
            // Shutting down before it started: back to the queue for the next consumer.
            requeue(&delivery).await;
            return;
        };
        match self
            .answer(
                &session,
                &delivery,
                &command,
                handler.as_ref(),
                traceparent.as_deref(),
            )
            .await
        {
            Ok(Answered::Sent(processed)) => {
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    // The reply is out; a redelivery is answered with the stored reply.
                    warn!(error = %e, "acking a command");
                }
                info!(
                    how = processed.how,
                    duplicate = processed.duplicate,
                    "command answered"
                );
            }
            Ok(Answered::Crashed) => {
                warn!(
                    "crash switch: dropped the broker connection after the commit, before the reply"
                );
            }
            Err(e) => {
                error!(error = %e, "handling a command failed; requeueing it");
                tokio::select! {
                    _ = tokio::time::sleep(self.requeue_delay) => {}
                    _ = session.stopping.cancelled() => {}
                }
                requeue(&delivery).await;
            }
        }
    }

    async fn answer(
        &self,
        session: &Session,
        delivery: &Delivery,
        command: &Command,
        handler: &Handler,
        traceparent: Option<&str>,
    ) -> Result<Answered, CommandError> {
        let mut conn = self.pool.acquire().await.map_err(CommandError::Pool)?;
        let processed = match barrier::process(&mut conn, &self.name, command, handler).await {
            Ok(processed) => processed,
            Err(e) => {
                // Its state is unknown (a transaction may be open): not for another command.
                conn.close_on_drop();
                return Err(e.into());
            }
        };
        drop(conn);
        if let Some(crash) = &self.crash
            && crash.fire(command.command_id)
        {
            session.broken.cancel();
            return Ok(Answered::Crashed);
        }
        match &self.reporter {
            None => {
                self.publish(session, delivery, command, &processed.reply, traceparent)
                    .await?
            }
            Some(reporter) => match reporter
                .report(&processed.reply, traceparent)
                .await
                .map_err(CommandError::Report)?
            {
                Reported::Done { applied } => debug!(applied, "reported over gRPC"),
                Reported::Refused(why) => {
                    warn!(reason = %why, "sagad refused the report; the step will time out")
                }
            },
        }
        Ok(Answered::Sent(processed))
    }

    /// Publishes the reply (persistent, to the command's `reply_to`) and returns once the broker
    /// confirmed it.
    async fn publish(
        &self,
        session: &Session,
        delivery: &Delivery,
        command: &Command,
        reply: &str,
        traceparent: Option<&str>,
    ) -> Result<(), CommandError> {
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(ShortString::as_str)
            .filter(|q| !q.is_empty())
            .unwrap_or(saga_contract::REPLIES_QUEUE);
        let mut headers = FieldTable::default();
        if let Some(tp) = traceparent {
            headers.insert(H_TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
        }
        let properties = BasicProperties::default()
            .with_content_type(saga_contract::JSON.into())
            .with_delivery_mode(2)
            .with_correlation_id(command.command_id.to_string().into())
            .with_headers(headers);
        let confirm = match session
            .publisher
            .basic_publish(
                "".into(),
                reply_to.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                reply.as_bytes(),
                properties,
            )
            .await
        {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        let confirm = confirm.map_err(|e| {
            if !session.publisher.status().connected() {
                // Only a new session can fix a dead publish channel.
                session.broken.cancel();
            }
            CommandError::Publish(e.to_string())
        })?;
        if confirm.is_nack() {
            return Err(CommandError::Publish(
                "the broker refused the reply (nack)".into(),
            ));
        }
        if confirm.take_message().is_some() {
            // Nobody declared the reply queue: requeueing cannot help. The step times out and
            // the orchestrator retries or compensates, as the contract says.
            warn!(reply_to, "reply unroutable; dropped");
        }
        Ok(())
    }
}

async fn requeue(delivery: &Delivery) {
    let nack = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(e) = delivery.nack(nack).await {
        // The channel is gone; the broker requeues unacked commands by itself.
        debug!(error = %e, "requeueing a command");
    }
}

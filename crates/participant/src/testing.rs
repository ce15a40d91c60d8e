//! A test kit: plays the orchestrator's side of the contract against a running participant, on a
//! real RabbitMQ vhost, without sagad. Commands are built and published exactly as sagad does
//! (`saga_contract::render`), except that their `reply_to` is a private queue of the kit, where
//! the replies are collected. Each barrier scenario is one call:
//!
//! ```no_run
//! # use saga_participant::testing::{CommandKit, CrashSwitch, TestCommand};
//! # use serde_json::json;
//! # async fn test(url: &str, crash: CrashSwitch) -> Result<(), saga_participant::testing::KitError> {
//! let mut kit = CommandKit::connect(url, "payment").await?;
//! let pay = TestCommand::action("authorize_payment").input(json!({"amount_cents": 4200}));
//! let (first, again) = kit.deliver_twice(&pay).await?;          // the same command twice
//! assert_eq!(first.raw, again.raw);
//! let (undo, late) = kit.compensate_before_action(&pay.new_saga(), "refund_payment").await?;
//! assert!(late.is_failure());                                   // blocked by the tombstone
//! let (_, retried) = kit.retry_applied(&pay.new_saga()).await?; // same output, applied once
//! let reply = kit.crash_after_commit(&crash, &pay.new_saga()).await?; // redelivered, same reply
//! let dead = kit.malformed(b"{not json").await?;               // in saga.dead-letter
//! # Ok(()) }
//! ```
//!
//! Then assert on the participant's own tables. The participant under test runs on the same
//! vhost; [`CrashSwitch`] must be given to it (`Participant::crash_switch`) for
//! [`CommandKit::crash_after_commit`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use saga_contract::render::{self, H_TRACEPARENT};
use saga_contract::{
    COMMANDS_EXCHANGE, CommandBody, DEAD_LETTER_QUEUE, ReplyBody, ReplyOutcome, amqp, header_str,
};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Why a kit call failed.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("{0}")]
    Unexpected(String),
}

/// Commands whose transaction commits are followed by a simulated crash: the participant drops
/// its broker connection before publishing the reply, so the broker requeues the unacknowledged
/// command and redelivers it to the reconnected participant. Give a clone to
/// `Participant::crash_switch`.
#[derive(Clone, Default)]
pub struct CrashSwitch(Arc<Mutex<CrashState>>);

#[derive(Default)]
struct CrashState {
    armed: HashSet<Uuid>,
    fired: HashSet<Uuid>,
}

impl CrashSwitch {
    pub fn new() -> CrashSwitch {
        CrashSwitch::default()
    }

    /// The next commit of `command_id` crashes (once).
    pub fn arm(&self, command_id: Uuid) {
        if let Ok(mut state) = self.0.lock() {
            state.armed.insert(command_id);
        }
    }

    /// Whether the crash for `command_id` happened.
    pub fn fired(&self, command_id: Uuid) -> bool {
        self.0
            .lock()
            .map(|s| s.fired.contains(&command_id))
            .unwrap_or(false)
    }

    /// Called by the participant after a commit: true if it must crash now.
    pub(crate) fn fire(&self, command_id: Uuid) -> bool {
        let Ok(mut state) = self.0.lock() else {
            return false;
        };
        if state.armed.remove(&command_id) {
            state.fired.insert(command_id);
            return true;
        }
        false
    }
}

/// A command to send; the builder methods make changed copies.
#[derive(Debug, Clone, PartialEq)]
pub struct TestCommand {
    pub body: CommandBody,
    /// Sent as the `traceparent` header.
    pub traceparent: Option<String>,
}

impl TestCommand {
    /// An action command of a new saga, first attempt, for the step of the same name, with
    /// input `{}`.
    pub fn action(command: &str) -> TestCommand {
        TestCommand {
            body: CommandBody {
                command_id: Uuid::now_v7(),
                saga_id: Uuid::now_v7(),
                definition: "test".into(),
                definition_version: 1,
                step: command.into(),
                kind: "action".into(),
                command: command.into(),
                attempt: 1,
                input: json!({}),
                outputs: Value::Object(Map::new()),
            },
            traceparent: None,
        }
    }

    pub fn command_id(&self) -> Uuid {
        self.body.command_id
    }

    pub fn saga_id(&self) -> Uuid {
        self.body.saga_id
    }

    pub fn input(mut self, input: Value) -> TestCommand {
        self.body.input = input;
        self
    }

    pub fn outputs(mut self, outputs: Value) -> TestCommand {
        self.body.outputs = outputs;
        self
    }

    pub fn step(mut self, step: &str) -> TestCommand {
        self.body.step = step.into();
        self
    }

    pub fn saga(mut self, saga_id: Uuid) -> TestCommand {
        self.body.saga_id = saga_id;
        self
    }

    pub fn traceparent(mut self, traceparent: &str) -> TestCommand {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// The same command for a new saga (new saga and command ids).
    pub fn new_saga(&self) -> TestCommand {
        let mut next = self.clone();
        next.body.saga_id = Uuid::now_v7();
        next.body.command_id = Uuid::now_v7();
        next
    }

    /// The next attempt of the same step: a new command id, attempt + 1.
    pub fn retry(&self) -> TestCommand {
        let mut next = self.clone();
        next.body.command_id = Uuid::now_v7();
        next.body.attempt += 1;
        next
    }

    /// The compensation `command` of this step of this saga (a new command id, first attempt).
    pub fn compensation(&self, command: &str) -> TestCommand {
        let mut next = self.clone();
        next.body.command_id = Uuid::now_v7();
        next.body.kind = "compensation".into();
        next.body.command = command.into();
        next.body.attempt = 1;
        next
    }
}

/// A reply as the kit received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Parsed as sagad parses replies.
    pub body: ReplyBody,
    /// The bytes received.
    pub raw: Vec<u8>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub traceparent: Option<String>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        self.body.outcome == ReplyOutcome::Success
    }

    pub fn is_failure(&self) -> bool {
        self.body.outcome == ReplyOutcome::Failure
    }

    /// The failure's reason ("" for a success).
    pub fn reason(&self) -> &str {
        self.body.reason.as_deref().unwrap_or("")
    }
}

/// A message taken from `saga.dead-letter`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub headers: FieldTable,
}

/// Sends commands to one participant's queue and collects its replies.
pub struct CommandKit {
    participant: String,
    connection: Connection,
    channel: Channel,
    replies_queue: String,
    replies: Consumer,
    received: HashMap<String, VecDeque<Reply>>,
    /// How long each wait for a reply or a dead letter lasts (default 15 s).
    pub timeout: Duration,
}

impl CommandKit {
    /// Connects, declares the participant's topology (as sagad would) and a private reply
    /// queue.
    pub async fn connect(amqp_url: &str, participant: &str) -> Result<CommandKit, KitError> {
        let connection = amqp::connect(amqp_url, None).await?;
        let channel = connection.create_channel().await?;
        saga_contract::declare_participant_topology(&channel, [participant]).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let replies_queue = queue.name().as_str().to_string();
        let replies = channel
            .basic_consume(
                replies_queue.as_str().into(),
                "saga-participant-kit".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(CommandKit {
            participant: participant.into(),
            connection,
            channel,
            replies_queue,
            replies,
            received: HashMap::new(),
            timeout: Duration::from_secs(15),
        })
    }

    /// The private queue replies go to.
    pub fn replies_queue(&self) -> &str {
        &self.replies_queue
    }

    /// Publishes `command` as sagad does: to `saga.commands`, routed by participant, with its
    /// properties and headers, and `reply_to` the kit's queue.
    pub async fn send(&self, command: &TestCommand) -> Result<(), KitError> {
        let out = render::command(&self.participant, &command.body, None)
            .map_err(|e| KitError::Unexpected(format!("rendering a command: {e}")))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let properties = render::amqp_properties(
            out.message_id,
            now,
            &out.properties,
            command.traceparent.clone(),
        )
        .with_reply_to(self.replies_queue.as_str().into());
        self.publish(out.exchange, &out.routing_key, &out.body, properties)
            .await
    }

    /// Publishes any body to the participant's queue (e.g. a malformed command), with the
    /// kit's `reply_to` and, if given, a `message_id`.
    pub async fn send_raw(&self, body: &[u8], message_id: Option<&str>) -> Result<(), KitError> {
        let mut properties = lapin::BasicProperties::default()
            .with_content_type(saga_contract::JSON.into())
            .with_delivery_mode(2)
            .with_reply_to(self.replies_queue.as_str().into());
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        self.publish(COMMANDS_EXCHANGE, &self.participant, body, properties)
            .await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<(), KitError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(KitError::Unexpected("the broker refused a command".into()));
        }
        if confirm.take_message().is_some() {
            return Err(KitError::Unexpected(format!(
                "no queue for participant {:?}",
                self.participant
            )));
        }
        Ok(())
    }

    /// The next reply to `command` not returned yet.
    pub async fn reply(&mut self, command: &TestCommand) -> Result<Reply, KitError> {
        self.reply_to(command.command_id()).await
    }

    /// The next reply with correlation id `command_id` not returned yet.
    pub async fn reply_to(&mut self, command_id: Uuid) -> Result<Reply, KitError> {
        let key = command_id.to_string();
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(reply) = self.received.get_mut(&key).and_then(VecDeque::pop_front) {
                return Ok(reply);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.replies.next())
                .await
                .map_err(|_| KitError::Timeout(self.timeout, format!("a reply to {key}")))?;
            let delivery = match next {
                Some(delivery) => delivery?,
                None => return Err(KitError::Unexpected("the reply consumer ended".into())),
            };
            let props = &delivery.properties;
            let body = ReplyBody::parse(&delivery.data).map_err(|e| {
                KitError::Unexpected(format!(
                    "a reply sagad would dead-letter: {e}: {}",
                    String::from_utf8_lossy(&delivery.data)
                ))
            })?;
            let headers = props.headers().clone().unwrap_or_default();
            let reply = Reply {
                body,
                raw: delivery.data.clone(),
                correlation_id: props.correlation_id().as_ref().map(|c| c.to_string()),
                content_type: props.content_type().as_ref().map(|c| c.to_string()),
                delivery_mode: *props.delivery_mode(),
                traceparent: header_str(&headers, H_TRACEPARENT).map(str::to_owned),
            };
            self.received
                .entry(reply.correlation_id.clone().unwrap_or_default())
                .or_default()
                .push_back(reply);
        }
    }

    /// The next message of `saga.dead-letter` (taken off the queue).
    pub async fn dead_letter(&self) -> Result<DeadLetter, KitError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let got = self
                .channel
                .basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions { no_ack: true })
                .await?;
            if let Some(message) = got {
                let props = &message.delivery.properties;
                return Ok(DeadLetter {
                    message_id: props.message_id().as_ref().map(|m| m.to_string()),
                    headers: props.headers().clone().unwrap_or_default(),
                    body: message.delivery.data,
                });
            }
            if Instant::now() > deadline {
                return Err(KitError::Timeout(self.timeout, "a dead letter".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // --- the scenarios ------------------------------------------------------------------------

    /// Sends `command` twice (a redelivery, or the orchestrator re-publishing its outbox row);
    /// returns both replies, which should be the same bytes.
    pub async fn deliver_twice(
        &mut self,
        command: &TestCommand,
    ) -> Result<(Reply, Reply), KitError> {
        self.send(command).await?;
        self.send(command).await?;
        Ok((self.reply(command).await?, self.reply(command).await?))
    }

    /// Sends the compensation `compensation` of `action`'s step first and waits for its reply,
    /// then `action` itself (the attempt the orchestrator gave up on, arriving late); returns
    /// (the compensation's reply, the action's reply). The action must be refused.
    pub async fn compensate_before_action(
        &mut self,
        action: &TestCommand,
        compensation: &str,
    ) -> Result<(Reply, Reply), KitError> {
        let undo = action.compensation(compensation);
        self.send(&undo).await?;
        let undone = self.reply(&undo).await?;
        self.send(action).await?;
        Ok((undone, self.reply(action).await?))
    }

    /// Sends `command`, then its retry (the orchestrator timed out waiting: a new command id);
    /// returns both replies. The retry should be a success with the first attempt's output.
    pub async fn retry_applied(
        &mut self,
        command: &TestCommand,
    ) -> Result<(Reply, Reply), KitError> {
        self.send(command).await?;
        let first = self.reply(command).await?;
        let retry = command.retry();
        self.send(&retry).await?;
        Ok((first, self.reply(&retry).await?))
    }

    /// Sends `command` with `switch` armed for it: the participant commits, then loses its
    /// broker connection before replying; the broker redelivers the command once the
    /// participant reconnected. Returns the reply to the redelivery (the stored one).
    pub async fn crash_after_commit(
        &mut self,
        switch: &CrashSwitch,
        command: &TestCommand,
    ) -> Result<Reply, KitError> {
        switch.arm(command.command_id());
        self.send(command).await?;
        // Reconnecting takes the participant's back-off (0.5 s by default) on top.
        let reply = self.reply(command).await?;
        if !switch.fired(command.command_id()) {
            return Err(KitError::Unexpected(format!(
                "command {} was answered without crashing: is the switch given to the participant?",
                command.command_id()
            )));
        }
        Ok(reply)
    }

    /// Sends `body` to the participant's queue and returns it from `saga.dead-letter`.
    pub async fn malformed(&mut self, body: &[u8]) -> Result<DeadLetter, KitError> {
        self.send_raw(body, None).await?;
        self.dead_letter().await
    }

    /// Closes the connection (dropping the kit closes it too, less politely).
    pub async fn close(self) -> Result<(), KitError> {
        self.connection.close(200, "done".into()).await?;
        Ok(())
    }
}

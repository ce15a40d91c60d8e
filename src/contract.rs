//! The AMQP wire contract with participants (documented in `docs/participant-contract.md`):
//! names, message bodies and the topology. Shared by `sagad` and the demo participants so the
//! two cannot drift apart.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub const COMMANDS_EXCHANGE: &str = "saga.commands";
pub const REPLIES_QUEUE: &str = "saga.replies";
pub const DEAD_LETTER_EXCHANGE: &str = "saga.dead-letter";
pub const DEAD_LETTER_QUEUE: &str = "saga.dead-letter";
/// Saga lifecycle events (started, completed, compensated, needs_operator) for read models.
pub const EVENTS_EXCHANGE: &str = "saga.events";
pub const JSON: &str = "application/json";

pub const H_SAGA_ID: &str = "saga-id";
pub const H_DEFINITION: &str = "saga-definition";
pub const H_STEP: &str = "saga-step";
pub const H_KIND: &str = "saga-kind";
pub const H_ATTEMPT: &str = "saga-attempt";
/// Set on dead-lettered messages: why the orchestrator refused them.
pub const H_ERROR: &str = "x-saga-error";

/// Largest reply body accepted; bigger ones are dead-lettered.
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

pub fn participant_queue(participant: &str) -> String {
    format!("saga.participant.{participant}")
}

/// The body of a command message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandBody {
    pub command_id: Uuid,
    pub saga_id: Uuid,
    pub definition: String,
    pub definition_version: u32,
    pub step: String,
    /// `action` or `compensation`.
    pub kind: String,
    pub command: String,
    pub attempt: u32,
    pub input: Value,
    pub outputs: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyOutcome {
    Success,
    Failure,
}

/// The body of a reply message. Unknown fields are ignored so participants can add their own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyBody {
    pub command_id: Uuid,
    pub outcome: ReplyOutcome,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
}

impl ReplyBody {
    pub fn success(command_id: Uuid, output: Value) -> Self {
        ReplyBody {
            command_id,
            outcome: ReplyOutcome::Success,
            output,
            reason: None,
            retryable: false,
        }
    }

    pub fn failure(command_id: Uuid, reason: impl Into<String>, retryable: bool) -> Self {
        ReplyBody {
            command_id,
            outcome: ReplyOutcome::Failure,
            output: Value::Null,
            reason: Some(reason.into()),
            retryable,
        }
    }

    /// Parses and checks a reply, saying precisely what is wrong for the dead-letter header.
    pub fn parse(bytes: &[u8]) -> Result<ReplyBody, String> {
        if bytes.len() > MAX_REPLY_BYTES {
            return Err(format!(
                "reply of {} bytes exceeds the limit of {MAX_REPLY_BYTES}",
                bytes.len()
            ));
        }
        let reply: ReplyBody =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid reply: {e}"))?;
        if reply.outcome == ReplyOutcome::Failure
            && reply.reason.as_deref().unwrap_or("").trim().is_empty()
        {
            return Err("invalid reply: a failure needs a non-empty `reason`".into());
        }
        Ok(reply)
    }
}

/// A lifecycle event: who and what happened, nothing more (details come from `GetSaga`), so
/// consumers do not couple to the saga's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    pub event_id: Uuid,
    pub saga_id: Uuid,
    pub definition: String,
    pub definition_version: u32,
    /// `started`, `completed`, `compensated` or `needs_operator`.
    pub event: String,
    /// RFC 3339.
    pub at: String,
}

/// Arguments every queue that may hold a poison message carries.
fn dead_lettered() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    args
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares the dead-letter path, the command exchange and one queue per participant.
/// Idempotent: `sagad` replicas and participants may all call it.
pub async fn declare_participant_topology<'a>(
    channel: &Channel,
    participants: impl IntoIterator<Item = &'a str>,
) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            DEAD_LETTER_QUEUE.into(),
            durable_queue(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            COMMANDS_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            EVENTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    for participant in participants {
        let queue = participant_queue(participant);
        channel
            .queue_declare(queue.as_str().into(), durable_queue(), dead_lettered())
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                COMMANDS_EXCHANGE.into(),
                participant.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Everything `sagad` needs: the participant topology plus the reply queue.
pub async fn declare_topology<'a>(
    channel: &Channel,
    participants: impl IntoIterator<Item = &'a str>,
) -> lapin::Result<()> {
    declare_participant_topology(channel, participants).await?;
    channel
        .queue_declare(REPLIES_QUEUE.into(), durable_queue(), dead_lettered())
        .await?;
    Ok(())
}

/// Reads a string header.
pub fn header_str<'a>(headers: &'a FieldTable, name: &str) -> Option<&'a str> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_parse_and_bad_ones_say_why() {
        let id = Uuid::now_v7();
        let ok = ReplyBody::parse(
            json!({"command_id": id, "outcome": "success", "output": {"a": 1}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(ok, ReplyBody::success(id, json!({"a": 1})));
        let failed = ReplyBody::parse(
            json!({"command_id": id, "outcome": "failure", "reason": "declined"})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(failed, ReplyBody::failure(id, "declined", false));

        for (body, needle) in [
            ("not json".to_string(), "expected ident"),
            (
                json!({"outcome": "success"}).to_string(),
                "missing field `command_id`",
            ),
            (
                json!({"command_id": 7, "outcome": "success"}).to_string(),
                "invalid type",
            ),
            (
                json!({"command_id": id, "outcome": "maybe"}).to_string(),
                "unknown variant `maybe`",
            ),
            (
                json!({"command_id": id, "outcome": "failure"}).to_string(),
                "non-empty `reason`",
            ),
        ] {
            let e = ReplyBody::parse(body.as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
        }
        let huge = vec![b' '; MAX_REPLY_BYTES + 1];
        assert!(ReplyBody::parse(&huge).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn reply_bodies_round_trip_as_documented() {
        let id = Uuid::nil();
        let text = serde_json::to_value(ReplyBody::failure(id, "card declined", true)).unwrap();
        assert_eq!(
            text,
            json!({"command_id": id, "outcome": "failure", "reason": "card declined", "retryable": true})
        );
    }
}

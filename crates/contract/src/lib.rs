//! The AMQP wire contract with participants (documented in `docs/participant-contract.md`):
//! names, message bodies and the topology. Shared by `sagad` and the demo participants so the
//! two cannot drift apart.

// Replies come from every participant, well-formed or not: parsing one must never panic.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod amqp;
pub mod render;

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
/// Saga lifecycle events (started, completed, compensated, needs_operator, resolved) for read
/// models.
pub const EVENTS_EXCHANGE: &str = "saga.events";
pub const JSON: &str = "application/json";

pub const H_SAGA_ID: &str = "saga-id";
pub const H_DEFINITION: &str = "saga-definition";
pub const H_STEP: &str = "saga-step";
pub const H_KIND: &str = "saga-kind";
pub const H_ATTEMPT: &str = "saga-attempt";
/// Set on dead-lettered messages: why the orchestrator refused them.
pub const H_ERROR: &str = "x-saga-error";
/// Set on a dead-lettered copy whose own headers had to be dropped for the reason to fit in
/// one AMQP frame: names them.
pub const H_SHORTENED: &str = "x-saga-shortened";

/// Largest reply body accepted; bigger ones are dead-lettered.
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// Most bytes of a caller's value quoted in a reason or an error message. Without a bound, a
/// 200 KB `outcome` quoted in a dead-letter header exceeds the AMQP frame size: the broker
/// closes the connection and the reply comes back for ever.
pub const MAX_QUOTE_BYTES: usize = 256;

/// Most bytes of a whole reason (dead-letter header, error message), "…" included.
pub const MAX_REASON_BYTES: usize = 1024;

/// Recorded as a failure's reason when the participant gave none.
pub const NO_REASON: &str = "no reason given";

/// At most `max` bytes of `text`, cut on a char boundary, with "…" appended when cut.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let ellipsis = "…";
    let mut end = max.saturating_sub(ellipsis.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{ellipsis}", &text[..end]))
}

/// A caller's value for quoting in a message: at most [`MAX_QUOTE_BYTES`].
pub fn quote(text: &str) -> std::borrow::Cow<'_, str> {
    bounded(text, MAX_QUOTE_BYTES)
}

/// A reason for a header or a log line: at most [`MAX_REASON_BYTES`]. Error messages of the JSON
/// parser quote the offending value whole, so every reason built from one goes through here.
pub fn reason(text: &str) -> String {
    bounded(text, MAX_REASON_BYTES).into_owned()
}

/// Deepest nesting of arrays and objects accepted in a saga input or a step output. Commands
/// carry them two levels deeper (`outputs.<step>.…`), and participants' JSON parsers have
/// limits (serde_json's is 128, others' differ): a value a participant cannot parse would
/// make every command of its saga fail there.
pub const MAX_JSON_DEPTH: usize = 64;

/// How deeply `value` nests arrays and objects: 0 for a scalar, 1 for `{}` or `[1]`.
pub fn json_depth(value: &Value) -> usize {
    // Parsed values are at most 128 deep (the parser's own limit), so recursion is bounded.
    match value {
        Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `null` reads as the field's default: Java, C# and Go serializers write `null` for absent
/// optional fields.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

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
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "std::ops::Not::not"
    )]
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

    /// Parses and checks a reply, saying precisely what is wrong for the dead-letter header
    /// (in at most [`MAX_REASON_BYTES`]). A failure without a reason gets [`NO_REASON`].
    pub fn parse(bytes: &[u8]) -> Result<ReplyBody, String> {
        if bytes.len() > MAX_REPLY_BYTES {
            return Err(format!(
                "reply of {} bytes exceeds the limit of {MAX_REPLY_BYTES}",
                bytes.len()
            ));
        }
        let mut reply: ReplyBody =
            serde_json::from_slice(bytes).map_err(|e| reason(&format!("invalid reply: {e}")))?;
        if reply.outcome == ReplyOutcome::Failure
            && reply.reason.as_deref().unwrap_or("").trim().is_empty()
        {
            reply.reason = Some(NO_REASON.into());
        }
        if json_depth(&reply.output) > MAX_JSON_DEPTH {
            return Err(format!(
                "invalid reply: `output` nests deeper than {MAX_JSON_DEPTH} levels"
            ));
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
    /// `started`, `completed`, `compensated`, `needs_operator` or `resolved`.
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
        ] {
            let e = ReplyBody::parse(body.as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
        }
        let huge = vec![b' '; MAX_REPLY_BYTES + 1];
        assert!(ReplyBody::parse(&huge).unwrap_err().contains("exceeds"));
        let long = json!({"command_id": id, "outcome": "x".repeat(200_000)}).to_string();
        let e = ReplyBody::parse(long.as_bytes()).unwrap_err();
        assert!(
            e.len() <= MAX_REASON_BYTES && e.ends_with('…'),
            "{}",
            e.len()
        );

        let nest = |depth: usize| -> Value {
            serde_json::from_str(&format!("{}{}", "[".repeat(depth), "]".repeat(depth))).unwrap()
        };
        let deep = |depth| json!({"command_id": id, "outcome": "success", "output": nest(depth)});
        assert!(ReplyBody::parse(deep(MAX_JSON_DEPTH).to_string().as_bytes()).is_ok());
        let e = ReplyBody::parse(deep(MAX_JSON_DEPTH + 1).to_string().as_bytes()).unwrap_err();
        assert!(e.contains("deeper than 64"), "{e}");
    }

    #[test]
    fn nulls_mean_absent_and_a_failure_without_a_reason_gets_a_default() {
        let id = Uuid::now_v7();
        let parse = |v: Value| ReplyBody::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(
            parse(
                json!({"command_id": id, "outcome": "success", "output": null, "reason": null, "retryable": null})
            ),
            ReplyBody::success(id, Value::Null)
        );
        assert_eq!(
            parse(
                json!({"command_id": id, "outcome": "failure", "reason": null, "retryable": null})
            ),
            ReplyBody::failure(id, NO_REASON, false)
        );
        assert_eq!(
            parse(json!({"command_id": id, "outcome": "failure", "retryable": true})),
            ReplyBody::failure(id, NO_REASON, true)
        );
    }

    #[test]
    fn bounded_cuts_on_a_char_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let cut = bounded("ééééé", 6);
        assert_eq!(cut, "é…");
        assert!(cut.len() <= 6);
        assert_eq!(bounded("abcdef", 4), "a…");
        assert_eq!(bounded("abcdef", 0), "…");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                "[0-9]{1,40}(\\.[0-9]{1,30})?"
                    .prop_map(|n| { serde_json::from_str(&n).unwrap_or(Value::Null) }),
                ".{0,64}".prop_map(Value::String),
                (0usize..3000).prop_map(|n| Value::String("é".repeat(n))),
            ];
            leaf.prop_recursive(6, 64, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    proptest::collection::btree_map(".{0,16}", inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A reply-shaped object whose fields may each be missing, null, of the wrong type or
        /// oversized.
        fn reply_like() -> impl Strategy<Value = Value> {
            let field = |good: BoxedStrategy<Value>| {
                prop_oneof![
                    Just(None),
                    Just(Some(Value::Null)),
                    good.prop_map(Some),
                    json_value().prop_map(Some),
                ]
            };
            let uuid = any::<u128>()
                .prop_map(|n| json!(Uuid::from_u128(n)))
                .boxed();
            let outcome = prop_oneof![
                Just(json!("success")),
                Just(json!("failure")),
                (0usize..300_000).prop_map(|n| json!("x".repeat(n))),
            ]
            .boxed();
            (
                field(uuid),
                field(outcome),
                field(json_value().boxed()),
                field(".{0,300}".prop_map(Value::String).boxed()),
                field(any::<bool>().prop_map(Value::Bool).boxed()),
            )
                .prop_map(|(c, o, out, r, retry)| {
                    let mut m = serde_json::Map::new();
                    for (k, v) in [
                        ("command_id", c),
                        ("outcome", o),
                        ("output", out),
                        ("reason", r),
                        ("retryable", retry),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.into(), v);
                        }
                    }
                    Value::Object(m)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_bytes_parse_or_are_refused_briefly(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048)
            ) {
                if let Err(e) = ReplyBody::parse(&bytes) {
                    prop_assert!(e.len() <= MAX_REASON_BYTES, "{}", e.len());
                }
            }

            #[test]
            fn reply_shaped_bodies_parse_or_are_refused_briefly(body in reply_like()) {
                match ReplyBody::parse(body.to_string().as_bytes()) {
                    Ok(reply) => {
                        prop_assert_eq!(json!(reply.command_id), body["command_id"].clone());
                        if reply.outcome == ReplyOutcome::Failure {
                            prop_assert!(!reply.reason.unwrap_or_default().trim().is_empty());
                        }
                    }
                    Err(e) => prop_assert!(e.len() <= MAX_REASON_BYTES, "{}", e.len()),
                }
            }

            #[test]
            fn bounded_text_is_a_bounded_prefix(text in ".{0,600}", max in 0usize..700) {
                let cut = bounded(&text, max);
                prop_assert!(cut.len() <= max.max("…".len()));
                prop_assert!(text.starts_with(cut.trim_end_matches('…')));
            }

            #[test]
            fn headers_of_any_kind_are_read_without_panicking(
                name in ".{0,40}",
                value in proptest::collection::vec(any::<u8>(), 0..512),
            ) {
                let mut headers = FieldTable::default();
                headers.insert(
                    name.as_str().into(),
                    AMQPValue::LongString(value.clone().into()),
                );
                let read = header_str(&headers, &name);
                prop_assert_eq!(read.is_some(), std::str::from_utf8(&value).is_ok());
            }
        }
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

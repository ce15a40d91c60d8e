//! How sagad's outgoing messages look on the wire: the body, the AMQP properties and the headers
//! a participant (or an event consumer) reads. sagad renders a message when its transition
//! commits and keeps the rendering in its outbox as JSON ([`Outgoing::properties`]), so what
//! goes out after a restart is exactly what was decided; [`amqp_properties`] turns that JSON into
//! the properties it is published with.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    COMMANDS_EXCHANGE, CommandBody, EVENTS_EXCHANGE, H_ATTEMPT, H_DEFINITION, H_KIND, H_SAGA_ID,
    H_STEP, JSON, LifecycleEvent, REPLIES_QUEUE,
};

/// The header that carries the W3C trace context of the publish, so a participant's work joins
/// the trace of the call that started the saga.
pub const H_TRACEPARENT: &str = "traceparent";

/// A message ready to be stored in the outbox and published later.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub exchange: &'static str,
    pub routing_key: String,
    pub message_id: Uuid,
    /// The AMQP properties and headers, and the trace context (`parent`) the publish continues.
    pub properties: Value,
    pub body: Vec<u8>,
}

/// A command for `participant`. `parent` is the trace context of the call that started the saga.
pub fn command(
    participant: &str,
    body: &CommandBody,
    parent: Option<&str>,
) -> Result<Outgoing, serde_json::Error> {
    let properties = json!({
        "type": body.command,
        "correlation_id": body.saga_id.to_string(),
        "reply_to": REPLIES_QUEUE,
        "parent": parent,
        "headers": {
            H_SAGA_ID: body.saga_id.to_string(),
            H_DEFINITION: body.definition,
            H_STEP: body.step,
            H_KIND: body.kind,
            H_ATTEMPT: body.attempt,
        },
    });
    Ok(Outgoing {
        exchange: COMMANDS_EXCHANGE,
        routing_key: participant.to_string(),
        message_id: body.command_id,
        properties,
        body: serde_json::to_vec(body)?,
    })
}

/// A lifecycle event, routed by `<definition>.<event>`.
pub fn lifecycle(
    event: &LifecycleEvent,
    parent: Option<&str>,
) -> Result<Outgoing, serde_json::Error> {
    let properties = json!({
        "type": format!("saga.{}", event.event),
        "correlation_id": event.saga_id.to_string(),
        "parent": parent,
        "headers": { H_SAGA_ID: event.saga_id.to_string(), H_DEFINITION: event.definition },
    });
    Ok(Outgoing {
        exchange: EVENTS_EXCHANGE,
        routing_key: format!("{}.{}", event.definition, event.event),
        message_id: event.event_id,
        properties,
        body: serde_json::to_vec(event)?,
    })
}

/// The trace context a stored message's publish continues.
pub fn parent(properties: &Value) -> Option<&str> {
    properties.get("parent").and_then(Value::as_str)
}

/// The properties a stored message is published with: persistent, JSON, its id, the time it
/// was created (`timestamp`, Unix seconds), its headers, and `traceparent` if the publish is
/// traced.
pub fn amqp_properties(
    message_id: Uuid,
    timestamp: u64,
    properties: &Value,
    traceparent: Option<String>,
) -> BasicProperties {
    let text = |k: &str| {
        properties
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut headers = FieldTable::default();
    if let Some(tp) = traceparent {
        headers.insert(H_TRACEPARENT.into(), AMQPValue::LongString(tp.into()));
    }
    if let Some(Value::Object(map)) = properties.get("headers") {
        for (k, v) in map {
            let value = match v {
                Value::Number(n) => AMQPValue::LongLongInt(n.as_i64().unwrap_or_default()),
                Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
                other => AMQPValue::LongString(LongString::from(other.to_string())),
            };
            headers.insert(ShortString::from(k.as_str()), value);
        }
    }
    let mut rendered = BasicProperties::default()
        .with_message_id(message_id.to_string().into())
        .with_correlation_id(text("correlation_id").into())
        .with_type(text("type").into())
        .with_content_type(JSON.into())
        .with_delivery_mode(2)
        .with_timestamp(timestamp)
        .with_headers(headers);
    if properties.get("reply_to").is_some() {
        rendered = rendered.with_reply_to(text("reply_to").into());
    }
    rendered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header_str;

    #[test]
    fn a_command_carries_what_a_participant_routes_and_deduplicates_on() {
        let body = CommandBody {
            command_id: Uuid::now_v7(),
            saga_id: Uuid::now_v7(),
            definition: "order".into(),
            definition_version: 2,
            step: "pay".into(),
            kind: "action".into(),
            command: "authorize_payment".into(),
            attempt: 3,
            input: json!({"amount": 1}),
            outputs: json!({}),
        };
        let out = command("payment", &body, Some("00-abc-def-01")).unwrap();
        assert_eq!(
            (out.exchange, out.routing_key.as_str()),
            (COMMANDS_EXCHANGE, "payment")
        );
        assert_eq!(parent(&out.properties), Some("00-abc-def-01"));
        let props = amqp_properties(out.message_id, 7, &out.properties, Some("tp".into()));
        assert_eq!(
            props.message_id().as_ref().map(|m| m.as_str().to_string()),
            Some(body.command_id.to_string())
        );
        assert_eq!(
            props.kind().as_ref().map(|t| t.as_str()),
            Some("authorize_payment")
        );
        assert_eq!(
            props.reply_to().as_ref().map(|r| r.as_str()),
            Some(REPLIES_QUEUE)
        );
        let headers = props.headers().clone().unwrap_or_default();
        assert_eq!(header_str(&headers, H_STEP), Some("pay"));
        assert_eq!(header_str(&headers, H_TRACEPARENT), Some("tp"));
        assert_eq!(
            headers.inner().get(H_ATTEMPT),
            Some(&AMQPValue::LongLongInt(3))
        );
        let parsed: CommandBody = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(parsed, body);
    }
}

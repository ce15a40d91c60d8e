//! Commands as handlers see them, and the checks that tell a command from a malformed message.

use std::fmt;

use saga_contract::{CommandBody, reason};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Whether a command does a step or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Action,
    Compensation,
}

impl Kind {
    /// As on the wire and in the barrier tables: `action` or `compensation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Action => "action",
            Kind::Compensation => "compensation",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One command from the orchestrator (docs/participant-contract.md, *Commands*): the body's
/// fields, typed, and what the message adds.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command id (the message's `message_id`): unique per attempt.
    pub command_id: Uuid,
    pub saga_id: Uuid,
    /// Definition name, e.g. `order_fulfillment`.
    pub definition: String,
    pub definition_version: u32,
    /// Step name. Key effects by `(saga_id, step)` so retries and compensations find them.
    pub step: String,
    pub kind: Kind,
    /// The command name (the step's `action` or `compensation`).
    pub command: String,
    /// 1 for the first attempt, 2 for the first retry, …
    pub attempt: u32,
    /// The saga's input, or the step's mapped input. Numbers are exact (`serde_json` with
    /// `arbitrary_precision`): read amounts with `as_i64`, or as text for decimals.
    pub input: Value,
    /// The output of each step that succeeded so far, by step name (`{}` for a mapped input).
    pub outputs: Map<String, Value>,
    /// W3C trace context of the command's publish, when it carried a valid one.
    pub traceparent: Option<String>,
    /// When the orchestrator created the command (seconds since the epoch).
    pub timestamp: Option<u64>,
    /// The broker delivers this message again (an earlier delivery was not acknowledged).
    pub redelivered: bool,
}

/// Builds a [`Command`] from a message, or says why it is not one (for the log; the message is
/// dead-lettered).
pub(crate) fn parse(
    body: &[u8],
    message_id: Option<&str>,
    traceparent: Option<&str>,
    timestamp: Option<u64>,
    redelivered: bool,
) -> Result<Command, String> {
    let mut object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err("the body is not a JSON object".into()),
        Err(e) => return Err(reason(&format!("the body is not JSON: {e}"))),
    };
    // A missing `input` would read as null: refuse it rather than guess.
    if !object.contains_key("input") {
        return Err("field `input` is missing".into());
    }
    if matches!(object.get("outputs"), None | Some(Value::Null)) {
        object.insert("outputs".into(), Value::Object(Map::new()));
    }
    let body: CommandBody = serde_json::from_value(Value::Object(object))
        .map_err(|e| reason(&format!("invalid command: {e}")))?;
    if let Some(id) = message_id
        && Uuid::parse_str(id).ok() != Some(body.command_id)
    {
        // De-duplication keys on the command id: a message whose two ids disagree cannot be
        // de-duplicated safely.
        return Err(reason(&format!(
            "message_id {:?} differs from the body's command_id {}",
            saga_contract::quote(id),
            body.command_id
        )));
    }
    let kind = match body.kind.as_str() {
        "action" => Kind::Action,
        "compensation" => Kind::Compensation,
        other => {
            return Err(reason(&format!(
                "field `kind` is {:?}, not `action` or `compensation`",
                saga_contract::quote(other)
            )));
        }
    };
    for (field, value) in [
        ("definition", &body.definition),
        ("step", &body.step),
        ("command", &body.command),
    ] {
        if value.is_empty() {
            return Err(format!("field `{field}` is empty"));
        }
    }
    let Value::Object(outputs) = body.outputs else {
        return Err("field `outputs` is not a JSON object".into());
    };
    Ok(Command {
        command_id: body.command_id,
        saga_id: body.saga_id,
        definition: body.definition,
        definition_version: body.definition_version,
        step: body.step,
        kind,
        command: body.command,
        attempt: body.attempt,
        input: body.input,
        outputs,
        traceparent: traceparent
            .filter(|t| crate::trace::TraceParent::parse(t).is_some())
            .map(str::to_owned),
        timestamp,
        redelivered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "0190f5a4-6a5e-7d3c-9a0e-1b2c3d4e5f60";

    fn body() -> Value {
        json!({
            "command_id": ID, "saga_id": Uuid::max(), "definition": "order",
            "definition_version": 2, "step": "pay", "kind": "compensation",
            "command": "refund_payment", "attempt": 3,
            "input": {"amount": serde_json::from_str::<Value>("12.345678901234567890123").unwrap()},
            "outputs": {"a": {"b": 1}}
        })
    }

    fn parse_value(v: &Value, message_id: Option<&str>) -> Result<Command, String> {
        parse(v.to_string().as_bytes(), message_id, None, None, false)
    }

    #[test]
    fn a_command_parses_with_exact_numbers() {
        let cmd = parse(
            body().to_string().as_bytes(),
            Some(ID),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some(7),
            true,
        )
        .unwrap();
        assert_eq!(cmd.kind, Kind::Compensation);
        assert_eq!((cmd.attempt, cmd.definition_version), (3, 2));
        assert_eq!(cmd.input["amount"].to_string(), "12.345678901234567890123");
        assert_eq!(cmd.outputs["a"], json!({"b": 1}));
        assert!(cmd.traceparent.is_some() && cmd.redelivered);
        assert_eq!(cmd.timestamp, Some(7));
        // A bad trace context is dropped, not a reason to refuse the command.
        let cmd = parse(
            body().to_string().as_bytes(),
            None,
            Some("nope"),
            None,
            false,
        )
        .unwrap();
        assert_eq!(cmd.traceparent, None);
        let mut no_outputs = body();
        no_outputs["outputs"] = Value::Null;
        assert!(parse_value(&no_outputs, None).unwrap().outputs.is_empty());
    }

    #[test]
    fn malformed_commands_say_why() {
        let with = |field: &str, value: Value| {
            let mut b = body();
            b[field] = value;
            b
        };
        let without = |field: &str| {
            let mut b = body();
            b.as_object_mut().unwrap().remove(field);
            b
        };
        for (value, needle) in [
            (json!([1]), "not a JSON object"),
            (without("input"), "`input` is missing"),
            (without("saga_id"), "missing field `saga_id`"),
            (with("command_id", json!("x")), "invalid command"),
            (with("attempt", json!(-1)), "invalid command"),
            (with("attempt", json!("1")), "invalid command"),
            (with("kind", json!("undo")), "`kind` is \"undo\""),
            (with("step", json!("")), "`step` is empty"),
            (with("outputs", json!([])), "`outputs` is not a JSON object"),
        ] {
            let e = parse_value(&value, None).unwrap_err();
            assert!(e.contains(needle), "{value}: {e}");
        }
        let e = parse(b"{not json", None, None, None, false).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let other = Uuid::now_v7().to_string();
        let e = parse_value(&body(), Some(&other)).unwrap_err();
        assert!(e.contains("differs from the body's command_id"), "{e}");
        // The same id in another spelling is the same id.
        assert!(parse_value(&body(), Some(&ID.to_uppercase())).is_ok());
    }
}

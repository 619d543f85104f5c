//! Reading what earlier versions wrote: snapshots and log entries of version 1.
//!
//! Version 1 kept the build request and every stage output as JSON text inside the JSON of a
//! command or a snapshot (`"request": "{\"dockerfile\":...}"`, `"output": "{\"config\":...}"`);
//! version 2 keeps them as typed values. Migrating is the same for both: every `request` and
//! `output` string is parsed into the value it holds, then the document is read with today's
//! types (fields version 2 added take their defaults, fields it dropped are ignored).

use serde_json::Value;

use super::command::{Command, Rejection};

/// Parses the JSON text that version 1 kept in `request` and `output` fields, everywhere in
/// `doc`.
fn unwrap_json_text(doc: &mut Value) -> Result<(), String> {
    match doc {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if matches!(key.as_str(), "request" | "output")
                    && let Value::String(text) = value
                {
                    *value = serde_json::from_str(text)
                        .map_err(|e| format!("the {key} kept as text does not parse: {e}"))?;
                }
                unwrap_json_text(value)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                unwrap_json_text(item)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A version-1 log entry: `{"version":1,"command":{"op":...}}`.
pub(super) fn command_v1(bytes: &[u8]) -> Result<Command, Rejection> {
    let malformed = |error: String| Rejection::Malformed { error };
    let mut envelope: Value =
        serde_json::from_slice(bytes).map_err(|e| malformed(format!("JSON entry: {e}")))?;
    match envelope.get("version").and_then(Value::as_u64) {
        Some(1) => {}
        Some(found) => {
            return Err(Rejection::UnsupportedVersion {
                found: u32::try_from(found).unwrap_or(u32::MAX),
                supported: super::COMMAND_VERSION,
            });
        }
        None => return Err(malformed("JSON entry without a version".into())),
    }
    let command = envelope
        .get_mut("command")
        .ok_or_else(|| malformed("version 1 entry without a command".into()))?;
    unwrap_json_text(command).map_err(malformed)?;
    serde_json::from_value(command.take()).map_err(|e| malformed(format!("version 1 entry: {e}")))
}

/// A version-1 snapshot's state, as version 2 JSON.
pub(super) fn snapshot_v1(bytes: &[u8]) -> Result<Value, String> {
    let mut snapshot: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let state = snapshot
        .get_mut("state")
        .ok_or("version 1 snapshot without a state")?;
    unwrap_json_text(state)?;
    Ok(state.take())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_fields_become_values_at_any_depth() {
        let mut doc = serde_json::json!({
            "op": "batch",
            "commands": [{"op": "complete_job", "result": {"output": "{\"key\":\"k\"}", "key": "k"}}],
            "request": "{\"dockerfile\":\"FROM a\"}",
            "other": "{\"left\":\"alone\"}"
        });
        unwrap_json_text(&mut doc).unwrap();
        assert_eq!(doc["commands"][0]["result"]["output"]["key"], "k");
        assert_eq!(doc["request"]["dockerfile"], "FROM a");
        assert_eq!(doc["other"], "{\"left\":\"alone\"}");
        let mut bad = serde_json::json!({"output": "{not json"});
        assert!(unwrap_json_text(&mut bad).unwrap_err().contains("output"));
    }
}

//! QMP messages, parsed from and written to JSON lines. Pure: no I/O.
//!
//! QEMU is a peer we trust more than a guest, but not blindly: a line that is
//! not valid QMP is an error the caller sees, never a panic.

use serde_json::{Map, Value};

/// A QEMU version as the greeting reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The first message QEMU sends on a QMP connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Greeting {
    pub version: QemuVersion,
    /// QEMU's own package string, e.g. "Debian 1:10.2.2+ds-1".
    pub package: String,
    pub capabilities: Vec<String>,
}

/// An asynchronous event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU stamped it.
    pub timestamp: Option<(i64, i64)>,
}

/// One message from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Greeting(Greeting),
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(Event),
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("QMP message is not JSON: {0}")]
    NotJson(String),
    #[error("QMP message is not a JSON object")]
    NotObject,
    #[error("QMP message has none of QMP, return, error, event")]
    UnknownKind,
    #[error("QMP {what} is malformed")]
    Malformed { what: &'static str },
}

impl Incoming {
    /// Parses one line (one JSON object) received from QEMU.
    pub fn parse(line: &str) -> Result<Incoming, ProtocolError> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
        let Value::Object(mut obj) = value else {
            return Err(ProtocolError::NotObject);
        };
        if let Some(qmp) = obj.remove("QMP") {
            return parse_greeting(qmp).map(Incoming::Greeting);
        }
        let id = obj.remove("id");
        if let Some(value) = obj.remove("return") {
            return Ok(Incoming::Return { id, value });
        }
        if let Some(err) = obj.remove("error") {
            let Value::Object(err) = err else {
                return Err(ProtocolError::Malformed { what: "error" });
            };
            let class = str_field(&err, "class")
                .unwrap_or("GenericError")
                .to_owned();
            let desc = str_field(&err, "desc")
                .ok_or(ProtocolError::Malformed { what: "error" })?
                .to_owned();
            return Ok(Incoming::Error { id, class, desc });
        }
        if let Some(name) = obj.remove("event") {
            let Value::String(name) = name else {
                return Err(ProtocolError::Malformed { what: "event" });
            };
            let data = obj.remove("data").unwrap_or(Value::Null);
            let timestamp = obj.get("timestamp").and_then(|t| {
                Some((
                    t.get("seconds")?.as_i64()?,
                    t.get("microseconds")?.as_i64()?,
                ))
            });
            return Ok(Incoming::Event(Event {
                name,
                data,
                timestamp,
            }));
        }
        Err(ProtocolError::UnknownKind)
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

fn parse_greeting(qmp: Value) -> Result<Greeting, ProtocolError> {
    let bad = ProtocolError::Malformed { what: "greeting" };
    let version = qmp.get("version").ok_or(bad.clone())?;
    let qemu = version.get("qemu").ok_or(bad.clone())?;
    let num = |k: &str| -> Result<u32, ProtocolError> {
        qemu.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(bad.clone())
    };
    let version_parsed = QemuVersion {
        major: num("major")?,
        minor: num("minor")?,
        micro: num("micro")?,
    };
    let package = version
        .get("package")
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim()
        .to_owned();
    let capabilities = qmp
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|caps| {
            caps.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Greeting {
        version: version_parsed,
        package,
        capabilities,
    })
}

/// Serializes a command as one line, newline included.
pub fn command_line(execute: &str, arguments: Option<&Value>, id: u64) -> String {
    let mut obj = Map::new();
    obj.insert("execute".into(), Value::String(execute.into()));
    if let Some(args) = arguments {
        obj.insert("arguments".into(), args.clone());
    }
    obj.insert("id".into(), Value::from(id));
    let mut line = Value::Object(obj).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 10}, "package": "Debian 1:10.2.2+ds-1"}, "capabilities": ["oob"]}}"#;

    #[test]
    fn parses_a_real_greeting() {
        let Incoming::Greeting(g) = Incoming::parse(GREETING).unwrap() else {
            panic!("not a greeting")
        };
        assert_eq!(
            g.version,
            QemuVersion {
                major: 10,
                minor: 2,
                micro: 2
            }
        );
        assert_eq!(g.package, "Debian 1:10.2.2+ds-1");
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
        assert_eq!(g.version.to_string(), "10.2.2");
    }

    #[test]
    fn parses_returns_errors_and_events() {
        assert_eq!(
            Incoming::parse(r#"{"return": {"running": true}, "id": 7}"#).unwrap(),
            Incoming::Return {
                id: Some(json!(7)),
                value: json!({"running": true})
            }
        );
        assert_eq!(
            Incoming::parse(r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 8}"#).unwrap(),
            Incoming::Error {
                id: Some(json!(8)),
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into()
            }
        );
        let Incoming::Event(e) = Incoming::parse(
            r#"{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "STOP"}"#,
        )
        .unwrap() else {
            panic!("not an event")
        };
        assert_eq!(e.name, "STOP");
        assert_eq!(e.data, Value::Null);
        assert_eq!(e.timestamp, Some((1_700_000_000, 12)));
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        for bad in [
            "",
            "not json",
            "[1,2]",
            "{}",
            r#"{"QMP": {}}"#,
            r#"{"QMP": {"version": {"qemu": {"major": -1, "minor": 0, "micro": 0}}}}"#,
            r#"{"error": "oops"}"#,
            r#"{"error": {"class": "X"}}"#,
            r#"{"event": 5}"#,
        ] {
            assert!(Incoming::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn writes_commands_as_lines() {
        let line = command_line("stop", None, 3);
        assert!(line.ends_with('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v, json!({"execute": "stop", "id": 3}));
        let line = command_line("device_del", Some(&json!({"id": "vf0"})), 4);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["arguments"]["id"], "vf0");
    }
}

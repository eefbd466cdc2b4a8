//! Tags: owns reading a configuration value from an EC2 instance tag `nodeagent:KEY` — text
//! that takes the type its key accepts — without ever repeating the value in an error (tags can
//! hold credentials).

use super::Settings;
use toml::Table;

/// Instance tags whose key starts with this configure nodeagent.
pub const TAG_PREFIX: &str = "nodeagent:";

/// One tag as a table. Tags are text: the value is read as a TOML value (`true`, `30`,
/// `["a"]`) or kept as a string, whichever the key accepts — the string first where the layers
/// below hold a string — so `nodeagent:ecs.join = false` is a boolean and
/// `nodeagent:ecs.config.ECS_ENABLE_TASK_IAM_ROLE = true` a string. Errors never repeat the
/// value: tags can hold credentials.
pub(super) fn tag_table(key: &str, value: &str, below: &Table) -> Result<Table, String> {
    let path: Vec<&str> = key.split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{key:?} is not a dotted key such as consul.datacenter"
        ));
    }
    let mut existing = Some(below);
    let mut at: Option<&toml::Value> = None;
    for (i, part) in path.iter().enumerate() {
        let v = existing.and_then(|t| t.get(*part));
        if i + 1 == path.len() {
            at = v;
        }
        existing = v.and_then(toml::Value::as_table);
    }
    let typed = toml::from_str::<Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let text = Some(toml::Value::String(value.to_string()));
    let candidates = match at {
        Some(toml::Value::String(_)) => [text, typed],
        _ => [typed, text],
    };
    let mut why = String::new();
    for candidate in candidates.into_iter().flatten() {
        let mut leaf = candidate;
        for part in path.iter().skip(1).rev() {
            let mut t = Table::new();
            t.insert(part.to_string(), leaf);
            leaf = toml::Value::Table(t);
        }
        let mut table = Table::new();
        table.insert(path[0].to_string(), leaf);
        match toml::Value::Table(table.clone()).try_into::<Settings>() {
            Ok(_) => return Ok(table),
            Err(e) if why.is_empty() => why = without_value(e.message()),
            Err(_) => {}
        }
    }
    Err(format!("{key}: {why}"))
}

/// A deserializer's complaint without the value it quotes ("invalid type: string \"x\",
/// expected a duration" → "the value is not valid here: expected a duration").
fn without_value(message: &str) -> String {
    let message = message.trim_end();
    if message.starts_with("unknown field") || message.starts_with("missing field") {
        return message.to_string();
    }
    match message.rsplit_once("expected ") {
        Some((_, expected)) => format!("the value is not valid here: expected {expected}"),
        None => "the value is not valid here".into(),
    }
}

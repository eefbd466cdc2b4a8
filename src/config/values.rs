//! Values: owns the setting types that are more than a string — permission bits written in
//! octal, a local service's http(s) URL — each parsed once, when the configuration is read.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// Permission bits, written in octal ("0644", "644" or "0o644").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode(pub u32);

impl Mode {
    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn parse(text: &str) -> Option<Mode> {
        let digits = text.strip_prefix("0o").unwrap_or(text);
        if digits.is_empty() || digits.len() > 4 {
            return None;
        }
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .map(Mode)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        let text = String::deserialize(d)?;
        Mode::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "mode {text:?}: expected octal permission bits such as \"0644\""
            ))
        })
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// An `http://` or `https://` URL (a local service's API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub Url);

impl Default for HttpUrl {
    /// Only while a fragment is checked alone: the built-in defaults always set the real one.
    fn default() -> Self {
        HttpUrl(Url::parse("http://localhost/").expect("a URL"))
    }
}

impl std::ops::Deref for HttpUrl {
    type Target = Url;
    fn deref(&self) -> &Url {
        &self.0
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HttpUrl, D::Error> {
        let text = String::deserialize(d)?;
        match Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(HttpUrl(url)),
            _ => Err(serde::de::Error::custom(format!(
                "{text:?} is not an http(s) URL"
            ))),
        }
    }
}

impl Serialize for HttpUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(Mode::parse("0755"), Some(Mode(0o755)));
        assert_eq!(Mode::parse("644"), Some(Mode(0o644)));
        assert_eq!(Mode::parse("0o600"), Some(Mode(0o600)));
        assert_eq!(Mode::parse("0999"), None);
        assert_eq!(Mode::parse(""), None);
        assert_eq!(Mode(0o600).to_string(), "0600");
    }
}

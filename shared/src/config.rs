//! Typed readers of environment variables for the binaries' config structs.
//!
//! Each binary reads its whole configuration once at start through these
//! helpers; a bad value is a `ConfigError` that names the variable and says
//! why, so the process stops with a message an operator can act on.

use std::fmt::Display;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is required but not set")]
    Missing { name: &'static str },
    #[error("{name}={value:?} is invalid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
}

/// Where a binary's settings come from; the process environment in
/// production, a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Source for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Source for std::collections::HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// `<host name>-<pid>`: a name for this process that no other live process
/// shares (a pod's host name is the pod's name), for a default node id or
/// consumer name. `fallback` stands in for a host name that cannot be read.
pub fn instance_name(fallback: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_string());
    format!("{host}-{}", std::process::id())
}

/// A required variable.
pub fn required<T: FromStr>(src: &dyn Source, name: &'static str) -> Result<T, ConfigError>
where
    T::Err: Display,
{
    let value = src.get(name).ok_or(ConfigError::Missing { name })?;
    parse(name, value)
}

/// An optional variable with a default.
pub fn or<T: FromStr>(src: &dyn Source, name: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: Display,
{
    match src.get(name) {
        Some(value) => parse(name, value),
        None => Ok(default),
    }
}

/// Checks a parsed value; `reason` says what a valid value looks like.
pub fn check<T: Display>(
    name: &'static str,
    value: T,
    ok: impl FnOnce(&T) -> bool,
    reason: &str,
) -> Result<T, ConfigError> {
    if ok(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid {
            name,
            value: value.to_string(),
            reason: reason.to_string(),
        })
    }
}

fn parse<T: FromStr>(name: &'static str, value: String) -> Result<T, ConfigError>
where
    T::Err: Display,
{
    value.parse().map_err(|e: T::Err| ConfigError::Invalid {
        name,
        reason: e.to_string(),
        value,
    })
}

/// A secret that never prints.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_bad_value_names_the_variable() {
        let mut env = HashMap::new();
        env.insert("GATEWAY_SHARDS".to_string(), "many".to_string());
        let err = or::<usize>(&env, "GATEWAY_SHARDS", 4).unwrap_err().to_string();
        assert!(err.starts_with("GATEWAY_SHARDS=\"many\" is invalid"), "{err}");
        let err = required::<String>(&env, "CHAT_JWT_SECRET").unwrap_err().to_string();
        assert_eq!(err, "CHAT_JWT_SECRET is required but not set");
        assert_eq!(or(&env, "MISSING", 7u32).unwrap(), 7);
    }

    #[test]
    fn secrets_do_not_print() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }
}

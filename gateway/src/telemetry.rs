//! Logs: tracing to stderr, as text or JSON, filtered by `RUST_LOG`, every
//! line carrying the node id (`node=` in text, a `"node"` field in JSON).
//!
//! Whatever `RUST_LOG` says, tungstenite's TRACE events are never written:
//! it logs every frame it reads there, `auth` tokens and message bodies
//! included.

use std::io::{IsTerminal, Write};

use tracing::{Level, Subscriber};
use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter, ParseError};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Writes each formatted event to stderr with the node id in front (the
/// formatter hands over one whole line per write).
#[derive(Clone)]
struct NodeTagged<W> {
    prefix: std::sync::Arc<[u8]>,
    json: bool,
    out: W,
}

impl<'a, W: Write + Clone + 'a> MakeWriter<'a> for NodeTagged<W> {
    type Writer = NodeTagged<W>;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl<W: Write> Write for NodeTagged<W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(line.len() + self.prefix.len());
        out.extend_from_slice(&self.prefix);
        match line.split_first() {
            // `{"node":"gw1",` + the rest of the JSON object.
            Some((b'{', rest)) if self.json => out.extend_from_slice(rest),
            _ => out.extend_from_slice(line),
        }
        self.out.write_all(&out)?;
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Standard error, locked for each whole line.
#[derive(Clone, Copy)]
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Checks a `RUST_LOG` value (the configuration calls this at start).
pub fn parse_filter(directives: &str) -> Result<EnvFilter, ParseError> {
    EnvFilter::try_new(directives)
}

/// The subscriber: `directives` as in `RUST_LOG`, lines to `out`.
fn subscriber<W>(
    directives: &str,
    json: bool,
    node_id: &str,
    ansi: bool,
    out: W,
) -> Result<impl Subscriber + Send + Sync, ParseError>
where
    W: Write + Clone + Send + Sync + 'static,
{
    let prefix = if json {
        format!("{{\"node\":{},", serde_json::Value::String(node_id.to_string()))
    } else {
        format!("node={node_id} ")
    };
    let writer = NodeTagged {
        prefix: prefix.into_bytes().into(),
        json,
        out,
    };
    // A cap, not a directive: an `EnvFilter` directive such as
    // `tungstenite=debug` would switch tungstenite's DEBUG events on under
    // `RUST_LOG=info` (two lines per closed connection) instead of only
    // keeping its TRACE events off.
    //
    // The cap carries the directives' most verbose level as its hint: the
    // combined filter's hint is the least verbose of the two, and none at all
    // if either has none. Without one, tracing and the `log` bridge assume
    // TRACE, and every `log::trace!` in tungstenite's frame path crossed into
    // the subscriber just to be dropped: 4-6 % of a gateway's CPU under group
    // fan-out (docs/benchmarks.md).
    let env = parse_filter(directives)?;
    let most_verbose = env.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let no_frame_traces =
        filter_fn(|meta| !(*meta.level() == Level::TRACE && meta.target().starts_with("tungstenite")))
            .with_max_level_hint(most_verbose);
    let filter = env.and(no_frame_traces);
    let layer = if json {
        tracing_subscriber::fmt::layer().json().with_writer(writer).boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed()
    };
    Ok(tracing_subscriber::registry().with(layer.with_filter(filter)))
}

/// Installs the global subscriber once; later calls do nothing.
pub fn init(directives: &str, json: bool, node_id: &str) -> Result<(), ParseError> {
    let ansi = std::io::stderr().is_terminal();
    if subscriber(directives, json, node_id, ansi, Stderr)?.try_init().is_ok() {
        tracing::info!(node = node_id, "logging started");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines written under `directives` while one event of each level
    /// is logged by the gateway and by tungstenite.
    fn lines_under(directives: &str, json: bool) -> Vec<String> {
        let out = Captured::default();
        let sub = subscriber(directives, json, "gw9", false, out.clone()).expect("valid directives");
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "gateway::ws", "gateway info");
            tracing::debug!(target: "gateway::ws", "gateway debug");
            tracing::info!(target: "tungstenite::protocol", "tungstenite info");
            tracing::debug!(target: "tungstenite::protocol", "tungstenite debug");
            tracing::trace!(target: "tungstenite::protocol", "tungstenite trace");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    fn messages(lines: &[String]) -> Vec<&str> {
        let all = [
            "gateway info",
            "gateway debug",
            "tungstenite info",
            "tungstenite debug",
            "tungstenite trace",
        ];
        all.into_iter()
            .filter(|m| lines.iter().any(|l| l.contains(m)))
            .collect()
    }

    #[test]
    fn info_keeps_tungstenite_debug_out() {
        let lines = lines_under("info", false);
        assert_eq!(messages(&lines), ["gateway info", "tungstenite info"]);
        assert!(lines.iter().all(|l| l.starts_with("node=gw9 ")), "{lines:?}");
        assert!(
            lines.iter().all(|l| !l.contains('\u{1b}')),
            "no colour codes in a file: {lines:?}"
        );
    }

    #[test]
    fn trace_never_lets_tungstenite_frames_through() {
        let lines = lines_under("trace", false);
        assert_eq!(
            messages(&lines),
            ["gateway info", "gateway debug", "tungstenite info", "tungstenite debug"]
        );
    }

    #[test]
    fn a_quieter_default_for_one_target_holds() {
        let lines = lines_under("warn,gateway=debug", true);
        assert_eq!(messages(&lines), ["gateway info", "gateway debug"]);
        assert!(lines.iter().all(|l| l.starts_with(r#"{"node":"gw9","#)), "{lines:?}");
    }

    #[test]
    fn the_subscriber_tells_tracing_and_log_how_verbose_it_is() {
        // The hint sets the level below which `tracing` and `log` macros
        // return at once, tungstenite's per-frame `log::trace!` included.
        let hint = |d: &str| {
            subscriber(d, false, "gw9", false, Captured::default())
                .unwrap()
                .max_level_hint()
        };
        assert_eq!(hint("info"), Some(LevelFilter::INFO));
        assert_eq!(hint("warn,gateway=debug"), Some(LevelFilter::DEBUG));
        assert_eq!(hint("trace"), Some(LevelFilter::TRACE));
        assert_eq!(hint("off"), Some(LevelFilter::OFF));
        // A directive limited to a span counts with its own level.
        assert_eq!(hint("gateway[session]=debug,info"), Some(LevelFilter::DEBUG));
    }

    #[test]
    fn bad_directives_are_refused() {
        assert!(parse_filter("gateway=loud").is_err());
    }
}

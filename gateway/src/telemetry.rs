//! Logs: tracing to stderr, as text or JSON, filtered by RUST_LOG, every
//! line carrying the node id (`node=` in text, a `"node"` field in JSON).

use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Writes each formatted event to stderr with the node id in front (the
/// formatter hands over one whole line per write).
#[derive(Clone)]
struct NodeTagged {
    prefix: std::sync::Arc<[u8]>,
    json: bool,
}

impl<'a> MakeWriter<'a> for NodeTagged {
    type Writer = NodeTagged;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Write for NodeTagged {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(line.len() + self.prefix.len());
        match line.split_first() {
            // `{"node":"gw1",` + the rest of the JSON object.
            Some((b'{', rest)) if self.json => {
                out.extend_from_slice(&self.prefix);
                out.extend_from_slice(rest);
            }
            _ => {
                out.extend_from_slice(&self.prefix);
                out.extend_from_slice(line);
            }
        }
        std::io::stderr().lock().write_all(&out)?;
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Installs the global subscriber once; later calls do nothing.
pub fn init(json: bool, node_id: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // tungstenite logs every frame it reads at TRACE, `auth` tokens and
    // message bodies included: it never logs below DEBUG here.
    let filter = filter.add_directive("tungstenite=debug".parse().expect("a valid directive"));
    let prefix = if json {
        format!("{{\"node\":{},", serde_json::Value::String(node_id.to_string()))
    } else {
        format!("node={node_id} ")
    };
    let writer = NodeTagged {
        prefix: prefix.into_bytes().into(),
        json,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if result.is_ok() {
        tracing::info!(node = node_id, "logging started");
    }
}

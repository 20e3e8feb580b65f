//! The `persister` binary: parses the command line, reads the config, sets up
//! logging and signals, and calls the library. It must hold no logic of its
//! own; everything it calls is in `persister::` (src/lib.rs).

use std::io::IsTerminal;

use anyhow::Context;
use clap::{Parser, Subcommand};
use persister::{Config, LogFormat, Persister, Replayed};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: a batch allocates and frees a few
/// values per stream field, and glibc's allocator took about a quarter of the
/// persister's CPU at full speed (docs/benchmarks-persister.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ENVIRONMENT: &str = "\
Environment:
  REDIS_URL                 Redis holding the queue [default: redis://127.0.0.1:6379]
  DATABASE_URL              PostgreSQL database [default: postgres://postgres@127.0.0.1:5432/chat]
  PERSISTER_CONSUMER        consumer name in group `persisters`, unique per live process
                            [default: <hostname>-<pid>]
  PERSISTER_BATCH_SIZE      entries per read and per transaction, 1..=10000 [default: 5000]
  PERSISTER_CONCURRENCY     batches in flight at once, each by a consumer of its own
                            (<consumer>, <consumer>/1, ...), 1..=32 [default: 2]
  PERSISTER_BLOCK_MS        how long a read waits for new entries [default: 1000]
  PERSISTER_CLAIM_IDLE_MS   take over entries pending this long with another consumer
                            [default: 30000]
  PERSISTER_MAX_DELIVERIES  an entry PostgreSQL refuses at this delivery moves to the
                            dead-letter stream chat:dead, 1..=1000 [default: 5]
  PERSISTER_RETRY_MS        wait before retrying a refused entry, doubling per delivery
                            [default: 250]
  PERSISTER_RETRY_MAX_MS    longest wait between two tries [default: 5000]
  PERSISTER_METRICS_LISTEN  address of GET /metrics and GET /healthz [default: 0.0.0.0:9091]
  PERSISTER_DB_POOL         PostgreSQL connections at most [default: 4]
  LOG_FORMAT                text | json (logs go to stderr) [default: text]
  RUST_LOG                  log filter [default: info]

`run` prints one line to stdout once the metrics port is bound:
  metrics on <address>
SIGTERM or SIGINT: finish and acknowledge the current batch, then exit 0.

`dead-letters list` prints one tab-separated line per dead letter, oldest first:
  <dead-letter id> <reason> <deliveries> <kind> <chat> <message id>
(`-` where a value is missing). `dead-letters replay` prints one line per letter,
as soon as it is done (so also before an error that stops it part way):
  replayed <dead-letter id> <new queue id> | missing <id> | empty <id>
It refuses an --id that is not a complete stream id (<ms>-<seq>) before moving any.

`restore-redis` prints one summary line (docs/operations.md, Restoring Redis):
  chats_restored=N chats_skipped=N chats_behind=N memberships=N counters_only=N
  private_unrestored=N seconds=S";

/// Stores the chat queue (Redis Stream `chat:queue`) in PostgreSQL.
#[derive(Parser)]
#[command(name = "persister", version, after_help = ENVIRONMENT)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the embedded SQL migrations (../migrations) and exit.
    Migrate,
    /// Consume `chat:queue` and store its jobs until stopped (the default).
    Run,
    /// Show or replay the dead-letter stream `chat:dead` (uses REDIS_URL only).
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Rebuild the chats' state in Redis (meta, members, chat lists, seq
    /// counters) from PostgreSQL after Redis lost it; chats Redis still holds
    /// are left as they are, so it is safe to run again.
    RestoreRedis {
        /// Chats per PostgreSQL query and per pipelined Redis round trip.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        page: u32,
    },
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Print the oldest dead letters, one line each.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move dead letters back onto `chat:queue` with their original fields.
    Replay {
        /// The dead letter with this id (repeatable).
        #[arg(
            long = "id",
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Every dead letter present now.
        #[arg(long)]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env()?;
    telemetry(&config)?;

    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => {
            let applied = persister::migrate(&config).await?;
            tracing::info!(applied = applied.len(), "schema is up to date");
        }
        Command::Run => {
            let app = Persister::build(config).await?;
            println!("metrics on {}", app.metrics_addr());
            let shutdown = CancellationToken::new();
            tokio::spawn(on_signal(shutdown.clone()));
            app.run_until_stopped(shutdown).await?;
        }
        Command::DeadLetters(DeadLetters::List { limit }) => {
            for letter in persister::dead_letters_list(&config, limit).await? {
                println!("{}", letter.summary_line());
            }
        }
        Command::DeadLetters(DeadLetters::Replay { ids, all }) => {
            let ids = (!all).then_some(ids.as_slice());
            // Each line is printed as soon as its letter is done (stdout is
            // line-buffered), so a replay stopped by an error part way has
            // shown every letter it moved.
            let (mut queued, mut seen) = (0, 0);
            let result = persister::dead_letters_replay(&config, ids, |outcome| {
                seen += 1;
                match outcome {
                    Replayed::Queued { dead_id, queue_id } => {
                        queued += 1;
                        println!("replayed {dead_id} {queue_id}");
                    }
                    Replayed::Missing { dead_id } => println!("missing {dead_id}"),
                    Replayed::Empty { dead_id } => println!("empty {dead_id}"),
                }
            })
            .await;
            if let Err(e) = result {
                if seen == 0 {
                    return Err(e.into());
                }
                return Err(anyhow::Error::new(e).context(format!(
                    "dead-letters replay stopped after {seen} letter(s), {queued} replayed (printed above); \
                     running it again carries on"
                )));
            }
            tracing::info!(replayed = queued, of = seen, "dead letters replayed");
        }
        Command::RestoreRedis { page } => {
            let s = persister::restore_redis(&config, page as usize).await.context(
                "restore-redis stopped; what it wrote stays, and running it again continues \
                 (chats already in Redis are skipped)",
            )?;
            println!(
                "chats_restored={} chats_skipped={} chats_behind={} memberships={} counters_only={} \
                 private_unrestored={} seconds={:.3}",
                s.chats_restored,
                s.chats_skipped,
                s.chats_behind,
                s.memberships,
                s.counters_only,
                s.private_unrestored,
                s.elapsed.as_secs_f64()
            );
        }
    }
    Ok(())
}

fn telemetry(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .with_context(|| format!("RUST_LOG={:?} is invalid", config.log_filter))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; a second one exits at once.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for signals; stop with SIGKILL");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: finishing the current batch");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting without finishing");
    std::process::exit(130);
}

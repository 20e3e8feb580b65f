//! A Redis pub/sub connection that reads no faster than its shard takes
//! deliveries.
//!
//! redis-rs's pub/sub connection reads the socket in a task of its own and
//! queues every publication in an unbounded channel, so a shard that falls
//! behind would grow the gateway's memory without limit. Here the reading
//! half is read by the shard's reader task itself: when the shard is busy,
//! publications wait in the socket and then in Redis's output buffer for
//! this client, and Redis drops a subscriber that lets that buffer pass its
//! `client-output-buffer-limit pubsub` (the supervisor then reconnects, and
//! clients catch up from history, as after any bus outage).
//!
//! It speaks the little of RESP2 that pub/sub needs: `AUTH`, `PING`,
//! `SUBSCRIBE`, `UNSUBSCRIBE` out (packed by redis-rs's `Cmd`); simple
//! strings, errors, integers, bulk strings and flat arrays in. It owns the
//! socket; it knows nothing of envelopes or shards.
//!
//! It never waits on a silent peer without a bound: `connect` gives up
//! after the bound it is given, and the answers to `ping` (the
//! supervisor's heartbeat) let the reader time out its waits on the socket.

use std::io;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// The largest publication accepted; a bigger one is a protocol error (the
/// accept script publishes bodies of at most `CHAT_MAX_BODY_BYTES`, which
/// is at most 1 MiB).
const MAX_BULK: usize = 16 * 1024 * 1024;
/// Read buffer of a subscriber connection.
const READ_BUFFER: usize = 64 * 1024;

/// The writing half: subscription changes.
pub struct Commands {
    write: WriteHalf,
}

/// The reading half: publications and confirmations, in the order Redis
/// sent them.
pub struct Pushes {
    read: BufReader<ReadHalf>,
}

/// What Redis pushes to a subscriber.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// A publication on `channel`.
    Message { channel: String, payload: Vec<u8> },
    /// One channel of a `SUBSCRIBE` or `UNSUBSCRIBE` is in effect.
    Confirmed,
    /// The answer to a heartbeat `PING`: `["pong", ""]` while subscribed,
    /// `+PONG` while the connection has no channel.
    Pong,
}

/// Connects to the Redis of `info` (TCP or a Unix socket, with `AUTH` when
/// it has a password) and checks that it answers `PING`, all within
/// `bound`: a host that drops packets (no SYN-ACK for minutes) or accepts
/// and never answers fails here with `TimedOut` rather than holding the
/// caller.
pub async fn connect(info: &ConnectionInfo, bound: Duration) -> io::Result<(Commands, Pushes)> {
    match tokio::time::timeout(bound, connect_unbounded(info)).await {
        Ok(connected) => connected,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("redis did not answer the connect within {bound:?}"),
        )),
    }
}

async fn connect_unbounded(info: &ConnectionInfo) -> io::Result<(Commands, Pushes)> {
    let (read, write): (ReadHalf, WriteHalf) = match &info.addr {
        ConnectionAddr::Tcp(host, port) => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let (read, write) = stream.into_split();
            (Box::new(read), Box::new(write))
        }
        ConnectionAddr::Unix(path) => {
            let (read, write) = UnixStream::connect(path).await?.into_split();
            (Box::new(read), Box::new(write))
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the cluster bus connects to Redis without TLS (docs/operations.md)",
            ))
        }
    };
    let mut commands = Commands { write };
    let mut pushes = Pushes {
        read: BufReader::with_capacity(READ_BUFFER, read),
    };
    if let Some(password) = &info.redis.password {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = &info.redis.username {
            auth.arg(user);
        }
        commands.send(auth.arg(password)).await?;
        match pushes.read_value().await? {
            Value::Simple(_) => {}
            Value::Error(e) => return Err(protocol(format!("AUTH refused: {e}"))),
            other => return Err(protocol(format!("AUTH answered {other:?}"))),
        }
    }
    // A server that refuses this client (too many clients, protected mode,
    // a password it wants) says so here, not after the connection counts as up.
    commands.send(&redis::cmd("PING")).await?;
    match pushes.read_value().await? {
        Value::Simple(_) => Ok((commands, pushes)),
        Value::Error(e) => Err(protocol(format!("redis refused the connection: {e}"))),
        other => Err(protocol(format!("PING answered {other:?}"))),
    }
}

impl Commands {
    /// `SUBSCRIBE` every channel in one command; Redis confirms each.
    pub async fn subscribe(&mut self, channels: &[&str]) -> io::Result<()> {
        self.change("SUBSCRIBE", channels).await
    }

    /// `UNSUBSCRIBE` every channel in one command; Redis confirms each.
    pub async fn unsubscribe(&mut self, channels: &[&str]) -> io::Result<()> {
        self.change("UNSUBSCRIBE", channels).await
    }

    /// `PING`: the heartbeat. Redis answers it in order with the pushes
    /// (`Push::Pong`), so a reader that hears nothing for several intervals
    /// knows the connection is dead.
    pub async fn ping(&mut self) -> io::Result<()> {
        self.send(&redis::cmd("PING")).await
    }

    async fn change(&mut self, command: &str, channels: &[&str]) -> io::Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        self.send(&change_command(command, channels)).await
    }

    /// Writes `cmd` as redis-rs packs it (a RESP array of bulk strings).
    async fn send(&mut self, cmd: &redis::Cmd) -> io::Result<()> {
        self.write.write_all(&cmd.get_packed_command()).await
    }
}

impl Pushes {
    /// Pushes read from `read`, for tests of what reads them.
    #[cfg(test)]
    pub(super) fn from_reader(read: impl AsyncRead + Send + Unpin + 'static) -> Pushes {
        Pushes {
            read: BufReader::with_capacity(READ_BUFFER, Box::new(read)),
        }
    }

    /// The next push. An error reply, a malformed frame or an end of stream
    /// is an error: the connection is no longer usable.
    pub async fn next(&mut self) -> io::Result<Push> {
        match self.read_value().await? {
            Value::Array(items) => to_push(items),
            Value::Simple(s) if s.eq_ignore_ascii_case(b"PONG") => Ok(Push::Pong),
            Value::Error(e) => Err(protocol(format!("redis error on the bus: {e}"))),
            other => Err(protocol(format!("unexpected reply on the bus: {other:?}"))),
        }
    }

    async fn read_value(&mut self) -> io::Result<Value> {
        let line = self.read_line().await?;
        let Some(count) = line.strip_prefix(b"*") else {
            return self.scalar(&line).await;
        };
        let n = number(count)?;
        // Pub/sub pushes have three items (four for pattern messages).
        if !(0..=8).contains(&n) {
            return Err(protocol(format!("array of {n} items on the bus")));
        }
        let mut items = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let line = self.read_line().await?;
            items.push(self.scalar(&line).await?);
        }
        Ok(Value::Array(items))
    }

    /// A value that is not an array, whose first line is `line`.
    async fn scalar(&mut self, line: &[u8]) -> io::Result<Value> {
        let (kind, rest) = line.split_first().ok_or_else(|| protocol("empty line".into()))?;
        match kind {
            b'+' => Ok(Value::Simple(rest.to_vec())),
            b'-' => Ok(Value::Error(String::from_utf8_lossy(rest).into_owned())),
            b':' => number(rest).map(|_| Value::Int),
            b'$' => {
                let len = number(rest)?;
                if len < 0 {
                    return Ok(Value::Nil);
                }
                let len = len as usize;
                if len > MAX_BULK {
                    return Err(protocol(format!("bulk string of {len} bytes on the bus")));
                }
                let mut bytes = vec![0; len + 2];
                self.read.read_exact(&mut bytes).await?;
                if !bytes.ends_with(b"\r\n") {
                    return Err(protocol("bulk string without its CRLF".into()));
                }
                bytes.truncate(len);
                Ok(Value::Bulk(bytes))
            }
            other => Err(protocol(format!("unexpected type byte {other:#04x} on the bus"))),
        }
    }

    /// One line without its CRLF; at most a short header's length.
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::with_capacity(16);
        let n = (&mut self.read).take(1024).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if !line.ends_with(b"\r\n") {
            return Err(protocol("line without CRLF (or over 1 KiB)".into()));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }
}

/// A RESP2 value; integers carry nothing pub/sub needs.
#[derive(Debug)]
enum Value {
    Simple(Vec<u8>),
    Error(String),
    Int,
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
}

fn to_push(items: Vec<Value>) -> io::Result<Push> {
    let mut items = items.into_iter();
    let kind = match items.next() {
        Some(Value::Bulk(kind)) => kind,
        other => return Err(protocol(format!("push without a kind: {other:?}"))),
    };
    match kind.as_slice() {
        b"message" => match (items.next(), items.next()) {
            (Some(Value::Bulk(channel)), Some(Value::Bulk(payload))) => Ok(Push::Message {
                channel: String::from_utf8(channel).map_err(|_| protocol("channel name not UTF-8".into()))?,
                payload,
            }),
            other => Err(protocol(format!("malformed message push: {other:?}"))),
        },
        b"subscribe" | b"unsubscribe" => Ok(Push::Confirmed),
        b"pong" => Ok(Push::Pong),
        other => Err(protocol(format!(
            "unexpected push {:?} on the bus",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// One command for all of `channels`: Redis confirms each channel in turn.
fn change_command(command: &str, channels: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(command);
    cmd.arg(channels);
    cmd
}

fn number(digits: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol(format!("not a number: {:?}", String::from_utf8_lossy(digits))))
}

fn protocol(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connect bound of tests against servers that do answer.
    const BOUND: Duration = Duration::from_secs(5);

    /// A server that reads one request, writes `answer`, ends its side, and
    /// returns the request once the client has gone.
    async fn fake_redis(answer: Vec<u8>) -> (ConnectionInfo, tokio::task::JoinHandle<Vec<u8>>, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 256];
            let n = socket.read(&mut request).await.unwrap();
            request.truncate(n);
            socket.write_all(&answer).await.unwrap();
            socket.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
            request
        });
        let info: ConnectionInfo = format!("redis://{addr}").parse().unwrap();
        (info, server, addr.to_string())
    }

    /// Pushes parsed from `bytes` after the PING's answer, as a subscriber
    /// would read them.
    async fn parse(bytes: &[u8]) -> Vec<io::Result<Push>> {
        let (info, server, _) = fake_redis([b"+PONG\r\n", bytes].concat()).await;
        let (commands, mut pushes) = connect(&info, BOUND).await.unwrap();
        let mut out = Vec::new();
        loop {
            let push = pushes.next().await;
            let end = push.is_err();
            out.push(push);
            if end {
                break;
            }
        }
        drop((commands, pushes));
        assert_eq!(server.await.unwrap(), b"*1\r\n$4\r\nPING\r\n");
        out
    }

    /// Connects with `user:password` to a server answering `answer`;
    /// returns the outcome and the first command the server read.
    async fn auth_against(url_user: &str, answer: &'static [u8]) -> (io::Result<()>, Vec<u8>) {
        let (_, server, addr) = fake_redis(answer.to_vec()).await;
        let info: ConnectionInfo = format!("redis://{url_user}@{addr}").parse().unwrap();
        let result = connect(&info, BOUND).await.map(drop);
        (result, server.await.unwrap())
    }

    #[tokio::test]
    async fn a_password_in_the_url_is_sent_with_auth_and_a_refusal_fails_the_connection() {
        let (ok, sent) = auth_against(":s3cret", b"+OK\r\n+PONG\r\n").await;
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(sent, b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n");
        let (ok, sent) = auth_against("bus:s3cret", b"+OK\r\n+PONG\r\n").await;
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(sent, b"*3\r\n$4\r\nAUTH\r\n$3\r\nbus\r\n$6\r\ns3cret\r\n");
        let (refused, _) = auth_against(":wrong", b"-WRONGPASS invalid username-password pair\r\n").await;
        let e = refused.unwrap_err();
        assert!(e.to_string().contains("AUTH refused"), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_refuses_the_client_fails_the_connect() {
        let (info, server, _) = fake_redis(b"-ERR max number of clients reached\r\n".to_vec()).await;
        let e = connect(&info, BOUND).await.map(drop).unwrap_err();
        assert!(e.to_string().contains("max number of clients"), "{e}");
        server.await.unwrap();
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            change_command("SUBSCRIBE", &["u:1", "c:2"]).get_packed_command(),
            b"*3\r\n$9\r\nSUBSCRIBE\r\n$3\r\nu:1\r\n$3\r\nc:2\r\n"
        );
    }

    #[tokio::test]
    async fn confirmations_and_messages_come_in_order_with_binary_payloads() {
        let pushes = parse(
            b"*3\r\n$9\r\nsubscribe\r\n$3\r\nu:1\r\n:1\r\n\
              *3\r\n$7\r\nmessage\r\n$3\r\nu:1\r\n$4\r\n\x93\r\n\x00\r\n\
              *3\r\n$11\r\nunsubscribe\r\n$3\r\nu:1\r\n:0\r\n",
        )
        .await;
        assert_eq!(pushes.len(), 4, "{pushes:?}");
        assert_eq!(pushes[0].as_ref().unwrap(), &Push::Confirmed);
        assert_eq!(
            pushes[1].as_ref().unwrap(),
            &Push::Message {
                channel: "u:1".into(),
                payload: b"\x93\r\n\x00".to_vec()
            }
        );
        assert_eq!(pushes[2].as_ref().unwrap(), &Push::Confirmed);
        assert_eq!(pushes[3].as_ref().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_ping_answer_is_a_pong_whether_subscribed_or_not() {
        // Subscribed (RESP2): the array ["pong", ""]; without a channel:
        // the simple string PONG.
        let pushes = parse(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n+PONG\r\n").await;
        assert_eq!(pushes.len(), 3, "{pushes:?}");
        assert_eq!(pushes[0].as_ref().unwrap(), &Push::Pong);
        assert_eq!(pushes[1].as_ref().unwrap(), &Push::Pong);
        assert_eq!(pushes[2].as_ref().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Any other simple string on the bus is still an error.
        let pushes = parse(b"+OK\r\n").await;
        assert_eq!(pushes[0].as_ref().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn the_heartbeat_is_a_plain_ping() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut commands = Commands {
            write: Box::new(client),
        };
        commands.ping().await.unwrap();
        drop(commands);
        let mut sent = Vec::new();
        server.read_to_end(&mut sent).await.unwrap();
        assert_eq!(sent, b"*1\r\n$4\r\nPING\r\n");
    }

    #[tokio::test]
    async fn a_server_that_accepts_and_never_answers_fails_the_connect_within_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let info: ConnectionInfo = format!("redis://{}", listener.local_addr().unwrap()).parse().unwrap();
        // Accepts and holds the socket open, answering nothing.
        let (accepted_tx, mut accepted) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let _ = accepted_tx.send(());
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let bound = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let e = connect(&info, bound).await.map(drop).unwrap_err();
        let took = started.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(took >= bound && took < bound * 10, "gave up after {took:?}");
        assert!(
            accepted.try_recv().is_ok(),
            "the connection was accepted: the PING went unanswered"
        );
        server.abort();
    }

    #[tokio::test]
    async fn malformed_or_oversized_input_is_an_error_not_a_panic_or_an_allocation() {
        for bad in [
            &b"*3\r\n$7\r\nmessage\r\n$3\r\nu:1\r\n$999999999999\r\n"[..],
            b"*99999999\r\n",
            b"-ERR something\r\n",
            b"*3\r\n$7\r\nmessage\r\n$3\r\nu:1\r\n$4\r\nab\r\n",
            b"*1\r\n$7\r\nunknown\r\n",
            b"?\r\n",
        ] {
            let pushes = parse(bad).await;
            let last = pushes.last().unwrap();
            assert!(
                matches!(last, Err(e) if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::UnexpectedEof),
                "{:?}: {pushes:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(pushes[..pushes.len() - 1].iter().all(|p| p.is_ok()));
        }
    }
}

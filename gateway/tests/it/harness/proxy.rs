//! A TCP proxy in front of a server (Redis) that a test can turn into a
//! black hole: the network splitting or the host vanishing without a FIN
//! or RST, which a killed process (`Redis::stop`) does not show.
//!
//! - `black_hole()`: every connection, open or accepted from then on, keeps
//!   its socket open and forwards nothing either way. What arrives is read
//!   and dropped, so a writer never even sees backpressure: only a reader
//!   that expects answers can tell.
//! - `restore()`: connections accepted from then on are forwarded again.
//!   The black-holed ones stay black holes for good, as if the peer behind
//!   them were gone: what recovers must open new connections.
//! - `close_black_holed()`: closes the black-holed connections (what the
//!   kernel does once it gives up retransmitting, or what a peer that
//!   forgot them answers).
//!
//! Each connection is two tasks; all of them end when the `Proxy` drops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the accept loop and every connection's tasks.
    stop: CancellationToken,
}

struct Shared {
    upstream: SocketAddr,
    black_hole: AtomicBool,
    /// Connections not yet closed (pruned as new ones come).
    links: Mutex<Vec<Arc<Link>>>,
}

/// One proxied connection.
struct Link {
    /// Forwards nothing any more; never cleared.
    dead: AtomicBool,
    /// Closes both sockets.
    close: CancellationToken,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            black_hole: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, shared.clone(), stop.clone()));
        Proxy { addr, shared, stop }
    }

    /// `redis://ADDR`, for a process's `REDIS_URL`.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection, open or new, forwards nothing from now on.
    pub fn black_hole(&self) {
        self.shared.black_hole.store(true, Ordering::SeqCst);
        for link in self.shared.links.lock().expect("proxy links").iter() {
            link.dead.store(true, Ordering::SeqCst);
        }
    }

    /// New connections are forwarded again; black-holed ones stay silent.
    pub fn restore(&self) {
        self.shared.black_hole.store(false, Ordering::SeqCst);
    }

    /// Closes every black-holed connection.
    pub fn close_black_holed(&self) {
        for link in self.shared.links.lock().expect("proxy links").iter() {
            if link.dead.load(Ordering::SeqCst) {
                link.close.cancel();
            }
        }
    }

    /// Connections open now (black-holed or not).
    pub fn open_connections(&self) -> usize {
        let links = self.shared.links.lock().expect("proxy links");
        links.iter().filter(|l| !l.close.is_cancelled()).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let client = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        let link = Arc::new(Link {
            dead: AtomicBool::new(shared.black_hole.load(Ordering::SeqCst)),
            close: stop.child_token(),
        });
        {
            let mut links = shared.links.lock().expect("proxy links");
            links.retain(|l| !l.close.is_cancelled());
            links.push(link.clone());
        }
        tokio::spawn(serve(client, shared.upstream, link));
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, link: Arc<Link>) {
    let _ = client.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    // A connection born in the black hole never reaches the server.
    let server = if link.dead.load(Ordering::SeqCst) {
        None
    } else {
        TcpStream::connect(upstream).await.ok()
    };
    let Some(server) = server else {
        pump(client_read, None::<tokio::net::tcp::OwnedWriteHalf>, &link).await;
        link.close.cancel();
        return;
    };
    let _ = server.set_nodelay(true);
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        async {
            pump(client_read, Some(server_write), &link).await;
            link.close.cancel();
        },
        async {
            pump(server_read, Some(client_write), &link).await;
            link.close.cancel();
        },
    );
}

/// Copies `from` to `to` until either side ends or the link closes; drops
/// what it reads while the link is dead (or has nowhere to go).
async fn pump(mut from: impl AsyncRead + Unpin, mut to: Option<impl AsyncWrite + Unpin>, link: &Link) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = link.close.cancelled() => return,
        };
        if link.dead.load(Ordering::SeqCst) {
            continue;
        }
        let Some(to) = to.as_mut() else { continue };
        tokio::select! {
            written = to.write_all(&buf[..n]) => if written.is_err() { return },
            _ = link.close.cancelled() => return,
        }
    }
}

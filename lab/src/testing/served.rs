//! A node serving RESP on a loopback port, for the `resp_*` tests: each
//! test opens its own node in its own directory and talks to it over real
//! TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tally::engine::storage::Storage;
use tally::shutdown::{self, ShutdownTrigger};
use tally::{Config, Node, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Longest a test waits for a reply before failing rather than hanging.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub node: Node,
    trigger: ShutdownTrigger,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    /// A node on `dir` with default settings, serving RESP.
    pub async fn start(dir: &Path) -> TestServer {
        Self::start_with(dir, ServerConfig::default()).await
    }

    /// A node on `dir` serving RESP with the given front-end settings.
    pub async fn start_with(dir: &Path, config: ServerConfig) -> TestServer {
        let node = Node::open(Config::new(dir)).expect("open node");
        Self::serve(node, config).await
    }

    /// A node on simulated storage (crash and fault injection).
    pub async fn start_on(storage: Arc<dyn Storage>, config: Config) -> TestServer {
        let node = Node::open_with_storage(config, storage).expect("open node");
        Self::serve(node, ServerConfig::default()).await
    }

    pub async fn serve(node: Node, config: ServerConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(tally::resp::serve(
            listener,
            node.clone(),
            Arc::new(config),
            shutdown,
        ));
        TestServer {
            addr,
            node,
            trigger,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// A `redis` crate connection to this server.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
    }

    /// A raw TCP connection to this server.
    pub async fn raw(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }

    /// Stops serving (waiting for `serve` to return) and shuts the node down.
    pub async fn stop(self) {
        let node = self.stop_serving().await;
        tokio::task::spawn_blocking(move || node.shutdown())
            .await
            .expect("shutdown task")
            .expect("node shutdown");
    }

    /// Stops serving and waits for `serve` to return; the node stays open.
    pub async fn stop_serving(self) -> Node {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
            .expect("serve result");
        self.node
    }
}

/// Sends `request` and reads until `expected` bytes came or the server
/// closed; returns what came.
pub async fn exchange(stream: &mut TcpStream, request: &[u8], expected: usize) -> Vec<u8> {
    stream.write_all(request).await.expect("write");
    read_at_least(stream, expected).await
}

/// Reads until at least `n` bytes came or the server closed.
pub async fn read_at_least(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < n {
        match tokio::time::timeout(REPLY_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => got.extend_from_slice(&buf[..k]),
            Err(_) => panic!(
                "no reply within {REPLY_TIMEOUT:?}; got so far {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    got
}

/// Reads everything until the server closes the connection; panics if it
/// does not close within [`REPLY_TIMEOUT`].
pub async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(REPLY_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(k)) => got.extend_from_slice(&buf[..k]),
            Err(_) => panic!(
                "connection not closed within {REPLY_TIMEOUT:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// A request as a RESP array of bulk strings.
pub fn request(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Checks the server still answers a fresh connection.
pub async fn assert_serving(server: &TestServer) {
    let mut s = server.raw().await;
    assert_eq!(
        exchange(&mut s, b"*1\r\n$4\r\nPING\r\n", 7).await,
        b"+PONG\r\n"
    );
}

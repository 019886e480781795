//! A node served on loopback in this process, over RESP and HTTP: the one
//! harness of the front-end and cluster tests. Each test opens its own node
//! in its own directory (or on simulated storage) and talks to it over real
//! TCP; a cluster test serves several, sharing one store.

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
/// Longest a front end may take to return once told to stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A node and its two front ends on fresh loopback ports.
pub struct ServedNode {
    pub node: Node,
    /// Where the RESP front end listens.
    pub resp: SocketAddr,
    /// Where the HTTP front end listens.
    pub http: SocketAddr,
    triggers: [ShutdownTrigger; 2],
    servers: [JoinHandle<std::io::Result<()>>; 2],
}

impl ServedNode {
    /// A node on `dir` with default settings.
    pub async fn open(dir: &Path) -> ServedNode {
        Self::open_with(dir, ServerConfig::default()).await
    }

    /// A node on `dir` with default node settings and the given front-end
    /// settings.
    pub async fn open_with(dir: &Path, config: ServerConfig) -> ServedNode {
        let node = Node::open(Config::new(dir)).expect("open node");
        Self::serve(node, config).await
    }

    /// A node on simulated storage (crash and fault injection).
    pub async fn open_on(storage: Arc<dyn Storage>, config: Config) -> ServedNode {
        let node = Node::open_with_storage(config, storage).expect("open node");
        Self::serve(node, ServerConfig::default()).await
    }

    /// A node opened with `config`, which may name a store: the listeners
    /// are bound first, so that the node registers its HTTP address (when
    /// the config leaves it empty), and opening, which registers in the
    /// store, a blocking call, runs off the async threads.
    pub async fn open_config(mut config: Config) -> ServedNode {
        let (resp_listener, resp) = listen().await;
        let (http_listener, http) = listen().await;
        if let Some(c) = config.cluster.as_mut()
            && c.address.is_empty()
        {
            c.address = http.to_string();
        }
        let node = tokio::task::spawn_blocking(move || Node::open(config))
            .await
            .expect("open task")
            .expect("open node");
        Self::serve_on(
            node,
            ServerConfig::default(),
            (resp_listener, resp),
            (http_listener, http),
        )
    }

    /// Serves `node` over RESP and HTTP on fresh loopback ports.
    pub async fn serve(node: Node, config: ServerConfig) -> ServedNode {
        let resp = listen().await;
        let http = listen().await;
        Self::serve_on(node, config, resp, http)
    }

    fn serve_on(
        node: Node,
        config: ServerConfig,
        (resp_listener, resp): (TcpListener, SocketAddr),
        (http_listener, http): (TcpListener, SocketAddr),
    ) -> ServedNode {
        let config = Arc::new(config);
        let (resp_trigger, resp_shutdown) = shutdown::channel();
        let (http_trigger, http_shutdown) = shutdown::channel();
        let servers = [
            tokio::spawn(tally::resp::serve(
                resp_listener,
                node.clone(),
                config.clone(),
                resp_shutdown,
            )),
            tokio::spawn(tally::http::serve(
                http_listener,
                node.clone(),
                config,
                http_shutdown,
            )),
        ];
        ServedNode {
            node,
            resp,
            http,
            triggers: [resp_trigger, http_trigger],
            servers,
        }
    }

    /// The node's id.
    pub fn id(&self) -> &str {
        self.node.node_id()
    }

    /// `redis://` URL of the RESP front end.
    pub fn resp_url(&self) -> String {
        format!("redis://{}/", self.resp)
    }

    /// URL of `path` on the HTTP front end.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// A `redis` crate connection to the RESP front end.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.resp_url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
    }

    /// A raw TCP connection to the RESP front end.
    pub async fn raw(&self) -> TcpStream {
        TcpStream::connect(self.resp).await.expect("connect")
    }

    /// Stops serving and shuts the node down.
    pub async fn stop(self) {
        shutdown_node(self.stop_serving().await).await;
    }

    /// Stops both front ends and waits for them to return; the node stays
    /// open and is handed back.
    pub async fn stop_serving(self) -> Node {
        self.signal_stop();
        self.wait_stopped().await
    }

    /// Tells both front ends to stop (they finish what is in flight).
    pub fn signal_stop(&self) {
        for trigger in &self.triggers {
            trigger.fire();
        }
    }

    /// Waits, up to [`STOP_TIMEOUT`], for both front ends to return after
    /// [`ServedNode::signal_stop`]; hands the node back, still open.
    pub async fn wait_stopped(self) -> Node {
        for server in self.servers {
            tokio::time::timeout(STOP_TIMEOUT, server)
                .await
                .expect("serve returns after shutdown")
                .expect("serve task")
                .expect("serve result");
        }
        self.node
    }
}

async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// Shuts a node down off the async threads (it blocks until durable).
pub async fn shutdown_node(node: Node) {
    tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .expect("shutdown task")
        .expect("node shutdown");
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
pub async fn assert_serving(server: &ServedNode) {
    let mut s = server.raw().await;
    assert_eq!(
        exchange(&mut s, b"*1\r\n$4\r\nPING\r\n", 7).await,
        b"+PONG\r\n"
    );
}

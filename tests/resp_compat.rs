//! A stock Redis client library (the `redis` crate) works against tally's
//! RESP front end unmodified: Redis's commands answer as Redis answers,
//! pipelines keep their order, errors carry Redis's words and leave the
//! connection usable, and tally's own `TALLY.INCRBY` is exact and durable.

use tally_lab::testing::served as resp_support;

use redis::{RedisError, Value};
use resp_support::ServedNode;

async fn query<T: redis::FromRedisValue>(
    con: &mut redis::aio::MultiplexedConnection,
    args: &[&str],
) -> redis::RedisResult<T> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(con).await
}

fn code_and_detail(e: &RedisError) -> (String, String) {
    (
        e.code().unwrap_or_default().to_string(),
        e.detail().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counter_commands_answer_as_redis() {
    // Proves INCR, INCRBY, DECR, DECRBY, GET, MGET, EXISTS and DBSIZE return
    // Redis's values and types through a stock client.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut con = server.client().await;

    assert_eq!(query::<i64>(&mut con, &["INCR", "hits"]).await.unwrap(), 1);
    assert_eq!(
        query::<i64>(&mut con, &["INCRBY", "hits", "41"])
            .await
            .unwrap(),
        42
    );
    assert_eq!(query::<i64>(&mut con, &["DECR", "hits"]).await.unwrap(), 41);
    assert_eq!(
        query::<i64>(&mut con, &["DECRBY", "hits", "-9"])
            .await
            .unwrap(),
        50
    );
    assert_eq!(
        query::<i64>(&mut con, &["decrby", "misses", "3"])
            .await
            .unwrap(),
        -3
    );
    // GET answers a bulk string holding the decimal value, as Redis stores it.
    assert_eq!(
        query::<Value>(&mut con, &["GET", "hits"]).await.unwrap(),
        Value::BulkString(b"50".to_vec())
    );
    assert_eq!(
        query::<Option<i64>>(&mut con, &["GET", "nothing"])
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        query::<Vec<Option<i64>>>(&mut con, &["MGET", "hits", "nothing", "misses"])
            .await
            .unwrap(),
        vec![Some(50), None, Some(-3)]
    );
    assert_eq!(
        query::<i64>(&mut con, &["EXISTS", "hits", "hits", "nothing", "misses"])
            .await
            .unwrap(),
        3
    );
    assert_eq!(query::<i64>(&mut con, &["DBSIZE"]).await.unwrap(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_commands_answer_as_redis() {
    // Proves PING, ECHO, SELECT, CLIENT, HELLO, INFO, COMMAND and CONFIG GET
    // answer in the shapes Redis clients and tools expect.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut con = server.client().await;

    assert_eq!(query::<String>(&mut con, &["PING"]).await.unwrap(), "PONG");
    assert_eq!(
        query::<String>(&mut con, &["PING", "hey"]).await.unwrap(),
        "hey"
    );
    assert_eq!(
        query::<String>(&mut con, &["ECHO", "a b"]).await.unwrap(),
        "a b"
    );
    assert_eq!(
        query::<String>(&mut con, &["SELECT", "0"]).await.unwrap(),
        "OK"
    );
    let e = query::<String>(&mut con, &["SELECT", "1"])
        .await
        .unwrap_err();
    assert_eq!(
        code_and_detail(&e),
        ("ERR".into(), "DB index is out of range".into())
    );

    assert_eq!(
        query::<String>(&mut con, &["CLIENT", "SETNAME", "worker-7"])
            .await
            .unwrap(),
        "OK"
    );
    assert_eq!(
        query::<String>(&mut con, &["CLIENT", "GETNAME"])
            .await
            .unwrap(),
        "worker-7"
    );
    let id: i64 = query(&mut con, &["CLIENT", "ID"]).await.unwrap();
    assert!(id >= 1);

    let hello: Vec<Value> = query(&mut con, &["HELLO", "2"]).await.unwrap();
    let fields: Vec<String> = hello
        .iter()
        .step_by(2)
        .map(|v| redis::from_redis_value::<String>(v).unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "server", "version", "proto", "id", "mode", "role", "modules"
        ]
    );
    assert_eq!(hello[5], Value::Int(2));
    assert_eq!(hello[7], Value::Int(id));
    let e = query::<Value>(&mut con, &["HELLO", "3"]).await.unwrap_err();
    assert_eq!(e.code(), Some("NOPROTO"));

    let info: String = query(&mut con, &["INFO"]).await.unwrap();
    for needle in [
        "# Server\r\n",
        "tally_version:",
        &format!("node_id:{}\r\n", server.node.node_id()),
        "# Clients\r\nconnected_clients:1\r\n",
        "# Tally\r\n",
        "counters:0\r\n",
        "journal_durable_pos:",
        "ready:1\r\n",
    ] {
        assert!(info.contains(needle), "INFO lacks {needle:?}:\n{info}");
    }
    let clients: String = query(&mut con, &["INFO", "CLIENTS"]).await.unwrap();
    assert!(clients.starts_with("# Clients\r\n") && !clients.contains("# Server"));

    let count: i64 = query(&mut con, &["COMMAND", "COUNT"]).await.unwrap();
    let all: Vec<Value> = query(&mut con, &["COMMAND"]).await.unwrap();
    assert_eq!(all.len() as i64, count);
    let save: Vec<String> = query(&mut con, &["CONFIG", "GET", "save"]).await.unwrap();
    assert_eq!(save, ["save", ""]);
    let appendonly: Vec<String> = query(&mut con, &["CONFIG", "GET", "appendonly"])
        .await
        .unwrap();
    assert_eq!(appendonly, ["appendonly", "yes"]);
    let unknown: Vec<String> = query(&mut con, &["CONFIG", "GET", "nosuch*"])
        .await
        .unwrap();
    assert!(unknown.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_increments_reply_in_order() {
    // Proves a pipeline of 1000 INCRs replies 1..=1000 in order and a GET
    // pipelined after them sees all of them.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut con = server.client().await;

    let mut pipe = redis::pipe();
    for _ in 0..1000 {
        pipe.cmd("INCR").arg("piped");
    }
    let values: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
    assert_eq!(values, (1..=1000).collect::<Vec<i64>>());

    let mut pipe = redis::pipe();
    pipe.cmd("INCRBY").arg("piped").arg(5);
    pipe.cmd("GET").arg("piped");
    pipe.cmd("DECR").arg("piped");
    let (a, b, c): (i64, i64, i64) = pipe.query_async(&mut con).await.unwrap();
    assert_eq!((a, b, c), (1005, 1005, 1004));
    assert_eq!(server.node.get("piped").unwrap(), Some(1004));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_redis_wording_and_keep_the_connection() {
    // Proves each bad request gets Redis's error words and the same
    // connection keeps working after every one of them.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut con = server.client().await;

    let cases: &[(&[&str], &str)] = &[
        (
            &["INCRBY", "k", "abc"],
            "value is not an integer or out of range",
        ),
        (
            &["INCRBY", "k", "1.5"],
            "value is not an integer or out of range",
        ),
        (
            &["INCRBY", "k"],
            "wrong number of arguments for 'incrby' command",
        ),
        (&["GET"], "wrong number of arguments for 'get' command"),
        (
            &["FOO", "a", "b"],
            "unknown command 'FOO', with args beginning with: 'a' 'b' ",
        ),
        (
            &["DECRBY", "k", "-9223372036854775808"],
            "decrement would overflow",
        ),
    ];
    for (args, detail) in cases {
        let e = query::<Value>(&mut con, args).await.unwrap_err();
        assert_eq!(
            code_and_detail(&e),
            ("ERR".into(), detail.to_string()),
            "{args:?}"
        );
        assert_eq!(query::<String>(&mut con, &["PING"]).await.unwrap(), "PONG");
    }

    assert_eq!(
        query::<i64>(&mut con, &["INCRBY", "big", "9223372036854775807"])
            .await
            .unwrap(),
        i64::MAX
    );
    let e = query::<i64>(&mut con, &["INCR", "big"]).await.unwrap_err();
    assert_eq!(
        code_and_detail(&e),
        ("ERR".into(), "increment or decrement would overflow".into())
    );
    // The refused increment changed nothing.
    assert_eq!(
        query::<i64>(&mut con, &["GET", "big"]).await.unwrap(),
        i64::MAX
    );
    assert_eq!(
        query::<i64>(&mut con, &["DECR", "big"]).await.unwrap(),
        i64::MAX - 1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_increment_applies_once_across_restart() {
    // Proves TALLY.INCRBY with an idempotency key is applied once when
    // sent twice, and that both value and key survive a restart.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut con = server.client().await;

    let first: Vec<i64> = query(
        &mut con,
        &["TALLY.INCRBY", "billing", "7", "IDEMPOTENCY", "req-1"],
    )
    .await
    .unwrap();
    assert_eq!(first, [7, 0]);
    // Options in another order and case: the same request.
    let again: Vec<i64> = query(
        &mut con,
        &[
            "tally.incrby",
            "billing",
            "7",
            "durability",
            "LOCAL",
            "idempotency",
            "req-1",
        ],
    )
    .await
    .unwrap();
    assert_eq!(again, [7, 1]);
    let other: Vec<i64> = query(&mut con, &["TALLY.INCRBY", "billing", "3"])
        .await
        .unwrap();
    assert_eq!(other, [10, 0]);
    drop(con);
    server.stop().await;

    let server = ServedNode::open(dir.path()).await;
    let mut con = server.client().await;
    assert_eq!(
        query::<i64>(&mut con, &["GET", "billing"]).await.unwrap(),
        10
    );
    let retried: Vec<i64> = query(
        &mut con,
        &["TALLY.INCRBY", "billing", "7", "IDEMPOTENCY", "req-1"],
    )
    .await
    .unwrap();
    assert_eq!(retried, [10, 1]);
    assert_eq!(
        query::<i64>(&mut con, &["GET", "billing"]).await.unwrap(),
        10
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_durability_is_refused_without_a_store() {
    // Proves DURABILITY replicated is refused with an UNAVAILABLE error,
    // never downgraded, and nothing is applied.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut con = server.client().await;

    let e = query::<Vec<i64>>(
        &mut con,
        &["TALLY.INCRBY", "safe", "1", "DURABILITY", "replicated"],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some("UNAVAILABLE"));
    assert!(
        e.detail()
            .unwrap_or_default()
            .contains("durability 'replicated' is not available"),
        "{e}"
    );
    assert_eq!(
        query::<Option<i64>>(&mut con, &["GET", "safe"])
            .await
            .unwrap(),
        None
    );
    let memory: Vec<i64> = query(
        &mut con,
        &["TALLY.INCRBY", "safe", "1", "DURABILITY", "memory"],
    )
    .await
    .unwrap();
    assert_eq!(memory, [1, 0]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_count_exactly() {
    // Proves 20 clients each sending 200 INCRs to one counter leave it at
    // exactly 4000, and every reply value is distinct.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut con = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(200);
            for _ in 0..200 {
                seen.push(query::<i64>(&mut con, &["INCR", "shared"]).await.unwrap());
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=4000).collect::<Vec<i64>>());
    let mut con = server.client().await;
    assert_eq!(
        query::<i64>(&mut con, &["GET", "shared"]).await.unwrap(),
        4000
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_and_quit_behave_as_in_redis() {
    // Proves typed (inline) commands work, AUTH, RESET and unknown INFO
    // sections answer as Redis does, and QUIT answers +OK, closes, and
    // leaves the requests pipelined after it unrun.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut s = server.raw().await;
    let script: &[(&[u8], &[u8])] = &[
        (b"PING\r\n", b"+PONG\r\n"),
        (b"incrby  \"typed counter\"  3\n", b":3\r\n"),
        (b"GET 'typed counter'\r\n", b"$1\r\n3\r\n"),
        (b"INFO nosuch\r\n", b"$0\r\n\r\n"),
        (
            b"AUTH secret\r\n",
            b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n",
        ),
        (b"AUTH default secret\r\n", b"+OK\r\n"),
        (b"CLIENT SETNAME before-reset\r\n", b"+OK\r\n"),
        (b"RESET\r\nCLIENT GETNAME\r\n", b"+RESET\r\n$-1\r\n"),
    ];
    for (request, reply) in script {
        let got = resp_support::exchange(&mut s, request, reply.len()).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(reply),
            "{}",
            String::from_utf8_lossy(request)
        );
    }
    use tokio::io::AsyncWriteExt;
    s.write_all(b"INCR after-quit\r\nQUIT\r\nINCR after-quit\r\n")
        .await
        .unwrap();
    assert_eq!(resp_support::read_to_close(&mut s).await, b":1\r\n+OK\r\n");
    assert_eq!(server.node.get("after-quit").unwrap(), Some(1));
    server.stop().await;
}

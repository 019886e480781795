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
    let e = query::<Value>(&mut con, &["HELLO", "4"]).await.unwrap_err();
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

/// Reads from `s` until what was read ends with `end` (bounded in time).
async fn read_until(s: &mut tokio::net::TcpStream, end: &[u8]) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut got = Vec::new();
    while !got.ends_with(end) {
        assert!(
            std::time::Instant::now() < deadline,
            "no reply ending in {:?}; got {:?}",
            String::from_utf8_lossy(end),
            String::from_utf8_lossy(&got)
        );
        got.extend(resp_support::read_at_least(s, 1).await);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_3_switches_the_connection_to_resp3_on_the_wire() {
    // Proves the bytes: HELLO 3 is answered with a RESP3 map, and from then
    // on (the rest of the same pipeline included) nulls are `_`, CONFIG GET
    // is a map and INFO a verbatim string; a request before it in the
    // pipeline is answered in RESP2; RESET switches back.
    use resp_support::{exchange, request};
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut s = server.raw().await;
    let mut pipeline = request(&[b"GET", b"missing"]);
    pipeline.extend(request(&[b"HELLO", b"3"]));
    pipeline.extend(request(&[b"GET", b"missing"]));
    pipeline.extend(request(&[b"MGET", b"missing", b"missing"]));
    pipeline.extend(request(&[b"CONFIG", b"GET", b"appendonly"]));
    s.write_all(&pipeline).await.unwrap();
    let got = read_until(&mut s, b"$3\r\nyes\r\n").await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let hello = "%7\r\n$6\r\nserver\r\n$5\r\ntally\r\n$7\r\nversion\r\n";
    assert!(text.starts_with(&format!("$-1\r\n{hello}")), "{text:?}");
    let after_hello = "$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n\
        $7\r\nmodules\r\n*0\r\n\
        _\r\n*2\r\n_\r\n_\r\n%1\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n";
    assert!(text.contains("$5\r\nproto\r\n:3\r\n"), "{text:?}");
    assert!(text.ends_with(after_hello), "{text:?}");

    s.write_all(&request(&[b"INFO", b"clients"])).await.unwrap();
    let info = String::from_utf8(read_until(&mut s, b"\r\n\r\n").await).unwrap();
    let (len, body) = info
        .strip_prefix('=')
        .and_then(|i| i.split_once("\r\n"))
        .unwrap_or_else(|| panic!("INFO is not a verbatim string: {info:?}"));
    assert!(body.starts_with("txt:# Clients\r\n"), "{info:?}");
    assert_eq!(len.parse::<usize>().unwrap(), body.len() - 2, "{info:?}");

    assert_eq!(
        exchange(&mut s, &request(&[b"RESET"]), 8).await,
        b"+RESET\r\n"
    );
    assert_eq!(
        exchange(&mut s, &request(&[b"GET", b"missing"]), 5).await,
        b"$-1\r\n"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_speaks_resp3_with_tally() {
    // Proves a stock client that asks for RESP3 (`?protocol=resp3`) gets
    // the RESP3 types Redis 7 sends: a map from HELLO and CONFIG GET, nil
    // for a missing key, a verbatim string from INFO, and the same values
    // as in RESP2 for every counter command, pipelined or not.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let mut con = redis::Client::open(format!("{}?protocol=resp3", server.resp_url()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hello: Value = query(&mut con, &["HELLO", "3"]).await.unwrap();
    let Value::Map(fields) = hello else {
        panic!("HELLO 3 gave {hello:?}");
    };
    let proto = fields
        .iter()
        .find(|(k, _)| *k == Value::BulkString(b"proto".to_vec()))
        .map(|(_, v)| v.clone());
    assert_eq!(proto, Some(Value::Int(3)));
    assert_eq!(
        query::<i64>(&mut con, &["INCRBY", "r3", "41"])
            .await
            .unwrap(),
        41
    );
    assert_eq!(query::<i64>(&mut con, &["INCR", "r3"]).await.unwrap(), 42);
    assert_eq!(
        query::<Value>(&mut con, &["GET", "r3"]).await.unwrap(),
        Value::BulkString(b"42".to_vec())
    );
    assert_eq!(
        query::<Value>(&mut con, &["GET", "none"]).await.unwrap(),
        Value::Nil
    );
    assert_eq!(
        query::<Vec<Option<i64>>>(&mut con, &["MGET", "r3", "none"])
            .await
            .unwrap(),
        vec![Some(42), None]
    );
    let config: Value = query(&mut con, &["CONFIG", "GET", "appendonly"])
        .await
        .unwrap();
    assert_eq!(
        config,
        Value::Map(vec![(
            Value::BulkString(b"appendonly".to_vec()),
            Value::BulkString(b"yes".to_vec())
        )])
    );
    let info: Value = query(&mut con, &["INFO", "server"]).await.unwrap();
    let Value::VerbatimString { format, text } = info else {
        panic!("INFO gave {info:?}");
    };
    assert_eq!(format, redis::VerbatimFormat::Text);
    assert!(text.starts_with("# Server\r\n"), "{text:?}");
    let (value, duplicate): (i64, i64) =
        query(&mut con, &["TALLY.INCRBY", "r3", "8", "IDEMPOTENCY", "k1"])
            .await
            .unwrap();
    assert_eq!((value, duplicate), (50, 0));
    let (value, duplicate): (i64, i64) =
        query(&mut con, &["TALLY.INCRBY", "r3", "8", "IDEMPOTENCY", "k1"])
            .await
            .unwrap();
    assert_eq!((value, duplicate), (50, 1));
    let mut pipe = redis::pipe();
    for _ in 0..100 {
        pipe.cmd("INCR").arg("piped3");
    }
    let values: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
    assert_eq!(values, (1..=100).collect::<Vec<i64>>());
    let e = query::<Value>(&mut con, &["INCRBY", "r3", "x"])
        .await
        .unwrap_err();
    assert_eq!(
        code_and_detail(&e),
        (
            "ERR".into(),
            "value is not an integer or out of range".into()
        )
    );
    assert_eq!(query::<i64>(&mut con, &["GET", "r3"]).await.unwrap(), 50);
    server.stop().await;
}

#!/usr/bin/env python3
"""tally's RESP compatibility checks, driven by redis-py.

    python3 compat/python/test_redis_py.py --host 127.0.0.1 --port PORT [--server tally|redis]

Every check group runs three times: with redis-py's default protocol, then
with protocol=2 and protocol=3 given explicitly. With --server redis the
tally-only group (TALLY.INCRBY, tally's limits) is skipped, so the same
script can be checked against a real Redis 7 first.

redis-py's default protocol: from redis-py 8.0 on (8.1.0 is pinned in
requirements.txt) a client made without protocol= speaks RESP3: it sends
`HELLO 3` on every new connection (redis.utils.DEFAULT_RESP_VERSION is 3)
and fails the connection if the server refuses it; it does not fall back to
RESP2. Up to redis-py 7.x the default was RESP2. The script reads the
protocol in effect from the connection and prints it.

Each run uses its own key prefix (run id and protocol), so runs against the
same server do not see each other's counters. The script stops at the first
failure with a message naming the group and the check, and exits 1. One
line is printed per passed group; the last line is "N passed, N failed".
"""

import argparse
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.retry import Retry

# Socket timeouts (connect and read) in seconds: nothing waits longer.
SOCKET_TIMEOUT = 5.0
# The whole script is stopped after this many seconds, whatever it is doing.
WATCHDOG_SECONDS = 100

I64_MAX = 2**63 - 1
I64_MIN = -(2**63)

RUN_ID = f"{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

HELLO_FIELDS = {"server", "version", "proto", "id", "mode", "role", "modules"}


class Failure(Exception):
    """A check that did not hold."""


def check(condition, what):
    if not condition:
        raise Failure(what)


def same(got, want, what):
    """Equal and of the same Python types, all the way down (1 is not True,
    b'1' is not '1')."""

    def alike(a, b):
        if type(a) is not type(b):
            return False
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(alike(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(alike(a[k], b[k]) for k in a)
        return a == b

    if not alike(got, want):
        raise Failure(f"{what}: got {got!r}, want {want!r}")


def expect_error(call, message, what, kind=ResponseError):
    """`call()` must raise `kind` whose text is exactly `message` (redis-py
    strips the leading 'ERR ' and the codes it knows, such as WRONGPASS)."""
    try:
        result = call()
    except kind as e:
        if str(e) != message:
            raise Failure(f"{what}: error {str(e)!r}, want {message!r}")
        return e
    except Exception as e:  # noqa: BLE001 - any other exception is a failure
        raise Failure(f"{what}: raised {type(e).__name__}: {e}, want {kind.__name__}")
    raise Failure(f"{what}: answered {result!r}, want the error {message!r}")


def text(value):
    """bytes or str (redis-py decodes some replies itself) as str."""
    return value.decode() if isinstance(value, bytes) else value


def as_dict(reply, what):
    """A map reply: a dict in RESP3, a flat list of pairs in RESP2."""
    if isinstance(reply, dict):
        return {text(k): v for k, v in reply.items()}
    check(isinstance(reply, list) and len(reply) % 2 == 0, f"{what}: not a map: {reply!r}")
    return {text(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


class Run:
    """One pass over every group with one protocol setting."""

    def __init__(self, args, label, protocol):
        self.host = args.host
        self.port = args.port
        self.server = args.server
        self.label = label
        # None: leave it to redis-py's default.
        self.protocol = protocol
        # The protocol the connections actually speak, read in `handshake`.
        self.proto = None
        self.prefix = f"compat:py:{RUN_ID}:{label}:"

    def key(self, name):
        return self.prefix + name

    def connection_kwargs(self, **extra):
        kwargs = dict(
            host=self.host,
            port=self.port,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            # No silent retries: a server that drops a connection must show.
            retry=Retry(NoBackoff(), 0),
        )
        if self.protocol is not None:
            kwargs["protocol"] = self.protocol
        kwargs.update(extra)
        return kwargs

    def client(self, **extra):
        return redis.Redis(**self.connection_kwargs(**extra))

    def single(self, **extra):
        """A client on one connection, for checks of connection state."""
        return self.client(single_connection_client=True, **extra)


# ---------------------------------------------------------------- groups


def group_handshake(run):
    with run.single() as r:
        run.proto = r.connection.protocol
        if run.protocol is not None:
            same(run.proto, run.protocol, "protocol in effect")
        same(r.client_info()["resp"], str(run.proto), "CLIENT INFO resp=")
        client_id = r.client_id()
        check(type(client_id) is int and client_id > 0, f"CLIENT ID {client_id!r}")

        def check_hello(reply, what):
            # RESP3: a map (dict); RESP2: the same pairs as a flat list.
            if run.proto == 3:
                check(isinstance(reply, dict), f"{what}: RESP3 reply is not a map: {reply!r}")
            else:
                check(isinstance(reply, list), f"{what}: RESP2 reply is not an array: {reply!r}")
            fields = as_dict(reply, what)
            same(set(fields), HELLO_FIELDS, f"{what}: fields")
            same(text(fields["server"]), run.server, f"{what}: server")
            version = text(fields["version"])
            check(re.fullmatch(r"\d+\.\d+\.\d+", version or ""), f"{what}: version {version!r}")
            check(int(version.split(".")[0]) >= 7, f"{what}: version {version} below 7")
            same(fields["proto"], run.proto, f"{what}: proto")
            same(fields["id"], client_id, f"{what}: id")
            same(text(fields["mode"]), "standalone", f"{what}: mode")
            same(text(fields["role"]), "master", f"{what}: role")
            same(fields["modules"], [], f"{what}: modules")

        # HELLO without a version reports the protocol in effect.
        check_hello(r.execute_command("HELLO"), "HELLO")
        # HELLO <current version> (on a RESP3 connection: HELLO 3 -> a map).
        check_hello(r.execute_command("HELLO", run.proto), f"HELLO {run.proto}")
        check_hello(
            r.execute_command("HELLO", run.proto, "SETNAME", "compat-hello"),
            f"HELLO {run.proto} SETNAME",
        )
        same(text(r.client_getname()), "compat-hello", "name set by HELLO SETNAME")
        # A refused HELLO leaves the connection as it was.
        expect_error(
            lambda: r.execute_command("HELLO", 4),
            "NOPROTO unsupported protocol version",
            "HELLO 4",
        )
        expect_error(
            lambda: r.execute_command("HELLO", "x"),
            "Protocol version is not an integer or out of range",
            "HELLO x",
        )
        same(r.client_id(), client_id, "same connection after refused HELLOs")
        same(r.client_info()["resp"], str(run.proto), "protocol after refused HELLOs")


def group_counters(run):
    k, neg, big, missing = (run.key(n) for n in ("c", "neg", "big", "missing"))
    with run.client() as r:
        same(r.incr(k), 1, "INCR of a new counter")
        same(r.incrby(k, 10), 11, "INCRBY 10")
        same(r.incrby(k, -3), 8, "INCRBY -3")
        same(r.decr(k), 7, "DECR")
        same(r.decrby(k, 4), 3, "DECRBY 4")
        same(r.decrby(k, -2), 5, "DECRBY -2")
        same(r.get(k), b"5", "GET")
        same(r.get(missing), None, "GET of a missing counter")

        same(r.decrby(neg, 7), -7, "DECRBY of a new counter")
        same(r.get(neg), b"-7", "GET of a negative counter")

        same(r.incrby(big, I64_MAX), I64_MAX, "INCRBY to i64::MAX")
        same(r.get(big), str(I64_MAX).encode(), "GET of i64::MAX")
        same(r.decrby(big, I64_MAX), 0, "DECRBY back to 0")
        same(r.get(big), b"0", "GET of a counter back at 0")

        same(r.mget(k, missing, neg), [b"5", None, b"-7"], "MGET with a missing counter")
        same(r.mget([missing]), [None], "MGET of a missing counter alone")
        same(r.exists(k, missing, k, neg), 3, "EXISTS counts each name given")
        same(r.exists(missing), 0, "EXISTS of a missing counter")

        before = r.dbsize()
        check(type(before) is int and before >= 3, f"DBSIZE {before!r} (3 counters made)")
        r.incr(run.key("fresh"))
        after = r.dbsize()
        # At least one more: other clients may add counters meanwhile.
        check(type(after) is int and after >= before + 1, f"DBSIZE {before} then {after}")

        # Deletes: what Redis and tally agree on (tally keeps a deleted
        # counter's name, reading 0 where Redis reads nil, so GET after DEL
        # is not compared).
        gone = run.key("gone")
        same(r.incrby(gone, 2), 2, "INCRBY before DEL")
        same(r.delete(gone, missing), 1, "DEL counts the counters that held a value")
        same(r.incr(gone), 1, "INCR after DEL counts from zero")
        same(r.getdel(gone), b"1", "GETDEL answers the value erased")
        same(r.incr(gone), 1, "INCR after GETDEL counts from zero")
        same(r.getdel(missing), None, "GETDEL of a missing counter")

        # Expiries: an expired counter is deleted as by DEL, so tally reads
        # it as 0 where Redis reads nil (checked per server below); the
        # rest answers alike. TTL rounds to the nearest second on both.
        ex = run.key("ex")
        same(r.incr(ex), 1, "INCR before EXPIRE")
        same(r.expire(ex, 100), True, "EXPIRE 100 of a counter")
        same(r.ttl(ex), 100, "TTL right after EXPIRE 100")
        left = r.pttl(ex)
        check(
            type(left) is int and 99000 <= left <= 100000,
            f"PTTL right after EXPIRE 100: {left!r}, want 99000 to 100000",
        )
        same(r.expire(ex, 200, nx=True), False, "EXPIRE NX of a counter with an expiry")
        same(r.expire(ex, 200, xx=True), True, "EXPIRE XX of a counter with an expiry")
        same(r.ttl(ex), 200, "TTL after EXPIRE 200 XX")
        same(r.expire(ex, 100, gt=True), False, "EXPIRE GT with an earlier time")
        same(r.expire(ex, 50, lt=True), True, "EXPIRE LT with an earlier time")
        same(r.ttl(ex), 50, "TTL after EXPIRE 50 LT")
        same(r.persist(ex), True, "PERSIST of a counter with an expiry")
        same(r.persist(ex), False, "PERSIST of a counter without an expiry")
        same(r.ttl(ex), -1, "TTL of a counter without an expiry")
        same(r.get(ex), b"1", "GET after PERSIST: the value is kept")
        same(r.ttl(missing), -2, "TTL of a missing counter")
        same(r.pttl(missing), -2, "PTTL of a missing counter")
        same(r.expire(missing, 10), False, "EXPIRE of a missing counter")
        same(r.exists(missing), 0, "EXPIRE does not make a missing counter")

        at_s = int(time.time()) + 86400
        same(r.expireat(ex, at_s), True, "EXPIREAT a day ahead")
        same(r.expiretime(ex), at_s, "EXPIRETIME after EXPIREAT")
        at_ms = (int(time.time()) + 2 * 86400) * 1000 + 123
        same(r.pexpireat(ex, at_ms), True, "PEXPIREAT two days ahead")
        same(r.pexpiretime(ex), at_ms, "PEXPIRETIME after PEXPIREAT")
        same(r.expiretime(ex), at_ms // 1000, "EXPIRETIME after PEXPIREAT")

        same(r.pexpire(ex, 150), True, "PEXPIRE 150")
        time.sleep(0.5)
        if run.server == "tally":
            same(r.get(ex), b"0", "GET of an expired counter on tally (deleted counters read 0)")
        else:
            same(r.get(ex), None, "GET of an expired key on Redis (nil)")
        same(r.incr(ex), 1, "INCR after the expiry counts from zero")
        same(r.expire(ex, -1), True, "EXPIRE -1 (a time already past deletes now)")
        same(r.incr(ex), 1, "INCR after EXPIRE -1 counts from zero")

    with run.client(decode_responses=True) as d:
        same(d.get(k), "5", "GET with decode_responses")
        same(d.mget(k, missing), ["5", None], "MGET with decode_responses")
        same(d.incr(k), 6, "INCR with decode_responses")


def group_errors(run):
    k = run.key("e")
    with run.single() as r:
        client_id = r.client_id()
        same(r.incr(k), 1, "INCR")
        for args, name in [
            (("INCR",), "incr"),
            (("INCRBY", k), "incrby"),
            (("GET", k, k), "get"),
            (("DECR", k, k), "decr"),
            (("DBSIZE", "x"), "dbsize"),
            (("MGET",), "mget"),
            (("EXISTS",), "exists"),
        ]:
            expect_error(
                lambda: r.execute_command(*args),
                f"wrong number of arguments for '{name}' command",
                f"{' '.join(map(str, args[:1]))} with {len(args) - 1} arguments",
            )
        for bad in ["abc", "1.5", "", "+1", "9223372036854775808"]:
            expect_error(
                lambda: r.incrby(k, bad),
                "value is not an integer or out of range",
                f"INCRBY by {bad!r}",
            )
        expect_error(
            lambda: r.decrby(k, "x"),
            "value is not an integer or out of range",
            "DECRBY by 'x'",
        )
        expect_error(
            lambda: r.incrby(k, I64_MAX),
            "increment or decrement would overflow",
            "INCRBY past i64::MAX",
        )
        expect_error(
            lambda: r.decrby(k, I64_MIN),
            "decrement would overflow",
            "DECRBY i64::MIN",
        )
        expect_error(
            lambda: r.execute_command("NOSUCHCMD", "a", "b"),
            "unknown command 'NOSUCHCMD', with args beginning with: 'a' 'b' ",
            "unknown command",
        )
        same(r.get(k), b"1", "counter unchanged by refused requests")
        same(r.client_id(), client_id, "same connection after the errors")
        same(r.incr(k), 2, "INCR after the errors")

    # redis-py turns these replies into AuthenticationError and then closes
    # the connection itself, so they get their own client.
    with run.single() as r:
        expect_error(
            lambda: r.execute_command("AUTH", "secret"),
            "AUTH <password> called without any password configured for the default "
            "user. Are you sure your configuration is correct?",
            "AUTH password with none configured",
            kind=AuthenticationError,
        )
    with run.single() as r:
        expect_error(
            lambda: r.execute_command("AUTH", "bob", "secret"),
            "invalid username-password pair or user is disabled.",
            "AUTH of an unknown user",
            kind=AuthenticationError,
        )


def group_pipeline(run):
    k, k2, k3, missing = (run.key(n) for n in ("p", "p2", "p3", "missing"))
    with run.client() as r:
        pipe = r.pipeline(transaction=False)
        for _ in range(100):
            pipe.incr(k)
        same(pipe.execute(), list(range(1, 101)), "100 pipelined INCRs")
        same(r.get(k), b"100", "GET after the pipeline")

        pipe = r.pipeline(transaction=False)
        pipe.incr(k2)
        pipe.get(k2)
        pipe.mget(k2, missing)
        pipe.exists(k2, missing)
        pipe.ping()
        pipe.echo("x")
        pipe.decrby(k2, 5)
        pipe.get(missing)
        same(
            pipe.execute(),
            [1, b"1", [b"1", None], 1, True, b"x", -4, None],
            "mixed pipeline",
        )

        # An error in the middle answers its own request only.
        pipe = r.pipeline(transaction=False)
        pipe.incr(k3)
        pipe.incrby(k3, "abc")
        pipe.execute_command("INCR")
        pipe.incr(k3)
        results = pipe.execute(raise_on_error=False)
        check(len(results) == 4, f"4 replies: {results!r}")
        same(results[0], 1, "pipelined INCR before the errors")
        check(
            isinstance(results[1], ResponseError)
            and "value is not an integer or out of range" in str(results[1]),
            f"pipelined INCRBY abc: {results[1]!r}",
        )
        check(
            isinstance(results[2], ResponseError)
            and "wrong number of arguments for 'incr' command" in str(results[2]),
            f"pipelined INCR without a key: {results[2]!r}",
        )
        same(results[3], 2, "pipelined INCR after the errors")

        pipe = r.pipeline(transaction=False)
        pipe.incr(k3)
        pipe.incrby(k3, "abc")
        try:
            pipe.execute()
            raise Failure("a pipeline with an error did not raise")
        except ResponseError as e:
            check("value is not an integer" in str(e), f"pipeline error {e}")
        same(r.get(k3), b"3", "the pipeline's good INCR applied")

        # A deeper pipeline, ten counters interleaved.
        pipe = r.pipeline(transaction=False)
        for i in range(1000):
            pipe.incr(run.key(f"deep{i % 10}"))
        want = [i // 10 + 1 for i in range(1000)]
        same(pipe.execute(), want, "1000 pipelined INCRs over 10 counters")


def group_info(run):
    with run.client() as r:
        r.incr(run.key("i"))
        everything = r.info()
        check(isinstance(everything, dict), f"INFO is not parsed to a dict: {everything!r}")
        check("redis_version" in everything, "INFO has redis_version")

        server = r.info("server")
        check(isinstance(server, dict), "INFO server is a dict")
        version = str(server.get("redis_version"))
        check(re.fullmatch(r"\d+\.\d+\.\d+", version), f"redis_version {version!r}")
        same(server.get("redis_mode"), "standalone", "redis_mode")
        check(type(server.get("tcp_port")) is int, f"tcp_port {server.get('tcp_port')!r}")
        if run.server == "tally":
            check("tally_version" in server, "INFO server has tally_version")

        clients = r.info("clients")
        connected = clients.get("connected_clients")
        check(type(connected) is int and connected >= 1, f"connected_clients {connected!r}")

        cluster = r.info("cluster")
        # 0 on both: tally keeps it 0 so that clients do not switch to a
        # Redis Cluster client (README); whether it has a store is tally's own field.
        same(cluster.get("cluster_enabled"), 0, "cluster_enabled")
        if run.server == "tally":
            check(cluster.get("tally_cluster_enabled") in (0, 1), "tally_cluster_enabled")

        keyspace = r.info("keyspace")
        keys = keyspace.get("db0", {}).get("keys")
        check(type(keys) is int and keys >= 1, f"db0 keys {keyspace!r}")

        same(r.info("nosuchsection"), {}, "INFO of an unknown section")

    with run.client(decode_responses=True) as d:
        check("redis_version" in d.info("server"), "INFO server with decode_responses")


def group_config(run):
    with run.client() as r:
        one = r.config_get("maxclients")
        check(isinstance(one, dict), f"CONFIG GET is not a dict: {one!r}")
        check(list(one) == ["maxclients"], f"CONFIG GET maxclients: {one!r}")
        check(str(one["maxclients"]).isdigit(), f"maxclients {one!r}")

        two = r.config_get("maxclients", "timeout")
        same(set(two), {"maxclients", "timeout"}, "CONFIG GET of two names")
        check("maxclients" in r.config_get("max*"), "CONFIG GET max* has maxclients")
        same(r.config_get("nosuch-parameter"), {}, "CONFIG GET of an unknown name")
        if run.server == "tally":
            # tally's fixed answers (src/resp/cmd/config.rs): one database,
            # every write journaled, no save schedule, no idle timeout.
            same(
                r.config_get("databases", "appendonly", "save", "timeout"),
                {"databases": "1", "appendonly": "yes", "save": "", "timeout": "0"},
                "tally's CONFIG GET answers",
            )


def group_connection(run):
    with run.single() as r:
        same(r.ping(), True, "PING")
        # redis-py's PING callback turns any reply into a bool, so PING with
        # a message is read off the connection directly.
        r.connection.send_command("PING", "hi")
        same(r.connection.read_response(), b"hi", "PING hi")
        same(r.echo("hello"), b"hello", "ECHO")
        same(r.echo(b"\x00\xff\r\n"), b"\x00\xff\r\n", "ECHO of binary bytes")
        same(r.execute_command("SELECT", 0), True, "SELECT 0")
        if run.server == "tally":
            expect_error(
                lambda: r.execute_command("SELECT", 1),
                "DB index is out of range",
                "SELECT 1 on tally (one database)",
            )

        client_id = r.client_id()
        check(type(client_id) is int, f"CLIENT ID {client_id!r}")
        same(r.client_getname(), None, "CLIENT GETNAME before a name")
        same(r.client_setname("compat-py"), True, "CLIENT SETNAME")
        # redis-py returns the name as str or bytes depending on the protocol.
        same(text(r.client_getname()), "compat-py", "CLIENT GETNAME")
        info = r.client_info()
        same(info.get("id"), client_id, "CLIENT INFO id")
        same(info.get("name"), "compat-py", "CLIENT INFO name")
        same(info.get("resp"), str(run.proto), "CLIENT INFO resp")
        if run.server == "tally":
            # redis-py sends CLIENT SETINFO on connect; Redis has it from 7.2
            # only, so this is not checked against an older Redis.
            same(info.get("lib-name"), "redis-py", "CLIENT INFO lib-name")
            same(info.get("lib-ver"), redis.__version__, "CLIENT INFO lib-ver")
        expect_error(
            lambda: r.client_setname("a b"),
            "Client names cannot contain spaces, newlines or special characters.",
            "CLIENT SETNAME with a space",
        )
        same(r.client_setname(""), True, "CLIENT SETNAME ''")
        same(r.client_getname(), None, "an empty name removes the name")
        same(r.execute_command("AUTH", "default", "anything"), True, "AUTH default <pw>")
        same(r.client_id(), client_id, "same connection throughout")

    # RESET drops the name and goes back to RESP2, as Redis does. (Only
    # replies that read the same in both protocols follow it: redis-py keeps
    # its RESP3 parser, which cannot read a RESP2 null.)
    with run.single() as r:
        r.client_setname("compat-reset")
        same(text(r.execute_command("RESET")), "RESET", "RESET")
        info = r.client_info()
        same(info.get("name"), "", "no name after RESET")
        same(info.get("resp"), "2", "RESP2 after RESET")
        same(r.ping(), True, "PING after RESET")

    with run.single() as r:
        same(r.execute_command("QUIT"), True, "QUIT")


def group_command(run):
    with run.client() as r:
        count = r.command_count()
        check(type(count) is int and count >= 15, f"COMMAND COUNT {count!r}")
        table = r.command()
        check(isinstance(table, dict), "COMMAND is parsed to a dict")
        for name, arity in [
            ("incr", 2), ("incrby", 3), ("decr", 2), ("decrby", 3), ("get", 2),
            ("mget", -2), ("exists", -2), ("dbsize", 1), ("ping", -1), ("echo", 2),
            ("hello", -1), ("client", -2), ("info", -1), ("config", -2),
            ("del", -2), ("getdel", 2),
            ("expire", -3), ("pexpire", -3), ("expireat", -3), ("pexpireat", -3),
            ("persist", 2), ("ttl", 2), ("pttl", 2), ("expiretime", 2), ("pexpiretime", 2),
        ]:
            check(name in table, f"COMMAND lists {name}")
            same(table[name]["arity"], arity, f"COMMAND arity of {name}")
        incr = table["incr"]
        flags = {text(f) for f in incr["flags"]}
        check({"write", "fast"} <= flags, f"incr flags {incr['flags']!r}")
        same(
            (incr["first_key_pos"], incr["last_key_pos"], incr["step_count"]),
            (1, 1, 1),
            "incr key positions",
        )
        # Redis 7 sends flags as a set in RESP3; redis-py gives a set or a list
        # depending on its own reply shapes, not on the wire type, so only the
        # contents are checked (the node script checks the wire type).
        info = r.execute_command("COMMAND", "INFO", "get")
        same(info["get"]["arity"], 2, "COMMAND INFO get")
        if run.server == "tally":
            same(table["tally.incrby"]["arity"], -3, "COMMAND arity of tally.incrby")


def group_pool(run):
    # redis-py's plain ConnectionPool raises "Too many connections" when a
    # 5th thread asks for one of its 4; BlockingConnectionPool (a
    # ConnectionPool) makes the thread wait, which is what a pool of 4 shared
    # by 8 threads wants.
    threads_n, per_thread, connections = 8, 200, 4
    k = run.key("pool")
    pool = redis.BlockingConnectionPool(
        max_connections=connections, timeout=SOCKET_TIMEOUT, **run.connection_kwargs()
    )
    r = redis.Redis(connection_pool=pool)
    results = [[] for _ in range(threads_n)]
    client_ids = set()
    errors = []
    lock = threading.Lock()

    def work(i):
        try:
            for _ in range(per_thread):
                results[i].append(r.incr(k))
            with lock:
                client_ids.add(r.client_id())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads_n)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        check(not any(t.is_alive() for t in threads), "pool threads still running after 60 s")
        check(not errors, "; ".join(errors))
        total = threads_n * per_thread
        for i, got in enumerate(results):
            check(got == sorted(got) and len(set(got)) == per_thread, f"thread {i} values {got[:5]}...")
        every = sorted(v for got in results for v in got)
        check(every == list(range(1, total + 1)), "each value 1..1600 answered exactly once")
        same(r.get(k), str(total).encode(), "final value")
        check(len(client_ids) <= connections, f"{len(client_ids)} connections used, at most {connections}")
    finally:
        pool.disconnect()


def group_tally(run):
    """tally's own command (README, "RESP"):
    TALLY.INCRBY name delta [IDEMPOTENCY key] [DURABILITY memory|local|replicated]
      -> [value, duplicate (0 or 1)]"""
    k = run.key("t")
    idem = f"compat-py-{RUN_ID}-{run.label}"
    with run.client() as r:
        def tally(*args):
            return r.execute_command("TALLY.INCRBY", k, *args)

        same(tally(5), [5, 0], "TALLY.INCRBY 5")
        same(tally(5, "DURABILITY", "memory"), [10, 0], "DURABILITY memory")
        same(tally(5, "DURABILITY", "local", "IDEMPOTENCY", idem + "-1"), [15, 0], "IDEMPOTENCY, first")
        same(tally(5, "DURABILITY", "local", "IDEMPOTENCY", idem + "-1"), [15, 1], "IDEMPOTENCY, retried")
        same(tally(5, "idempotency", idem + "-1", "durability", "MEMORY"), [15, 1], "options in any order and case")
        same(r.get(k), b"15", "a retried key counted once")
        same(tally(-2, "IDEMPOTENCY", idem + "-2"), [13, 0], "a new key counts")

        # Guessed: a key sent twice in one pipelined round counts once and the
        # second reply says duplicate (requests of a round run in order).
        pipe = r.pipeline(transaction=False)
        pipe.execute_command("TALLY.INCRBY", k, 1, "IDEMPOTENCY", idem + "-3")
        pipe.execute_command("TALLY.INCRBY", k, 1, "IDEMPOTENCY", idem + "-3")
        same(pipe.execute(), [[14, 0], [14, 1]], "a key twice in one pipeline")

        expect_error(
            lambda: tally(1, "DURABILITY", "disk"),
            "durability is invalid: 'disk' is not one of memory, local, replicated",
            "DURABILITY disk",
        )
        expect_error(lambda: tally(1, "FOO", "x"), "syntax error", "unknown option")
        expect_error(lambda: tally(1, "IDEMPOTENCY"), "syntax error", "option without a value")
        expect_error(
            lambda: tally(1, "IDEMPOTENCY", ""),
            "idempotency key is invalid: it is empty",
            "empty idempotency key",
        )
        expect_error(
            lambda: r.execute_command("TALLY.INCRBY", k),
            "wrong number of arguments for 'tally.incrby' command",
            "TALLY.INCRBY without a delta",
        )
        expect_error(
            lambda: r.incr("n" * 257),
            "counter name is invalid: it is 257 bytes long; the limit is 256 bytes",
            "a name over 256 bytes",
        )
        same(r.get(k), b"14", "refused requests changed nothing")

        # replicated needs a store: refused, never downgraded, without one.
        # (The error's wording is not checked: the README does not give it.)
        if r.info("cluster").get("tally_cluster_enabled") == 1:
            same(tally(1, "DURABILITY", "replicated"), [15, 0], "DURABILITY replicated")
        else:
            try:
                reply = tally(1, "DURABILITY", "replicated")
                raise Failure(f"DURABILITY replicated without a store answered {reply!r}")
            except ResponseError:
                pass
            same(r.get(k), b"14", "a refused replicated increment is not applied")


GROUPS = [
    ("handshake", group_handshake),
    ("counters", group_counters),
    ("errors", group_errors),
    ("pipeline", group_pipeline),
    ("info", group_info),
    ("config", group_config),
    ("connection", group_connection),
    ("command", group_command),
    ("pool", group_pool),
    ("tally", group_tally),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=["tally", "redis"], default="tally")
    args = parser.parse_args()

    def watchdog(_signum, _frame):
        print(f"FAIL: the suite ran longer than {WATCHDOG_SECONDS} s", file=sys.stderr, flush=True)
        os._exit(2)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(WATCHDOG_SECONDS)

    print(f"redis-py {redis.__version__} against {args.server} at {args.host}:{args.port}, run {RUN_ID}")
    passed = 0
    for label, protocol in [("default", None), ("resp2", 2), ("resp3", 3)]:
        run = Run(args, label, protocol)
        for name, group in GROUPS:
            if name == "tally" and args.server != "tally":
                continue
            where = f"redis-py protocol={label}"
            if run.proto is not None:
                where += f" (RESP{run.proto})"
            try:
                group(run)
            except Failure as e:
                print(f"FAIL {where} [{name}]: {e}", file=sys.stderr)
                print(f"{passed} passed, 1 failed")
                return 1
            except Exception as e:  # noqa: BLE001 - an unexpected error is a failure too
                traceback.print_exc()
                print(f"FAIL {where} [{name}]: {type(e).__name__}: {e}", file=sys.stderr)
                print(f"{passed} passed, 1 failed")
                return 1
            passed += 1
            print(f"ok   redis-py protocol={label} (RESP{run.proto}) {name}", flush=True)
    print(f"{passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

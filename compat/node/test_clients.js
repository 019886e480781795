#!/usr/bin/env node
// tally's RESP compatibility checks, driven by ioredis and node-redis.
//
//   node compat/node/test_clients.js --host 127.0.0.1 --port PORT [--server tally|redis]
//
// Runs the same check groups as compat/python/test_redis_py.py, as far as
// each library allows, in six settings:
//
//   ioredis    at its defaults: ioredis 6 speaks RESP3 by default (it sends
//              HELLO 3 and quietly falls back to RESP2 if the server answers
//              NOPROTO; the "handshake" group fails on such a fall-back),
//              with its RESP2-shaped ("legacy") replies: maps as flat arrays
//   ioredis    protocol: 2
//   ioredis    protocol: 3, replyMapping: "resp3" (maps as objects)
//   node-redis at its default: node-redis 5 and later speak RESP3 by default
//   node-redis RESP: 2
//   node-redis RESP: 3
//
// Under RESP3 the node-redis runs also check the wire types Redis 7 sends,
// which node-redis can tell apart: a map for HELLO and CONFIG GET, a
// verbatim string for INFO and CLIENT INFO, sets for COMMAND's flags.
//
// With --server redis the tally-only group (TALLY.INCRBY, tally's limits) is
// skipped. Each run uses its own key prefix. The script stops at the first
// failure, naming the run, the group and the check, and exits 1. One line is
// printed per passed group; the last line is "N passed, N failed".

'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs, isDeepStrictEqual, inspect } = require('node:util');

const Redis = require('ioredis');
const { createClient, createClientPool, RESP_TYPES, VerbatimString, DEFAULT_RESP } = require('redis');

// Connect and per-command timeouts, in milliseconds.
const TIMEOUT_MS = 5000;
// The whole script is stopped after this long, whatever it is doing.
const WATCHDOG_MS = 100000;

const I64_MAX = '9223372036854775807';
const I64_MIN = '-9223372036854775808';
const RUN_ID = `${Math.floor(Date.now() / 1000)}-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
const HELLO_FIELDS = ['id', 'mode', 'modules', 'proto', 'role', 'server', 'version'];

class Failure extends Error {}

function check(condition, what) {
  if (!condition) throw new Failure(what);
}

function show(value) {
  return inspect(value, { depth: 4, breakLength: Infinity });
}

// Equal, with the same JavaScript types all the way down (1 is not '1').
function same(got, want, what) {
  if (!isDeepStrictEqual(got, want)) throw new Failure(`${what}: got ${show(got)}, want ${show(want)}`);
}

// `promise` must reject with an error whose message is exactly `message`
// (both libraries keep Redis's whole line, 'ERR ' included).
async function expectError(promise, message, what) {
  let result;
  try {
    result = await promise;
  } catch (e) {
    if (e instanceof Failure) throw e;
    if (e.message !== message) throw new Failure(`${what}: error ${show(e.message)}, want ${show(message)}`);
    return e;
  }
  throw new Failure(`${what}: answered ${show(result)}, want the error ${show(message)}`);
}

// A map reply as a plain object: an object, a Map, or a flat array of pairs.
function asObject(reply, what) {
  if (reply instanceof Map) return Object.fromEntries([...reply].map(([k, v]) => [String(k), v]));
  if (Array.isArray(reply)) {
    check(reply.length % 2 === 0, `${what}: odd flat map ${show(reply)}`);
    const out = {};
    for (let i = 0; i < reply.length; i += 2) out[String(reply[i])] = reply[i + 1];
    return out;
  }
  check(reply !== null && typeof reply === 'object', `${what}: not a map: ${show(reply)}`);
  return reply;
}

// INFO's text as { field: 'value' }.
function parseInfo(text) {
  const out = {};
  for (const line of String(text).split('\r\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const at = line.indexOf(':');
    if (at > 0) out[line.slice(0, at)] = line.slice(at + 1);
  }
  return out;
}

// CLIENT INFO's line as { field: 'value' }.
function parseClientInfo(text) {
  const out = {};
  for (const pair of String(text).trim().split(' ')) {
    const at = pair.indexOf('=');
    if (at > 0) out[pair.slice(0, at)] = pair.slice(at + 1);
  }
  return out;
}

function checkHello(fields, run, clientId, proto, what) {
  same(Object.keys(fields).sort(), HELLO_FIELDS, `${what}: fields`);
  same(fields.server, run.server, `${what}: server`);
  check(/^\d+\.\d+\.\d+$/.test(fields.version) && Number(fields.version.split('.')[0]) >= 7,
    `${what}: version ${show(fields.version)}`);
  same(fields.proto, proto, `${what}: proto`);
  same(fields.id, clientId, `${what}: id`);
  same(fields.mode, 'standalone', `${what}: mode`);
  same(fields.role, 'master', `${what}: role`);
  same(fields.modules, [], `${what}: modules`);
}

function checkInfoText(text, run, what) {
  check(typeof text === 'string', `${what}: not a string: ${show(text)}`);
  const info = parseInfo(text);
  check(/^\d+\.\d+\.\d+$/.test(info.redis_version || ''), `${what}: redis_version ${show(info.redis_version)}`);
  same(info.redis_mode, 'standalone', `${what}: redis_mode`);
  if (run.server === 'tally') check('tally_version' in info, `${what}: tally_version`);
  return info;
}

// Runs `workers` loops of `perWorker` calls of `incr()` at once; checks that
// every value 1..total came back once, each loop's in increasing order.
async function checkParallelIncrements(incr, workers, perWorker) {
  const results = await Promise.all(Array.from({ length: workers }, async () => {
    const got = [];
    for (let i = 0; i < perWorker; i++) got.push(Number(await incr()));
    return got;
  }));
  results.forEach((got, i) => {
    check(got.every((v, j) => j === 0 || v > got[j - 1]), `worker ${i}: values out of order`);
  });
  const every = results.flat().sort((a, b) => a - b);
  const total = workers * perWorker;
  check(every.length === total && every.every((v, i) => v === i + 1), `each value 1..${total} answered exactly once`);
}

// ------------------------------------------------------------------ ioredis

async function ioClient(run, extra = {}) {
  const r = new Redis({
    host: run.host,
    port: run.port,
    lazyConnect: true,
    connectTimeout: TIMEOUT_MS,
    commandTimeout: TIMEOUT_MS,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null, // no reconnects: a dropped connection must show
    ...run.options,
    ...extra,
  });
  r.on('error', () => {}); // surfaces through the commands' promises
  await r.connect();
  return r;
}

// A map reply as ioredis hands it over: an object with replyMapping "resp3"
// on a RESP3 connection, a flat array otherwise.
function ioMap(run, reply, what) {
  if (run.maps) check(!Array.isArray(reply) && typeof reply === 'object', `${what}: not an object: ${show(reply)}`);
  else check(Array.isArray(reply), `${what}: not a flat array: ${show(reply)}`);
  return asObject(reply, what);
}

const ioGroups = {
  async handshake(run, r) {
    const info = parseClientInfo(await r.client('INFO'));
    // ioredis falls back to RESP2 without a word when HELLO 3 is refused.
    same(info.resp, String(run.proto), 'protocol in effect (CLIENT INFO resp=)');
    const id = await r.client('ID');
    check(Number.isInteger(id) && id > 0, `CLIENT ID ${show(id)}`);
    checkHello(ioMap(run, await r.call('HELLO'), 'HELLO'), run, id, run.proto, 'HELLO');
    checkHello(ioMap(run, await r.call('HELLO', run.proto), 'HELLO n'), run, id, run.proto, `HELLO ${run.proto}`);
    await r.call('HELLO', run.proto, 'SETNAME', 'compat-hello');
    same(await r.client('GETNAME'), 'compat-hello', 'name set by HELLO SETNAME');
    await expectError(r.call('HELLO', 4), 'NOPROTO unsupported protocol version', 'HELLO 4');
    await expectError(r.call('HELLO', 'x'), 'ERR Protocol version is not an integer or out of range', 'HELLO x');
    same(await r.client('ID'), id, 'same connection after refused HELLOs');
  },

  async counters(run, r) {
    const [k, neg, big, missing] = ['c', 'neg', 'big', 'missing'].map(run.key);
    same(await r.incr(k), 1, 'INCR of a new counter');
    same(await r.incrby(k, 10), 11, 'INCRBY 10');
    same(await r.incrby(k, -3), 8, 'INCRBY -3');
    same(await r.decr(k), 7, 'DECR');
    same(await r.decrby(k, 4), 3, 'DECRBY 4');
    same(await r.decrby(k, -2), 5, 'DECRBY -2');
    same(await r.get(k), '5', 'GET');
    same(await r.getBuffer(k), Buffer.from('5'), 'GET as a Buffer');
    same(await r.get(missing), null, 'GET of a missing counter');
    same(await r.decrby(neg, 7), -7, 'DECRBY of a new counter');
    same(await r.get(neg), '-7', 'GET of a negative counter');
    same(await r.mget(k, missing, neg), ['5', null, '-7'], 'MGET with a missing counter');
    same(await r.exists(k, missing, k, neg), 3, 'EXISTS counts each name given');
    same(await r.exists(missing), 0, 'EXISTS of a missing counter');
    const before = await r.dbsize();
    check(Number.isInteger(before) && before >= 2, `DBSIZE ${show(before)}`);
    await r.incr(run.key('fresh'));
    const after = await r.dbsize();
    // At least one more: other clients may add counters meanwhile.
    check(after >= before + 1, `DBSIZE ${before} then ${after}`);

    // 64-bit values need stringNumbers: a JavaScript number cannot hold them.
    const s = await ioClient(run, { stringNumbers: true });
    try {
      same(await s.incrby(big, I64_MAX), I64_MAX, 'INCRBY to i64::MAX');
      same(await s.get(big), I64_MAX, 'GET of i64::MAX');
      same(await s.decrby(big, I64_MAX), '0', 'DECRBY back to 0');
    } finally {
      s.disconnect();
    }
  },

  async errors(run, r) {
    const k = run.key('e');
    const id = await r.client('ID');
    same(await r.incr(k), 1, 'INCR');
    for (const [args, name] of [[['INCR'], 'incr'], [['INCRBY', k], 'incrby'], [['GET', k, k], 'get'], [['DBSIZE', 'x'], 'dbsize'], [['MGET'], 'mget']]) {
      await expectError(r.call(...args), `ERR wrong number of arguments for '${name}' command`, `${args[0]} with ${args.length - 1} arguments`);
    }
    for (const bad of ['abc', '1.5', '', '+1', '9223372036854775808']) {
      await expectError(r.incrby(k, bad), 'ERR value is not an integer or out of range', `INCRBY by ${show(bad)}`);
    }
    await expectError(r.incrby(k, I64_MAX), 'ERR increment or decrement would overflow', 'INCRBY past i64::MAX');
    await expectError(r.decrby(k, I64_MIN), 'ERR decrement would overflow', 'DECRBY i64::MIN');
    await expectError(r.call('NOSUCHCMD', 'a', 'b'), "ERR unknown command 'NOSUCHCMD', with args beginning with: 'a' 'b' ", 'unknown command');
    await expectError(r.call('AUTH', 'secret'),
      'ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?',
      'AUTH password with none configured');
    await expectError(r.call('AUTH', 'bob', 'secret'), 'WRONGPASS invalid username-password pair or user is disabled.', 'AUTH of an unknown user');
    same(await r.get(k), '1', 'counter unchanged by refused requests');
    same(await r.client('ID'), id, 'same connection after the errors');
    same(await r.incr(k), 2, 'INCR after the errors');
  },

  async pipeline(run, r) {
    const [k, k2, k3, missing] = ['p', 'p2', 'p3', 'missing'].map(run.key);
    const p = r.pipeline();
    for (let i = 0; i < 100; i++) p.incr(k);
    same(await p.exec(), Array.from({ length: 100 }, (_, i) => [null, i + 1]), '100 pipelined INCRs');
    same(await r.get(k), '100', 'GET after the pipeline');

    const mixed = await r.pipeline().incr(k2).get(k2).mget(k2, missing).exists(k2, missing)
      .ping().echo('x').decrby(k2, 5).get(missing).exec();
    same(mixed, [[null, 1], [null, '1'], [null, ['1', null]], [null, 1], [null, 'PONG'], [null, 'x'], [null, -4], [null, null]], 'mixed pipeline');

    // An error in the middle answers its own request only.
    const withErrors = await r.pipeline().incr(k3).incrby(k3, 'abc').call('INCR').incr(k3).exec();
    same(withErrors.length, 4, '4 replies');
    same(withErrors[0], [null, 1], 'pipelined INCR before the errors');
    same(withErrors[1][0] && withErrors[1][0].message, 'ERR value is not an integer or out of range', 'pipelined INCRBY abc');
    same(withErrors[2][0] && withErrors[2][0].message, "ERR wrong number of arguments for 'incr' command", 'pipelined INCR without a key');
    same(withErrors[3], [null, 2], 'pipelined INCR after the errors');

    const deep = r.pipeline();
    for (let i = 0; i < 1000; i++) deep.incr(run.key(`deep${i % 10}`));
    same(await deep.exec(), Array.from({ length: 1000 }, (_, i) => [null, Math.floor(i / 10) + 1]), '1000 pipelined INCRs over 10 counters');
  },

  async info(run, r) {
    await r.incr(run.key('i'));
    checkInfoText(await r.info(), run, 'INFO');
    checkInfoText(await r.info('server'), run, 'INFO server');
    const clients = parseInfo(await r.info('clients'));
    check(Number(clients.connected_clients) >= 1, `connected_clients ${show(clients.connected_clients)}`);
    same(parseInfo(await r.info('cluster')).cluster_enabled, '0', 'cluster_enabled');
    const db0 = parseInfo(await r.info('keyspace')).db0 || '';
    check(/^keys=[1-9]\d*(,|$)/.test(db0), `db0 ${show(db0)}`);
    same(await r.info('nosuchsection'), '', 'INFO of an unknown section');
  },

  async config(run, r) {
    const one = ioMap(run, await r.config('GET', 'maxclients'), 'CONFIG GET');
    same(Object.keys(one), ['maxclients'], 'CONFIG GET maxclients');
    check(/^\d+$/.test(one.maxclients), `maxclients ${show(one.maxclients)}`);
    same(Object.keys(ioMap(run, await r.config('GET', 'maxclients', 'timeout'), 'CONFIG GET two')).sort(), ['maxclients', 'timeout'], 'CONFIG GET of two names');
    check('maxclients' in ioMap(run, await r.config('GET', 'max*'), 'CONFIG GET max*'), 'CONFIG GET max* has maxclients');
    same(Object.keys(ioMap(run, await r.config('GET', 'nosuch-parameter'), 'CONFIG GET nosuch')), [], 'CONFIG GET of an unknown name');
    if (run.server === 'tally') {
      same(ioMap(run, await r.config('GET', 'databases', 'appendonly', 'save', 'timeout'), 'CONFIG GET tally'),
        { databases: '1', appendonly: 'yes', save: '', timeout: '0' }, "tally's CONFIG GET answers");
    }
  },

  async connection(run, r) {
    same(await r.ping(), 'PONG', 'PING');
    same(await r.ping('hi'), 'hi', 'PING hi');
    same(await r.echo('hello'), 'hello', 'ECHO');
    same(await r.echoBuffer(Buffer.from([0, 255, 13, 10])), Buffer.from([0, 255, 13, 10]), 'ECHO of binary bytes');
    same(await r.select(0), 'OK', 'SELECT 0');
    if (run.server === 'tally') await expectError(r.select(1), 'ERR DB index is out of range', 'SELECT 1 on tally');
    const id = await r.client('ID');
    same(await r.client('GETNAME'), null, 'CLIENT GETNAME before a name');
    same(await r.client('SETNAME', 'compat-io'), 'OK', 'CLIENT SETNAME');
    same(await r.client('GETNAME'), 'compat-io', 'CLIENT GETNAME');
    const info = parseClientInfo(await r.client('INFO'));
    same([info.id, info.name, info.resp], [String(id), 'compat-io', String(run.proto)], 'CLIENT INFO id, name, resp');
    // ioredis sends CLIENT SETINFO on connect; Redis has it from 7.2 only.
    if (run.server === 'tally') same(info['lib-name'], 'ioredis', 'CLIENT INFO lib-name');
    await expectError(r.client('SETNAME', 'a b'), 'ERR Client names cannot contain spaces, newlines or special characters.', 'CLIENT SETNAME with a space');
    same(await r.client('SETNAME', ''), 'OK', "CLIENT SETNAME ''");
    same(await r.client('GETNAME'), null, 'an empty name removes the name');
    same(await r.call('AUTH', 'default', 'anything'), 'OK', 'AUTH default <pw>');
    same(await r.client('ID'), id, 'same connection throughout');

    // RESET: no name, back to RESP2. Only replies that read the same in both
    // protocols follow it.
    const x = await ioClient(run);
    try {
      await x.client('SETNAME', 'compat-reset');
      same(await x.call('RESET'), 'RESET', 'RESET');
      const after = parseClientInfo(await x.client('INFO'));
      same([after.name, after.resp], ['', '2'], 'no name and RESP2 after RESET');
      same(await x.ping(), 'PONG', 'PING after RESET');
    } finally {
      x.disconnect();
    }
    const q = await ioClient(run);
    same(await q.quit(), 'OK', 'QUIT');
  },

  async command(run, r) {
    const count = await r.command('COUNT');
    check(Number.isInteger(count) && count >= 15, `COMMAND COUNT ${show(count)}`);
    const [incr, get, none] = await r.command('INFO', 'incr', 'get', 'nosuchcmd');
    same([incr[0], incr[1], incr[3], incr[4], incr[5]], ['incr', 2, 1, 1, 1], 'COMMAND INFO incr');
    check(incr[2].includes('write') && incr[2].includes('fast'), `incr flags ${show(incr[2])}`);
    same([get[0], get[1]], ['get', 2], 'COMMAND INFO get');
    same(none, null, 'COMMAND INFO of an unknown command');
    const list = await r.command('LIST');
    for (const name of ['incr', 'incrby', 'decr', 'decrby', 'get', 'mget', 'exists', 'dbsize', 'ping', 'echo', 'hello', 'client', 'info', 'config']) {
      check(list.includes(name), `COMMAND LIST has ${name}`);
    }
    if (run.server === 'tally') {
      const [tally] = await r.command('INFO', 'tally.incrby');
      same([tally[0], tally[1]], ['tally.incrby', -3], 'COMMAND INFO tally.incrby');
    }
  },

  // ioredis has no pool: four connections, eight workers sharing them.
  async pool(run) {
    const k = run.key('pool');
    const clients = await Promise.all([0, 1, 2, 3].map(() => ioClient(run)));
    try {
      let next = 0;
      await checkParallelIncrements(() => clients[next++ % clients.length].incr(k), 8, 200);
      same(await clients[0].get(k), '1600', 'final value');
    } finally {
      clients.forEach((c) => c.disconnect());
    }
  },

  async tally(run, r) {
    await tallyChecks(run, (...args) => r.call('TALLY.INCRBY', ...args), (key) => r.get(key),
      async (calls) => (await calls.reduce((p, args) => p.call('TALLY.INCRBY', ...args), r.pipeline()).exec()).map(([err, v]) => {
        if (err) throw err;
        return v;
      }),
      async () => parseInfo(await r.info('cluster')).tally_cluster_enabled);
  },
};

// --------------------------------------------------------------- node-redis

async function nrClient(run, extra = {}) {
  const client = createClient({
    socket: { host: run.host, port: run.port, connectTimeout: TIMEOUT_MS, reconnectStrategy: false },
    ...run.options,
    ...extra,
  });
  client.on('error', () => {}); // surfaces through the commands' promises
  await client.connect();
  return client;
}

async function nrClose(client) {
  try {
    if (client.isOpen) await client.close();
  } catch {
    client.destroy();
  }
}

const nrGroups = {
  async handshake(run, c) {
    const info = parseClientInfo(await c.sendCommand(['CLIENT', 'INFO']));
    same(info.resp, String(run.proto), 'protocol in effect (CLIENT INFO resp=)');
    const id = await c.clientId();
    check(Number.isInteger(id) && id > 0, `CLIENT ID ${show(id)}`);
    // node-redis's hello() makes an object of either form; the raw reply
    // shows what came over the wire: a map in RESP3, a flat array in RESP2.
    checkHello(await c.hello(), run, id, run.proto, 'hello()');
    const raw = await c.withTypeMapping({ [RESP_TYPES.MAP]: Map }).sendCommand(['HELLO', String(run.proto)]);
    if (run.proto === 3) check(raw instanceof Map, `HELLO 3 is not a RESP3 map: ${show(raw)}`);
    else check(Array.isArray(raw), `HELLO 2 is not an array: ${show(raw)}`);
    checkHello(asObject(raw, 'HELLO'), run, id, run.proto, `HELLO ${run.proto}`);
    await c.sendCommand(['HELLO', String(run.proto), 'SETNAME', 'compat-hello']);
    same(await c.clientGetName(), 'compat-hello', 'name set by HELLO SETNAME');
    await expectError(c.sendCommand(['HELLO', '4']), 'NOPROTO unsupported protocol version', 'HELLO 4');
    await expectError(c.sendCommand(['HELLO', 'x']), 'ERR Protocol version is not an integer or out of range', 'HELLO x');
    same(await c.clientId(), id, 'same connection after refused HELLOs');
  },

  async counters(run, c) {
    const [k, neg, big, missing] = ['c', 'neg', 'big', 'missing'].map(run.key);
    same(await c.incr(k), 1, 'INCR of a new counter');
    same(await c.incrBy(k, 10), 11, 'INCRBY 10');
    same(await c.incrBy(k, -3), 8, 'INCRBY -3');
    same(await c.decr(k), 7, 'DECR');
    same(await c.decrBy(k, 4), 3, 'DECRBY 4');
    same(await c.decrBy(k, -2), 5, 'DECRBY -2');
    same(await c.get(k), '5', 'GET');
    same(await c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }).get(k), Buffer.from('5'), 'GET as a Buffer');
    same(await c.get(missing), null, 'GET of a missing counter');
    same(await c.decrBy(neg, 7), -7, 'DECRBY of a new counter');
    same(await c.get(neg), '-7', 'GET of a negative counter');
    same(await c.mGet([k, missing, neg]), ['5', null, '-7'], 'MGET with a missing counter');
    same(await c.exists([k, missing, k, neg]), 3, 'EXISTS counts each name given');
    same(await c.exists(missing), 0, 'EXISTS of a missing counter');
    const before = await c.dbSize();
    check(Number.isInteger(before) && before >= 2, `DBSIZE ${show(before)}`);
    await c.incr(run.key('fresh'));
    const after = await c.dbSize();
    // At least one more: other clients may add counters meanwhile.
    check(after >= before + 1, `DBSIZE ${before} then ${after}`);

    // 64-bit values: integer replies as strings, a JavaScript number cannot hold them.
    const s = c.withTypeMapping({ [RESP_TYPES.NUMBER]: String });
    same(await s.sendCommand(['INCRBY', big, I64_MAX]), I64_MAX, 'INCRBY to i64::MAX');
    same(await s.get(big), I64_MAX, 'GET of i64::MAX');
    same(await s.sendCommand(['DECRBY', big, I64_MAX]), '0', 'DECRBY back to 0');
  },

  async errors(run, c) {
    const k = run.key('e');
    const id = await c.clientId();
    same(await c.incr(k), 1, 'INCR');
    for (const [args, name] of [[['INCR'], 'incr'], [['INCRBY', k], 'incrby'], [['GET', k, k], 'get'], [['DBSIZE', 'x'], 'dbsize'], [['MGET'], 'mget']]) {
      await expectError(c.sendCommand(args), `ERR wrong number of arguments for '${name}' command`, `${args[0]} with ${args.length - 1} arguments`);
    }
    for (const bad of ['abc', '1.5', '', '+1', '9223372036854775808']) {
      await expectError(c.sendCommand(['INCRBY', k, bad]), 'ERR value is not an integer or out of range', `INCRBY by ${show(bad)}`);
    }
    await expectError(c.sendCommand(['INCRBY', k, I64_MAX]), 'ERR increment or decrement would overflow', 'INCRBY past i64::MAX');
    await expectError(c.sendCommand(['DECRBY', k, I64_MIN]), 'ERR decrement would overflow', 'DECRBY i64::MIN');
    await expectError(c.sendCommand(['NOSUCHCMD', 'a', 'b']), "ERR unknown command 'NOSUCHCMD', with args beginning with: 'a' 'b' ", 'unknown command');
    await expectError(c.sendCommand(['AUTH', 'secret']),
      'ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?',
      'AUTH password with none configured');
    await expectError(c.sendCommand(['AUTH', 'bob', 'secret']), 'WRONGPASS invalid username-password pair or user is disabled.', 'AUTH of an unknown user');
    same(await c.get(k), '1', 'counter unchanged by refused requests');
    same(await c.clientId(), id, 'same connection after the errors');
    same(await c.incr(k), 2, 'INCR after the errors');
  },

  async pipeline(run, c) {
    const [k, k2, k3, missing] = ['p', 'p2', 'p3', 'missing'].map(run.key);
    let m = c.multi();
    for (let i = 0; i < 100; i++) m = m.incr(k);
    same(await m.execAsPipeline(), Array.from({ length: 100 }, (_, i) => i + 1), '100 pipelined INCRs (execAsPipeline)');
    same(await c.get(k), '100', 'GET after the pipeline');

    const mixed = await c.multi().incr(k2).get(k2).mGet([k2, missing]).exists([k2, missing])
      .ping().echo('x').decrBy(k2, 5).get(missing).execAsPipeline();
    same(mixed, [1, '1', ['1', null], 1, 'PONG', 'x', -4, null], 'mixed pipeline');

    // node-redis also pipelines the commands issued in one tick; an error in
    // the middle answers its own request only.
    const settled = await Promise.allSettled([
      c.incr(k3), c.sendCommand(['INCRBY', k3, 'abc']), c.sendCommand(['INCR']), c.incr(k3),
    ]);
    same(settled[0], { status: 'fulfilled', value: 1 }, 'pipelined INCR before the errors');
    same(settled[1].reason && settled[1].reason.message, 'ERR value is not an integer or out of range', 'pipelined INCRBY abc');
    same(settled[2].reason && settled[2].reason.message, "ERR wrong number of arguments for 'incr' command", 'pipelined INCR without a key');
    same(settled[3], { status: 'fulfilled', value: 2 }, 'pipelined INCR after the errors');

    const deep = await Promise.all(Array.from({ length: 1000 }, (_, i) => c.incr(run.key(`deep${i % 10}`))));
    same(deep, Array.from({ length: 1000 }, (_, i) => Math.floor(i / 10) + 1), '1000 pipelined INCRs over 10 counters');
  },

  async info(run, c) {
    await c.incr(run.key('i'));
    checkInfoText(await c.info(), run, 'INFO');
    checkInfoText(await c.info('server'), run, 'INFO server');
    const clients = parseInfo(await c.info('clients'));
    check(Number(clients.connected_clients) >= 1, `connected_clients ${show(clients.connected_clients)}`);
    same(parseInfo(await c.info('cluster')).cluster_enabled, '0', 'cluster_enabled');
    const db0 = parseInfo(await c.info('keyspace')).db0 || '';
    check(/^keys=[1-9]\d*(,|$)/.test(db0), `db0 ${show(db0)}`);
    same(await c.info('nosuchsection'), '', 'INFO of an unknown section');
    // Text for a person: a verbatim string ("=...txt:") in RESP3, as Redis 7 sends it.
    const verbatim = c.withTypeMapping({ [RESP_TYPES.VERBATIM_STRING]: VerbatimString });
    for (const args of [['INFO', 'server'], ['CLIENT', 'INFO']]) {
      const reply = await verbatim.sendCommand(args);
      if (run.proto === 3) check(reply instanceof VerbatimString && reply.format === 'txt', `${args.join(' ')} is not a verbatim txt string in RESP3`);
      else check(typeof reply === 'string', `${args.join(' ')} is not a bulk string in RESP2`);
    }
  },

  async config(run, c) {
    const one = await c.configGet('maxclients');
    same(Object.keys(one), ['maxclients'], 'CONFIG GET maxclients');
    check(/^\d+$/.test(one.maxclients), `maxclients ${show(one.maxclients)}`);
    same(Object.keys(await c.configGet(['maxclients', 'timeout'])).sort(), ['maxclients', 'timeout'], 'CONFIG GET of two names');
    check('maxclients' in (await c.configGet('max*')), 'CONFIG GET max* has maxclients');
    same(await c.configGet('nosuch-parameter'), {}, 'CONFIG GET of an unknown name');
    const raw = await c.withTypeMapping({ [RESP_TYPES.MAP]: Map }).sendCommand(['CONFIG', 'GET', 'maxclients']);
    if (run.proto === 3) check(raw instanceof Map, `CONFIG GET is not a RESP3 map: ${show(raw)}`);
    else check(Array.isArray(raw), `CONFIG GET is not an array in RESP2: ${show(raw)}`);
    if (run.server === 'tally') {
      same({ ...(await c.configGet(['databases', 'appendonly', 'save', 'timeout'])) },
        { databases: '1', appendonly: 'yes', save: '', timeout: '0' }, "tally's CONFIG GET answers");
    }
  },

  async connection(run, c) {
    same(await c.ping(), 'PONG', 'PING');
    same(await c.ping('hi'), 'hi', 'PING hi');
    same(await c.echo('hello'), 'hello', 'ECHO');
    same(await c.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }).echo(Buffer.from([0, 255, 13, 10])),
      Buffer.from([0, 255, 13, 10]), 'ECHO of binary bytes');
    same(await c.sendCommand(['SELECT', '0']), 'OK', 'SELECT 0');
    if (run.server === 'tally') await expectError(c.sendCommand(['SELECT', '1']), 'ERR DB index is out of range', 'SELECT 1 on tally');
    const id = await c.clientId();
    same(await c.clientGetName(), null, 'CLIENT GETNAME before a name');
    same(await c.clientSetName('compat-nr'), 'OK', 'CLIENT SETNAME');
    same(await c.clientGetName(), 'compat-nr', 'CLIENT GETNAME');
    const info = await c.clientInfo();
    same([info.id, info.name, info.resp], [id, 'compat-nr', run.proto], 'clientInfo() id, name, resp');
    // node-redis sends CLIENT SETINFO on connect; Redis has it from 7.2 only.
    if (run.server === 'tally') same(info.libName, 'node-redis', 'CLIENT INFO lib-name');
    await expectError(c.clientSetName('a b'), 'ERR Client names cannot contain spaces, newlines or special characters.', 'CLIENT SETNAME with a space');
    same(await c.clientSetName(''), 'OK', "CLIENT SETNAME ''");
    same(await c.clientGetName(), null, 'an empty name removes the name');
    same(await c.sendCommand(['AUTH', 'default', 'anything']), 'OK', 'AUTH default <pw>');
    same(await c.clientId(), id, 'same connection throughout');

    // RESET: no name, back to RESP2. Only replies that read the same in both
    // protocols follow it.
    const x = await nrClient(run);
    try {
      await x.clientSetName('compat-reset');
      same(await x.sendCommand(['RESET']), 'RESET', 'RESET');
      const after = parseClientInfo(await x.sendCommand(['CLIENT', 'INFO']));
      same([after.name, after.resp], ['', '2'], 'no name and RESP2 after RESET');
      same(await x.ping(), 'PONG', 'PING after RESET');
    } finally {
      await nrClose(x);
    }
    const q = await nrClient(run);
    try {
      same(await q.sendCommand(['QUIT']), 'OK', 'QUIT');
    } finally {
      await nrClose(q);
    }
  },

  async command(run, c) {
    const count = await c.commandCount();
    check(Number.isInteger(count) && count >= 15, `COMMAND COUNT ${show(count)}`);
    const [incr, none] = await c.commandInfo(['incr', 'nosuchcmd']);
    same([incr.name, incr.arity, incr.firstKeyIndex, incr.lastKeyIndex, incr.step], ['incr', 2, 1, 1, 1], 'commandInfo incr');
    same(none, null, 'COMMAND INFO of an unknown command');
    // Redis 7 sends the flags and categories as sets in RESP3, arrays in RESP2.
    const [raw] = await c.withTypeMapping({ [RESP_TYPES.SET]: Set }).sendCommand(['COMMAND', 'INFO', 'incr']);
    for (const [i, what, want] of [[2, 'flags', 'write'], [6, 'categories', '@write']]) {
      if (run.proto === 3) check(raw[i] instanceof Set, `incr ${what} not a RESP3 set: ${show(raw[i])}`);
      else check(Array.isArray(raw[i]), `incr ${what} not an array: ${show(raw[i])}`);
      check([...raw[i]].includes(want), `incr ${what} ${show(raw[i])} lack ${want}`);
    }
    const list = await c.commandList();
    for (const name of ['incr', 'incrby', 'decr', 'decrby', 'get', 'mget', 'exists', 'dbsize', 'ping', 'echo', 'hello', 'client', 'info', 'config']) {
      check(list.includes(name), `COMMAND LIST has ${name}`);
    }
    if (run.server === 'tally') {
      const [tally] = await c.commandInfo(['tally.incrby']);
      same([tally.name, tally.arity], ['tally.incrby', -3], 'COMMAND INFO tally.incrby');
    }
  },

  // node-redis's own pool, at most 4 connections, used by 8 workers at once.
  async pool(run) {
    const k = run.key('pool');
    const pool = createClientPool({
      socket: { host: run.host, port: run.port, connectTimeout: TIMEOUT_MS, reconnectStrategy: false },
      ...run.options,
    }, { minimum: 1, maximum: 4, acquireTimeout: TIMEOUT_MS });
    pool.on('error', () => {});
    await pool.connect();
    try {
      const timed = pool.withCommandOptions({ timeout: TIMEOUT_MS });
      await checkParallelIncrements(() => timed.incr(k), 8, 200);
      same(await timed.get(k), '1600', 'final value');
      check(pool.totalClients <= 4, `${pool.totalClients} connections, at most 4`);
    } finally {
      await pool.close();
    }
  },

  async tally(run, c) {
    await tallyChecks(run, (...args) => c.sendCommand(['TALLY.INCRBY', ...args.map(String)]), (key) => c.get(key),
      (calls) => Promise.all(calls.map((args) => c.sendCommand(['TALLY.INCRBY', ...args.map(String)]))),
      async () => parseInfo(await c.info('cluster')).tally_cluster_enabled);
  },
};

// --------------------------------------------------------- tally's own

// TALLY.INCRBY name delta [IDEMPOTENCY key] [DURABILITY memory|local|replicated]
//   -> [value, duplicate (0 or 1)]                      (README, "RESP")
// `tally(...args)` sends one, `pipelined([[args], ...])` several at once.
async function tallyChecks(run, tally, get, pipelined, storeEnabled) {
  const k = run.key('t');
  const idem = `compat-${run.lib}-${RUN_ID}-${run.label}`;
  same(await tally(k, 5), [5, 0], 'TALLY.INCRBY 5');
  same(await tally(k, 5, 'DURABILITY', 'memory'), [10, 0], 'DURABILITY memory');
  same(await tally(k, 5, 'DURABILITY', 'local', 'IDEMPOTENCY', `${idem}-1`), [15, 0], 'IDEMPOTENCY, first');
  same(await tally(k, 5, 'DURABILITY', 'local', 'IDEMPOTENCY', `${idem}-1`), [15, 1], 'IDEMPOTENCY, retried');
  same(await tally(k, 5, 'idempotency', `${idem}-1`, 'durability', 'MEMORY'), [15, 1], 'options in any order and case');
  same(await get(k), '15', 'a retried key counted once');
  same(await tally(k, -2, 'IDEMPOTENCY', `${idem}-2`), [13, 0], 'a new key counts');
  // Guessed: a key sent twice in one pipelined round counts once and the
  // second reply says duplicate (requests of a round run in order).
  same(await pipelined([[k, 1, 'IDEMPOTENCY', `${idem}-3`], [k, 1, 'IDEMPOTENCY', `${idem}-3`]]), [[14, 0], [14, 1]], 'a key twice in one pipeline');
  await expectError(tally(k, 1, 'DURABILITY', 'disk'), "ERR durability is invalid: 'disk' is not one of memory, local, replicated", 'DURABILITY disk');
  await expectError(tally(k, 1, 'FOO', 'x'), 'ERR syntax error', 'unknown option');
  await expectError(tally(k, 1, 'IDEMPOTENCY'), 'ERR syntax error', 'option without a value');
  await expectError(tally(k, 1, 'IDEMPOTENCY', ''), 'ERR idempotency key is invalid: it is empty', 'empty idempotency key');
  await expectError(tally(k), "ERR wrong number of arguments for 'tally.incrby' command", 'TALLY.INCRBY without a delta');
  await expectError(tally('n'.repeat(257), 1), 'ERR counter name is invalid: it is 257 bytes long; the limit is 256 bytes', 'a name over 256 bytes');
  same(await get(k), '14', 'refused requests changed nothing');
  // replicated needs a store: refused, never downgraded, without one (the
  // README does not give the error's wording, so it is not checked).
  if ((await storeEnabled()) === '1') {
    same(await tally(k, 1, 'DURABILITY', 'replicated'), [15, 0], 'DURABILITY replicated');
  } else {
    let reply;
    try {
      reply = await tally(k, 1, 'DURABILITY', 'replicated');
    } catch (e) {
      if (e instanceof Failure) throw e;
    }
    check(reply === undefined, `DURABILITY replicated without a store answered ${show(reply)}`);
    same(await get(k), '14', 'a refused replicated increment is not applied');
  }
}

// ------------------------------------------------------------------ main

function packageVersion(name) {
  return JSON.parse(fs.readFileSync(path.join(__dirname, 'node_modules', name, 'package.json'), 'utf8')).version;
}

const GROUP_NAMES = ['handshake', 'counters', 'errors', 'pipeline', 'info', 'config', 'connection', 'command', 'pool', 'tally'];

async function main() {
  const { values } = parseArgs({
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string' },
      server: { type: 'string', default: 'tally' },
    },
  });
  if (!values.port || !['tally', 'redis'].includes(values.server)) {
    console.error('usage: node test_clients.js --host 127.0.0.1 --port PORT [--server tally|redis]');
    return 2;
  }
  const base = { host: values.host, port: Number(values.port), server: values.server };
  const ioVersion = packageVersion('ioredis');
  const nrVersion = packageVersion('redis');
  const ioDefault = Redis.defaultOptions.protocol;
  const runs = [
    { lib: 'ioredis', label: 'default', options: {}, proto: ioDefault, maps: false },
    { lib: 'ioredis', label: 'protocol=2', options: { protocol: 2 }, proto: 2, maps: false },
    { lib: 'ioredis', label: 'protocol=3+resp3', options: { protocol: 3, replyMapping: 'resp3' }, proto: 3, maps: true },
    { lib: 'node-redis', label: 'default', options: {}, proto: DEFAULT_RESP },
    { lib: 'node-redis', label: 'RESP=2', options: { RESP: 2 }, proto: 2 },
    { lib: 'node-redis', label: 'RESP=3', options: { RESP: 3 }, proto: 3 },
  ];
  console.log(`ioredis ${ioVersion} (default protocol ${ioDefault}), node-redis ${nrVersion} (default RESP ${DEFAULT_RESP}) ` +
    `against ${base.server} at ${base.host}:${base.port}, run ${RUN_ID}`);

  let passed = 0;
  for (const spec of runs) {
    const prefix = `compat:node:${RUN_ID}:${spec.lib}:${spec.label}:`;
    const run = { ...base, ...spec, key: (name) => prefix + name };
    const groups = spec.lib === 'ioredis' ? ioGroups : nrGroups;
    const where = `${spec.lib} ${spec.label} (RESP${spec.proto})`;
    for (const name of GROUP_NAMES) {
      if (name === 'tally' && run.server !== 'tally') continue;
      let client;
      try {
        if (spec.lib === 'ioredis') client = await ioClient(run);
        else client = (await nrClient(run)).withCommandOptions({ timeout: TIMEOUT_MS });
        await groups[name](run, client);
      } catch (e) {
        if (!(e instanceof Failure)) console.error(e);
        console.error(`FAIL ${where} [${name}]: ${e instanceof Failure ? '' : `${e.constructor.name}: `}${e.message}`);
        console.log(`${passed} passed, 1 failed`);
        return 1;
      } finally {
        if (client && spec.lib === 'ioredis') client.disconnect();
        else if (client) await nrClose(client);
      }
      passed += 1;
      console.log(`ok   ${where} ${name}`);
    }
  }
  console.log(`${passed} passed, 0 failed`);
  return 0;
}

const watchdog = setTimeout(() => {
  console.error(`FAIL: the suite ran longer than ${WATCHDOG_MS / 1000} s`);
  process.exit(2);
}, WATCHDOG_MS);

// Exits at once: a socket left open by a failed check must not keep the
// process alive. (Output to files and pipes is written synchronously.)
main().then((code) => {
  clearTimeout(watchdog);
  process.exit(code);
}, (e) => {
  console.error(e);
  process.exit(1);
});

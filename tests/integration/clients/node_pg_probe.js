// node-postgres (`pg`, with pg-copy-streams for COPY) driven by
// tests/integration/test_clients_node_jdbc.py. The connection and the
// scenario come in PGWARDEN_PROBE (JSON: host, port, user, password,
// database, ca (or null for no TLS), scenario); one JSON document goes to
// stdout. The test runs the same scenario direct and through the gateway and
// compares, or checks the governed answers. Nothing here prints a secret.
'use strict';

const fs = require('fs');
const { pipeline } = require('stream/promises');
const { Readable } = require('stream');
const { Client } = require('pg');
const copy = require('pg-copy-streams');

const cfg = JSON.parse(process.env.PGWARDEN_PROBE);

function connect() {
  return new Client({
    host: cfg.host,
    port: cfg.port,
    user: cfg.user,
    password: cfg.password,
    database: cfg.database,
    application_name: 'pgwarden-node-pg-probe',
    ssl: cfg.ca ? { ca: fs.readFileSync(cfg.ca) } : false,
  });
}

// Errors as the user sees them: severity, SQLSTATE, message.
async function attempt(fn) {
  try {
    return { ok: await fn() };
  } catch (e) {
    return { error: [e.severity || '', e.code || '', e.message] };
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function datapath(c) {
  const out = {};
  const notices = [];
  const notifications = [];
  c.on('notice', (n) => notices.push(n.message));
  c.on('notification', (n) => notifications.push([n.channel, n.payload]));

  out.types = (await c.query(
    "SELECT g, g / 4.0 AS q, 'row ' || g AS s, DATE '2024-01-01' + g AS d, ARRAY[g, NULL] AS a," +
    ' NULL::text AS n, g % 2 = 0 AS even, now() > $1::timestamptz AS later' +
    ' FROM generate_series(1, 50) g', ['2000-01-01T00:00:00Z'])).rows;
  out.params = (await c.query(
    'SELECT $1::int + 1 AS i, $2::text AS s, $3::bytea AS b, $4::numeric * 2 AS d, $5::text IS NULL AS n',
    [41, 'ünïcode \'quotes\' "double"', Buffer.from([0, 255, 1, 254]), '1.25', null])).rows;
  out.named = [];
  for (const m of [1, 2, 3, 7]) {
    const r = await c.query({
      name: 'pgw_count', text: 'SELECT count(*)::int AS c FROM generate_series(1, $1::int) g WHERE g % $2::int = 0',
      values: [100, m],
    });
    out.named.push(r.rows[0].c);
  }
  out.arrays = (await c.query({ text: 'SELECT 1 AS a, 2 AS a', rowMode: 'array' })).rows;

  out.errors = [];
  for (const bad of ['SELECT 1/0', 'SELECT * FROM no_such_table_pgwarden', 'SELEC 1', "SELECT 'x'::int"]) {
    out.errors.push((await attempt(() => c.query(bad))).error);
    out.errors.push((await c.query("SELECT 'still usable' AS s")).rows);
  }
  out.errors.push((await attempt(() => c.query('SELECT $1::int AS v', ['not a number']))).error);

  await c.query('BEGIN');
  await c.query('CREATE TEMP TABLE pgw_node (v int)');
  out.tx = [(await attempt(() => c.query('INSERT INTO pgw_node VALUES ($1)', ['NaN-int']))).error,
    (await attempt(() => c.query('SELECT 1'))).error];
  await c.query('ROLLBACK');
  out.tx.push((await c.query("SELECT 'after rollback' AS s")).rows);

  await c.query('CREATE TEMP TABLE pgw_node_copy (id int, v text)');
  const lines = [];
  for (let i = 0; i < 3000; i++) lines.push(`${i},v${i}\n`);
  await pipeline(Readable.from(lines), c.query(copy.from('COPY pgw_node_copy FROM STDIN WITH (FORMAT csv)')));
  const chunks = [];
  const reader = c.query(copy.to('COPY (SELECT * FROM pgw_node_copy ORDER BY id) TO STDOUT WITH (FORMAT csv)'));
  for await (const chunk of reader) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString();
  out.copy = { bytes: text.length, lines: text.split('\n').length - 1, head: text.slice(0, 20) };

  await c.query("DO $$ BEGIN RAISE NOTICE 'node notice'; END $$");
  await c.query('LISTEN pgw_node');
  await c.query("NOTIFY pgw_node, 'self'");
  await sleep(100);
  out.notices = notices;
  out.notifications = notifications;

  const payments = await c.query('SELECT id, cardholder, amount, merchant FROM payments ORDER BY id');
  out.payments = { count: payments.rowCount, first: payments.rows.slice(0, 3) };
  return out;
}

async function governed(c) {
  const out = {};
  out.rows = (await c.query(
    'SELECT id, card_number, cardholder, amount FROM payments WHERE id <= $1 ORDER BY id', [21])).rows;
  const derived = {
    name: 'pgw_derived', text: 'SELECT id, card_number::bigint AS n, card_number::numeric AS m,' +
      ' reverse(card_number) AS r FROM payments WHERE id = $1',
  };
  out.derived = [];
  for (const id of [2, 3, 4]) out.derived.push((await c.query({ ...derived, values: [id] })).rows[0]);
  out.array_mode = (await c.query({
    text: 'SELECT id, card_number FROM payments WHERE id = $1', values: [1], rowMode: 'array',
  })).rows;
  out.json = (await c.query(
    'SELECT json_agg(card_number) AS j, string_agg(card_number, \',\') AS s FROM payments WHERE id <= 7')).rows;
  out.delete = (await attempt(() => c.query('DELETE FROM payments WHERE id = $1', [1]))).error;
  out.read_file = (await attempt(() => c.query('SELECT pg_read_file($1)', ['/etc/passwd']))).error;
  out.after = (await c.query('SELECT count(*)::int AS n FROM payments WHERE id <= 21')).rows[0].n;
  return out;
}

async function main() {
  const c = connect();
  await c.connect();
  const out = cfg.scenario === 'governed' ? await governed(c) : await datapath(c);
  await c.end();
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  process.stderr.write(`probe failed: ${e.code || ''} ${e.message}\n`);
  process.exit(1);
});

// postgres.js (`postgres`) driven by tests/integration/test_clients_node_jdbc.py.
// Unlike node-postgres it pipelines: concurrent queries on one connection go
// out back to back, each as Parse/Bind/Describe/Execute/Sync of a named
// prepared statement, before the first answer is read. Same contract as
// node_pg_probe.js: PGWARDEN_PROBE in, one JSON document out.
// COPY is left to the other probes: postgres.js 3.4.9's `.readable()` COPY
// left the next query hanging in about half the runs, straight against
// PostgreSQL too (a client issue, not the gateway's).
'use strict';

const fs = require('fs');
const postgres = require('postgres');

const cfg = JSON.parse(process.env.PGWARDEN_PROBE);

const sql = postgres({
  host: cfg.host,
  port: cfg.port,
  user: cfg.user,
  password: cfg.password,
  database: cfg.database,
  ssl: cfg.ca ? { ca: fs.readFileSync(cfg.ca) } : false,
  connection: { application_name: 'pgwarden-postgresjs-probe' },
  max: 1,
  idle_timeout: 5,
  onnotice: () => {},
});

// What a settled query showed: its rows, or severity, SQLSTATE and message.
function settled(results) {
  return results.map((r) => (r.status === 'fulfilled'
    ? { rows: [...r.value] }
    : { error: [r.reason.severity || '', r.reason.code || '', r.reason.message] }));
}

async function datapath() {
  const out = {};
  out.pipeline = settled(await Promise.allSettled([
    sql`SELECT ${41}::int + 1 AS i`,
    sql`SELECT g, 'row ' || g AS s, ARRAY[g, NULL] AS a FROM generate_series(1, ${20}::int) g`,
    sql`SELECT 1 / ${0}::int AS boom`,
    sql`SELECT ${'ünïcode'}::text AS u, ${null}::text IS NULL AS n`,
    sql`SELECT count(*)::int AS c FROM payments`,
  ]));
  out.transaction = await sql.begin(async (tx) => {
    await tx`CREATE TEMP TABLE pgw_pjs (id int, v text) ON COMMIT DROP`;
    await tx`INSERT INTO pgw_pjs ${tx([{ id: 1, v: 'a' }, { id: 2, v: 'b' }, { id: 3, v: 'c' }])}`;
    return [...await tx`SELECT id, v FROM pgw_pjs ORDER BY id`];
  });
  let seen = 0;
  let sum = 0;
  await sql`SELECT g FROM generate_series(1, 1000) g`.cursor(100, (rows) => {
    seen += rows.length;
    for (const r of rows) sum += r.g;
  });
  out.cursor = [seen, sum];
  out.multi = (await sql.unsafe("SELECT 1 AS one; SELECT 'two' AS two")).map((r) => [...r]);
  out.after = [...await sql`SELECT 'usable' AS s`];
  return out;
}

async function governed() {
  const out = {};
  out.rows = [...await sql`SELECT id, card_number, amount FROM payments WHERE id <= ${21} ORDER BY id`];
  // A pipelined batch with a refused statement in the middle: each query is
  // its own Sync cycle, so the ones around it must still be answered.
  out.pipeline = settled(await Promise.allSettled([
    sql`SELECT card_number FROM payments WHERE id = ${1}`,
    sql`DELETE FROM payments WHERE id = ${1}`,
    sql`SELECT card_number::bigint AS n FROM payments WHERE id = ${2}`,
  ]));
  // One simple Query holding a refused statement: none of it runs.
  out.multi = settled(await Promise.allSettled([
    sql.unsafe('SELECT card_number FROM payments WHERE id = 1; DELETE FROM payments WHERE id = 1'),
  ]));
  out.after = [...await sql`SELECT count(*)::int AS n FROM payments WHERE id <= 21`][0].n;
  return out;
}

async function main() {
  const out = cfg.scenario === 'governed' ? await governed() : await datapath();
  await sql.end({ timeout: 5 });
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  process.stderr.write(`probe failed: ${e.code || ''} ${e.message}\n`);
  process.exit(1);
});

-- Plain statements, errors that must leave the session usable, notices,
-- several statements in one Query message, and a failed transaction block.
\set VERBOSITY verbose
SELECT 1 AS one, 'two'::text AS two, NULL::int AS nothing;
SELECT id, cardholder, amount, merchant FROM payments ORDER BY id;
SELECT count(*) AS customers FROM customers;
SELECT g, g * 2 AS double, repeat('ab', g) AS s FROM generate_series(1, 5) g;
SELECT 'quote''s "and" back\slash' AS tricky, E'tab\there' AS tab, 'äöü €' AS utf8;
SELECT '2024-02-29 13:14:15.123456+00'::timestamptz AS ts, 12345.6789::numeric(10,4) AS num,
       ARRAY[1,2,3] AS arr, '{"a": [1, null]}'::jsonb AS doc, '\xdeadbeef'::bytea AS raw;

-- an error, then a good statement on the same connection
SELECT 1 / 0;
SELECT 'after division by zero' AS still_usable;
SELECT * FROM no_such_table_pgwarden;
SELECT 'after undefined table' AS still_usable;
SELEC typo;
SELECT 'after syntax error' AS still_usable;

-- notices and warnings raised by the server
DO $$ BEGIN RAISE NOTICE 'notice number %', 42; END $$;
DO $$ BEGIN RAISE WARNING 'a warning with detail' USING DETAIL = 'some detail', HINT = 'a hint'; END $$;
SET client_min_messages = debug1;
DO $$ BEGIN RAISE DEBUG 'debug message'; END $$;
RESET client_min_messages;

-- several statements in one Query message (psql sends \; joined statements together)
SELECT 1 AS a \; SELECT 2 AS b \; SELECT 3 AS c;
SELECT 'first' AS x \; SELECT 1 / 0 \; SELECT 'never runs' AS y;
SELECT 'after multi-statement error' AS still_usable;
CREATE TEMP TABLE multi (v int) \; INSERT INTO multi VALUES (1), (2) \; SELECT sum(v) FROM multi;

-- a transaction block with an error inside, then ROLLBACK
CREATE TEMP TABLE tx_probe (v int);
BEGIN;
INSERT INTO tx_probe VALUES (1);
SELECT 1 / 0;
INSERT INTO tx_probe VALUES (2);
ROLLBACK;
SELECT count(*) AS rows_after_rollback FROM tx_probe;
BEGIN;
INSERT INTO tx_probe VALUES (3);
SAVEPOINT sp;
SELECT * FROM no_such_table_pgwarden;
ROLLBACK TO SAVEPOINT sp;
INSERT INTO tx_probe VALUES (4);
COMMIT;
SELECT v FROM tx_probe ORDER BY v;

-- \gset and \gdesc use the result and its description
SELECT 40 + 2 AS answer \gset
\echo answer is :answer
SELECT 1::int AS i, 'x'::text AS t, now() AS ts \gdesc
SELECT 'end of script' AS done;

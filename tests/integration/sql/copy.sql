-- COPY in both directions through psql: \copy to/from files (in the working
-- directory the test chooses), COPY ... TO STDOUT, and COPY FROM inline data.
CREATE TEMP TABLE copy_target (id int PRIMARY KEY, label text, amount numeric(12,2), note text);

\copy (SELECT id, cardholder, amount, merchant FROM payments ORDER BY id) TO 'payments.csv' WITH (FORMAT csv, HEADER)
\copy (SELECT g, md5(g::text), g / 7.0, CASE WHEN g % 3 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(1, 20000) g) TO 'series.csv' WITH (FORMAT csv)
\copy copy_target FROM 'series.csv' WITH (FORMAT csv)
SELECT count(*) AS n, sum(id) AS id_sum, count(note) AS notes, md5(string_agg(label, ',' ORDER BY id)) AS digest FROM copy_target;

\copy (SELECT id, label FROM copy_target WHERE id <= 5 ORDER BY id) TO STDOUT
COPY (SELECT id, amount FROM copy_target WHERE id BETWEEN 6 AND 9 ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER);

TRUNCATE copy_target;
\copy copy_target (id, label) FROM STDIN
1	alpha
2	beta with spaces
3	\N
\.
COPY copy_target (id, label, note) FROM STDIN WITH (FORMAT csv);
10,"quoted, with comma",x
11,plain,"multi
line"
\.
SELECT id, label, note FROM copy_target ORDER BY id;

-- a COPY that fails part way: the rows are rejected, the session stays usable
\copy copy_target (id, label) FROM STDIN
20	twenty
not_a_number	bad
\.
SELECT count(*) AS after_failed_copy FROM copy_target;
-- binary COPY round trip
\copy (SELECT id, label FROM copy_target ORDER BY id) TO 'binary.dat' WITH (FORMAT binary)
CREATE TEMP TABLE copy_binary (id int, label text);
\copy copy_binary FROM 'binary.dat' WITH (FORMAT binary)
SELECT id, label FROM copy_binary ORDER BY id;
SELECT 'end of script' AS done;

-- Large objects: psql's \lo_* commands call libpq's lo_* functions, which use
-- the FunctionCall protocol message ('F') rather than a Query. The input file
-- is written by the test into the working directory.
\lo_import 'blob.in'
\set blob :LASTOID
SELECT :blob > 0 AS imported;
\lo_export :blob 'blob.out'
SELECT length(lo_get(:blob)) AS size, md5(lo_get(:blob)) AS digest;
\lo_unlink :blob
SELECT count(*) AS left_over FROM pg_largeobject_metadata WHERE oid = :blob;
SELECT 'end of script' AS done;

-- LISTEN/NOTIFY. The test sends a NOTIFY from a second, direct connection
-- while this session waits in the DO block below (it waits for the flag row the
-- test commits together with the NOTIFY), so the notification arrives while a
-- query is running and psql prints it after that query.
LISTEN pgwarden_chan;
LISTEN "Mixed Case Chan";
SELECT 'listening' AS state;
DO $$
BEGIN
  WHILE NOT EXISTS (SELECT 1 FROM pgwarden_notify_flag) LOOP
    PERFORM pg_sleep(0.02);
  END LOOP;
END $$;
SELECT 'after external notify' AS state;
NOTIFY pgwarden_chan, 'from the same session';
SELECT pg_notify('Mixed Case Chan', 'payload with ''quotes'' and äöü');
UNLISTEN pgwarden_chan;
NOTIFY pgwarden_chan, 'not delivered: unlistened';
SELECT 'end of script' AS done;

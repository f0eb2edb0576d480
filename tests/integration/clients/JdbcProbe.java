// pgjdbc driven by tests/integration/test_clients_node_jdbc.py, run as a
// single source file (`java -cp postgresql.jar JdbcProbe.java`). pgjdbc is
// the client most unlike libpq: after prepareThreshold (5) executions a
// statement becomes a named server-side statement and int/bigint/numeric
// columns arrive in binary; setFetchSize inside a transaction reads through
// a portal with Execute row limits (PortalSuspended); batches are pipelined
// Bind/Execute pairs before one Sync. Same contract as the Node probes:
// PGWARDEN_PROBE in (JSON, read with a tiny parser below), one JSON
// document out. Values are printed as the strings the driver returns.

import java.io.ByteArrayOutputStream;
import java.io.StringReader;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class JdbcProbe {
    // ---- minimal JSON (flat object of strings, numbers, null) -------------------
    static Map<String, String> parseFlat(String s) {
        Map<String, String> m = new HashMap<>();
        int i = s.indexOf('{') + 1;
        while (true) {
            int k0 = s.indexOf('"', i);
            if (k0 < 0) break;
            int k1 = s.indexOf('"', k0 + 1);
            String key = s.substring(k0 + 1, k1);
            int c = s.indexOf(':', k1) + 1;
            while (Character.isWhitespace(s.charAt(c))) c++;
            if (s.charAt(c) == '"') {
                StringBuilder v = new StringBuilder();
                int j = c + 1;
                while (s.charAt(j) != '"') {
                    if (s.charAt(j) == '\\') { j++; char e = s.charAt(j); v.append(e == 'n' ? '\n' : e); }
                    else v.append(s.charAt(j));
                    j++;
                }
                m.put(key, v.toString());
                i = j + 1;
            } else {
                int j = c;
                while (j < s.length() && ",}".indexOf(s.charAt(j)) < 0) j++;
                String raw = s.substring(c, j).trim();
                m.put(key, raw.equals("null") ? null : raw);
                i = j;
            }
        }
        return m;
    }

    static String q(Object o) {
        if (o == null) return "null";
        if (o instanceof List<?> l) {
            StringJoiner j = new StringJoiner(",", "[", "]");
            for (Object x : l) j.add(q(x));
            return j.toString();
        }
        if (o instanceof Map<?, ?> m) {
            StringJoiner j = new StringJoiner(",", "{", "}");
            for (Map.Entry<?, ?> e : m.entrySet()) j.add(q(e.getKey().toString()) + ":" + q(e.getValue()));
            return j.toString();
        }
        if (o instanceof Number || o instanceof Boolean) return o.toString();
        StringBuilder b = new StringBuilder("\"");
        for (char ch : o.toString().toCharArray()) {
            if (ch == '"' || ch == '\\') b.append('\\').append(ch);
            else if (ch < 0x20) b.append(String.format("\\u%04x", (int) ch));
            else b.append(ch);
        }
        return b.append('"').toString();
    }

    static List<Object> rows(ResultSet rs) throws SQLException {
        List<Object> out = new ArrayList<>();
        int n = rs.getMetaData().getColumnCount();
        while (rs.next()) {
            List<Object> row = new ArrayList<>();
            for (int i = 1; i <= n; i++) {
                // bytea read in binary: getString would print the array's identity
                Object v = rs.getObject(i);
                row.add(v instanceof byte[] b ? HexFormat.of().formatHex(b) : rs.getString(i));
            }
            out.add(row);
        }
        return out;
    }

    static List<Object> error(SQLException e) {
        // pgjdbc puts the server's message first; detail and hint follow on
        // their own lines.
        String first = e.getMessage() == null ? "" : e.getMessage().split("\n", 2)[0];
        return List.of(e.getSQLState() == null ? "" : e.getSQLState(), first);
    }

    // ---- scenarios ------------------------------------------------------------------
    static Map<String, Object> datapath(Connection c) throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        List<Object> prepared = new ArrayList<>();
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT ?::int + 1 AS i, ?::bigint * 3 AS b, ?::numeric * 2 AS d, ?::text AS s,"
                + " ?::bytea AS raw, ?::timestamptz AS ts, g FROM generate_series(1, 3) g")) {
            for (int i = 0; i < 8; i++) {  // past prepareThreshold: named statement, binary results
                ps.setInt(1, i);
                ps.setLong(2, 3000000000L + i);
                ps.setBigDecimal(3, new java.math.BigDecimal("1.25"));
                ps.setString(4, "ünïcode 'quotes' \"double\" " + i);
                ps.setBytes(5, new byte[] {0, (byte) 255, (byte) i});
                ps.setTimestamp(6, Timestamp.valueOf("2024-06-01 12:00:00"));
                try (ResultSet rs = ps.executeQuery()) { prepared.add(rows(rs)); }
            }
        }
        out.put("prepared", prepared);
        try (Statement st = c.createStatement();
             ResultSet rs = st.executeQuery("SELECT g, g / 4.0, DATE '2024-01-01' + g, ARRAY[g, NULL], g % 2 = 0,"
                     + " NULL::text FROM generate_series(1, 30) g")) {
            out.put("types", rows(rs));
        }

        c.setAutoCommit(false);
        try (Statement st = c.createStatement()) {
            st.setFetchSize(100);  // a portal read 100 rows at a time
            long seen = 0, sum = 0;
            try (ResultSet rs = st.executeQuery("SELECT g FROM generate_series(1, 1000) g")) {
                while (rs.next()) { seen++; sum += rs.getLong(1); }
            }
            out.put("cursor", List.of(seen, sum));
            st.execute("CREATE TEMP TABLE pgw_jdbc (id int, v text)");
        }
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO pgw_jdbc VALUES (?, ?)")) {
            for (int i = 0; i < 500; i++) { ps.setInt(1, i); ps.setString(2, "v" + i); ps.addBatch(); }
            int total = 0;
            for (int n : ps.executeBatch()) total += n;
            out.put("batch", total);
        }
        c.commit();

        CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
        StringBuilder csv = new StringBuilder();
        for (int i = 0; i < 3000; i++) csv.append(i).append(",c").append(i).append('\n');
        try (Statement st = c.createStatement()) { st.execute("TRUNCATE pgw_jdbc"); }
        long copiedIn = copy.copyIn("COPY pgw_jdbc FROM STDIN WITH (FORMAT csv)", new StringReader(csv.toString()));
        ByteArrayOutputStream sink = new ByteArrayOutputStream();
        long copiedOut = copy.copyOut("COPY (SELECT * FROM pgw_jdbc ORDER BY id) TO STDOUT WITH (FORMAT csv)", sink);
        String text = sink.toString(StandardCharsets.UTF_8);
        out.put("copy", List.of(copiedIn, copiedOut, text.length(), text.substring(0, 20)));
        c.commit();

        List<Object> errors = new ArrayList<>();
        for (String bad : new String[] {"SELECT 1/0", "SELECT * FROM no_such_table_pgwarden", "SELEC 1"}) {
            try (Statement st = c.createStatement()) { st.executeQuery(bad); errors.add("ran"); }
            catch (SQLException e) { errors.add(error(e)); }
            c.rollback();
            try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SELECT 'usable'")) { errors.add(rows(rs)); }
        }
        try (Statement st = c.createStatement()) {
            st.executeQuery("SELECT 1/0");
        } catch (SQLException e) { errors.add(error(e)); }
        try (Statement st = c.createStatement()) {  // the transaction is aborted now
            st.executeQuery("SELECT 1");
        } catch (SQLException e) { errors.add(error(e)); }
        c.rollback();
        out.put("errors", errors);
        c.setAutoCommit(true);

        try (Statement st = c.createStatement()) {
            st.execute("DO $$ BEGIN RAISE NOTICE 'jdbc notice'; END $$");
            SQLWarning w = st.getWarnings();
            out.put("notice", w == null ? null : w.getMessage());
            st.execute("LISTEN pgw_jdbc");
            st.execute("NOTIFY pgw_jdbc, 'self'");
        }
        List<Object> notes = new ArrayList<>();
        PGNotification[] got = c.unwrap(PGConnection.class).getNotifications(2000);
        if (got != null) for (PGNotification n : got) notes.add(List.of(n.getName(), n.getParameter()));
        out.put("notifications", notes);

        List<Object> columns = new ArrayList<>();
        try (ResultSet rs = c.getMetaData().getColumns(null, "public", "payments", null)) {
            while (rs.next()) columns.add(List.of(rs.getString("COLUMN_NAME"), rs.getString("TYPE_NAME")));
        }
        out.put("metadata", columns);
        try (Statement st = c.createStatement();
             ResultSet rs = st.executeQuery("SELECT id, cardholder, amount, merchant FROM payments ORDER BY id LIMIT 3")) {
            out.put("payments", rows(rs));
        }
        return out;
    }

    static Map<String, Object> governed(Connection c) throws Exception {
        Map<String, Object> out = new LinkedHashMap<>();
        List<Object> prepared = new ArrayList<>();
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT id, card_number, card_number::bigint AS n, amount FROM payments WHERE id = ?")) {
            for (long id = 1; id <= 8; id++) {  // ids 6..8 run as a named statement, binary results
                ps.setLong(1, id);
                try (ResultSet rs = ps.executeQuery()) { prepared.add(rows(rs)); }
            }
        }
        out.put("prepared", prepared);
        c.setAutoCommit(false);
        try (Statement st = c.createStatement()) {
            st.setFetchSize(4);
            try (ResultSet rs = st.executeQuery("SELECT id, card_number FROM payments WHERE id <= 21 ORDER BY id")) {
                out.put("cursor", rows(rs));
            }
        }
        try (Statement st = c.createStatement()) {
            st.executeUpdate("DELETE FROM payments WHERE id = 1");
            out.put("delete", "ran");
        } catch (SQLException e) { out.put("delete", error(e)); }
        try (Statement st = c.createStatement()) {  // refused inside a transaction: it is aborted
            st.executeQuery("SELECT 1");
            out.put("in_failed_tx", "ran");
        } catch (SQLException e) { out.put("in_failed_tx", error(e)); }
        c.rollback();
        c.setAutoCommit(true);
        try (PreparedStatement ps = c.prepareStatement("SELECT pg_read_file(?)")) {
            ps.setString(1, "/etc/passwd");
            ps.executeQuery();
            out.put("read_file", "ran");
        } catch (SQLException e) { out.put("read_file", error(e)); }
        try (Statement st = c.createStatement();
             ResultSet rs = st.executeQuery("SELECT count(*) FROM payments WHERE id <= 21")) {
            rs.next();
            out.put("after", rs.getLong(1));
        }
        return out;
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> cfg = parseFlat(System.getenv("PGWARDEN_PROBE"));
        String url = "jdbc:postgresql://" + cfg.get("host") + ":" + cfg.get("port") + "/" + cfg.get("database")
                + "?ApplicationName=pgwarden-jdbc-probe&connectTimeout=20&socketTimeout=60"
                + (cfg.get("ca") == null ? "&sslmode=disable"
                   : "&sslmode=verify-full&sslrootcert=" + cfg.get("ca"));
        Properties props = new Properties();
        props.setProperty("user", cfg.get("user"));
        props.setProperty("password", cfg.get("password"));
        try (Connection c = DriverManager.getConnection(url, props)) {
            Map<String, Object> out = "governed".equals(cfg.get("scenario")) ? governed(c) : datapath(c);
            System.out.print(q(out));
        }
    }
}

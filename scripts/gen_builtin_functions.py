"""Write rego/pgwarden_data/builtin_functions.json: the names of PostgreSQL's
built-in functions (schema pg_catalog), for the pack's function rules.

The analysis sees a function's name, not the catalog: an unqualified call
resolves through pg_catalog first, so without this list a user function
(`public.wrap_anything()`, called as `wrap_anything()`) would pass as a
built-in. Regenerate on a server of the PostgreSQL major version in use:

    .venv/bin/python scripts/gen_builtin_functions.py "$PGWARDEN_UPSTREAM_DSN"

A built-in a newer major version adds is then refused until it is listed
(fail closed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psycopg

OUT = Path(__file__).resolve().parent.parent / "rego" / "pgwarden_data" / "builtin_functions.json"


def main(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        names = [r[0] for r in conn.execute(
            "SELECT DISTINCT lower(proname) FROM pg_proc "
            "WHERE pronamespace = 'pg_catalog'::regnamespace ORDER BY 1")]
    assert version is not None
    doc = {"builtin_functions": {
        "postgresql_version_num": int(version[0]) // 10000 * 10000,
        "names": dict.fromkeys(names, True),
    }}
    OUT.write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")
    print(f"{len(names)} names from PostgreSQL {version[0]} -> {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else ""))

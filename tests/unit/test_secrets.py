"""Gateway-held upstream credentials: loaded from a private file or the
environment, refused when exposed, never shown."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from policyd.secrets import (
    Method,
    Secret,
    SecretsError,
    UnknownRole,
    env_role_name,
    load_secrets,
)

PASSWORD = "s3cr3t-Upstream-pw"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def secrets_file(tmp_path: Path) -> Path:
    key = write(tmp_path / "reporting.key", "-----BEGIN PRIVATE KEY-----\n")
    cert = write(tmp_path / "reporting.crt", "-----BEGIN CERTIFICATE-----\n", 0o644)
    return write(
        tmp_path / "secrets.yaml",
        f"""
roles:
  app_reader:
    method: scram-sha-256
    password: "{PASSWORD}"
  legacy:
    method: md5
    password: "{PASSWORD}"
  local_trust:
    method: trust
  reporting:
    method: cert
    cert_file: {cert.name}
    key_file: {key}
""",
    )


def test_file_loads_every_method(secrets_file: Path) -> None:
    store = load_secrets(secrets_file, environ={})
    reader = store.for_role("app_reader")
    assert reader.method is Method.SCRAM_SHA_256
    assert reader.password is not None and reader.password.reveal() == PASSWORD
    assert store.for_role("legacy").method is Method.MD5
    trust = store.for_role("local_trust")
    assert trust.method is Method.TRUST and trust.password is None
    cert = store.for_role("reporting")
    assert cert.method is Method.CERT
    assert cert.cert_file == secrets_file.parent / "reporting.crt"  # relative to the file
    assert set(store.roles()) == {"app_reader", "legacy", "local_trust", "reporting"}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_group_or_other_access_refused(secrets_file: Path, mode: int) -> None:
    secrets_file.chmod(mode)
    with pytest.raises(SecretsError) as info:
        load_secrets(secrets_file, environ={})
    message = str(info.value)
    assert f"chmod 600 {secrets_file}" in message
    assert f"{mode:04o}" in message
    assert PASSWORD not in message


def test_owner_only_modes_accepted(secrets_file: Path) -> None:
    secrets_file.chmod(0o400)
    assert "app_reader" in load_secrets(secrets_file, environ={})


def test_insecure_client_key_refused(secrets_file: Path, tmp_path: Path) -> None:
    (tmp_path / "reporting.key").chmod(0o644)
    with pytest.raises(SecretsError, match="chmod 600"):
        load_secrets(secrets_file, environ={})


def test_reprs_and_logs_never_show_the_password(
    secrets_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = load_secrets(secrets_file, environ={})
    cred = store.for_role("app_reader")
    logging.getLogger("test").warning("credential %s %r %s", cred, cred, store)
    for text in (repr(cred), str(cred), repr(store), f"{cred.password}", caplog.text):
        assert PASSWORD not in text
    assert "***" in repr(cred)
    with pytest.raises(TypeError):
        pickle.dumps(cred.password)


def test_environment_only(tmp_path: Path) -> None:
    env = {
        "PGWARDEN_SECRET_APP_WRITER_PASSWORD": PASSWORD,
        "PGWARDEN_SECRET_APP_WRITER_METHOD": "md5",
        "PGWARDEN_SECRET_ETL_PASSWORD": PASSWORD,
        "UNRELATED": "x",
    }
    store = load_secrets(None, environ=env)
    writer = store.for_role("app-writer")  # role spelled as PostgreSQL knows it
    assert writer.role == "app-writer"
    assert writer.method is Method.MD5
    assert writer.password == Secret(PASSWORD)
    etl = store.for_role("etl")
    assert etl.method is Method.SCRAM_SHA_256  # a password alone means SCRAM
    assert etl.source == "env"


def test_environment_overrides_file_field_by_field(secrets_file: Path) -> None:
    env = {"PGWARDEN_SECRET_APP_READER_PASSWORD": "rotated-pw"}
    cred = load_secrets(secrets_file, environ=env).for_role("app_reader")
    assert cred.password is not None and cred.password.reveal() == "rotated-pw"
    assert cred.method is Method.SCRAM_SHA_256
    assert cred.source == "file+env"


def test_password_file(tmp_path: Path) -> None:
    pw = write(tmp_path / "pw", PASSWORD + "\n")
    store = load_secrets(None, environ={"PGWARDEN_SECRET_OPS_PASSWORD_FILE": str(pw)})
    cred = store.for_role("ops")
    assert cred.password is not None and cred.password.reveal() == PASSWORD
    pw.chmod(0o644)
    with pytest.raises(SecretsError, match="chmod 600"):
        load_secrets(None, environ={"PGWARDEN_SECRET_OPS_PASSWORD_FILE": str(pw)})


def test_unknown_role(secrets_file: Path) -> None:
    store = load_secrets(secrets_file, environ={})
    with pytest.raises(UnknownRole) as info:
        store.for_role("dba")
    assert "PGWARDEN_SECRET_DBA_PASSWORD" in str(info.value)
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("roles:\n  r:\n    method: scram-sha-256\n", "needs a password"),
        ("roles:\n  r:\n    method: kerberos\n    password: x\n", "unknown method"),
        ("roles:\n  r: {}\n", "no method"),
        ("roles:\n  r:\n    method: cert\n", "cert_file and key_file"),
        ("roles:\n  r:\n    pasword: x\n", "unknown fields"),
        ("users: {}\n", "unknown keys"),
        ("roles: [1, 2]\n", "'roles' mapping"),
        ("roles:\n  r: [1]\n", "mapping or a password string"),
    ],
)
def test_incomplete_entries_refused(tmp_path: Path, body: str, needle: str) -> None:
    path = write(tmp_path / "s.yaml", body)
    with pytest.raises(SecretsError, match=needle):
        load_secrets(path, environ={})


def test_yaml_error_does_not_echo_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", f'roles:\n  r:\n    password: "{PASSWORD}\n  - broken: [\n')
    with pytest.raises(SecretsError) as info:
        load_secrets(path, environ={})
    assert PASSWORD not in str(info.value)
    assert info.value.__cause__ is None


def test_json_file_and_missing_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "s.json", '{"roles": {"r": {"method": "password", "password": "pw"}}}'
    )
    assert load_secrets(path, environ={}).for_role("r").method is Method.PASSWORD
    with pytest.raises(SecretsError, match="does not exist"):
        load_secrets(tmp_path / "absent.yaml", environ={})


def test_env_role_name() -> None:
    assert env_role_name("app-reader.v2") == "APP_READER_V2"


def test_shorthand_forms(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", f'roles:\n  etl: "{PASSWORD}"\n')
    cred = load_secrets(path, environ={}).for_role("etl")
    assert cred.method is Method.SCRAM_SHA_256
    assert cred.password == Secret(PASSWORD)
    # The flat document the local stack writes.
    flat = write(tmp_path / "secrets.json", '{"app_reader": "pw1", "dba_role": "pw2"}')
    store = load_secrets(flat, environ={})
    assert store.roles() == ("app_reader", "dba_role")
    assert store.for_role("dba_role").password == Secret("pw2")


def test_as_login_for_the_tap(secrets_file: Path) -> None:
    store = load_secrets(secrets_file, environ={})
    login = store.for_role("app_reader").as_login()
    assert (login.role, login.method, login.password) == ("app_reader", "scram-sha-256", PASSWORD)
    assert PASSWORD not in repr(login)
    cert = store.for_role("reporting").as_login()
    assert cert.method == "cert" and cert.password is None
    assert cert.key_file == str(secrets_file.parent / "reporting.key")

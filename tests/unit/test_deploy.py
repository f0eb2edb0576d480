"""deploy/: the Kubernetes manifests and the Compose file are valid against
their schemas (kubernetes-validate and check-jsonschema's vendored
compose-spec: no cluster and no Docker engine here) and keep the invariants
operators rely on: non-root, probes, resources, NetworkPolicies whose
selectors match the pods they mean, and copies that do not drift from the
files they copy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pgwarden.config_cli import check

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
K8S_VERSION = "1.30"  # oldest Kubernetes the manifests target (native gRPC probes, preStop sleep)

GATEWAY = {"app.kubernetes.io/name": "pgwarden-gateway"}
TAP = {"app.kubernetes.io/name": "pgwarden-tap"}
# Provided by the platform, named by the NetworkPolicies.
EXTERNAL_POD_LABELS = [{"app.kubernetes.io/name": "postgresql"}]


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return data


def objects() -> list[dict[str, Any]]:
    out = []
    for name in kustomization()["resources"]:
        out.extend(d for d in yaml.safe_load_all((BASE / name).read_text()) if d)
    return out


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] == kind]


def pod_labels() -> list[dict[str, str]]:
    return [d["spec"]["template"]["metadata"]["labels"] for d in of_kind("Deployment")]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def containers(deployment: dict[str, Any], init: bool = False) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", []) if init else spec["containers"]


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("obj", objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_manifest_is_valid_kubernetes(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    deployment = json.loads(json.dumps(of_kind("Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["containerPortt"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = json.loads(json.dumps(of_kind("Deployment")[0]))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)  # type: ignore[no-any-return]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_file_is_valid() -> None:
    errors = [f"{e.json_path}: {e.message}" for e in compose_validator().iter_errors(compose())]
    assert errors == []


def test_compose_schema_catches_mistakes() -> None:
    broken = compose()
    broken["services"]["tap"]["restartt"] = "always"
    assert list(compose_validator().iter_errors(broken))


# --------------------------------------------------------------- kustomize


def test_kustomization_lists_every_manifest_and_every_file_exists() -> None:
    kz = kustomization()
    listed = set(kz["resources"])
    generated = {f for g in kz["configMapGenerator"] for f in g["files"]}
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed | generated == on_disk
    assert all((BASE / f).is_file() for f in listed | generated)


def test_referenced_config_maps_and_service_accounts_exist() -> None:
    config_maps = {g["name"] for g in kustomization()["configMapGenerator"]}
    accounts = {o["metadata"]["name"] for o in of_kind("ServiceAccount")}
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] in accounts
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps


def test_copies_do_not_drift() -> None:
    assert (BASE / "envoy.yaml").read_text() == (ROOT / "envoy" / "production.yaml").read_text()
    assert (BASE / "pgwarden.yaml").read_text() == (ROOT / "examples" / "pgwarden.yaml").read_text()
    assert check(BASE / "pgwarden.yaml", {}).ok


# -------------------------------------------------------------- invariants


@pytest.mark.parametrize("deployment", of_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_pods_run_as_non_root_and_locked_down(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in [*containers(deployment), *containers(deployment, init=True)]:
        ctx = container["securityContext"]
        assert ctx.get("runAsUser", 1) != 0
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert not str(container["image"]).endswith(":latest")


@pytest.mark.parametrize("deployment", of_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_every_container_has_probes(deployment: dict[str, Any]) -> None:
    for container in containers(deployment):
        assert "readinessProbe" in container, container["name"]
        assert "livenessProbe" in container, container["name"]
        # A probe names a port the container declares (or a literal number).
        names = {p.get("name") for p in container.get("ports", [])}
        numbers = {p["containerPort"] for p in container.get("ports", [])}
        for probe in (container["readinessProbe"], container["livenessProbe"]):
            handler = next(v for k, v in probe.items() if k in ("grpc", "httpGet", "tcpSocket"))
            port = handler["port"]
            assert port in names or port in numbers, (container["name"], port)


def test_selectors_match_their_pods() -> None:
    labels = pod_labels()
    for deployment in of_kind("Deployment"):
        assert matches(deployment["spec"]["selector"]["matchLabels"],
                       deployment["spec"]["template"]["metadata"]["labels"])
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in of_kind(kind):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(matches(selector, lab) for lab in labels), obj["metadata"]["name"]


def test_network_policy_selectors_match_the_labels_used() -> None:
    known = [*pod_labels(), *EXTERNAL_POD_LABELS]
    for policy in of_kind("NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert not selector or any(matches(selector, lab) for lab in known), \
            policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    sel = peer["podSelector"]["matchLabels"]
                    assert any(matches(sel, lab) for lab in pod_labels()), \
                        (policy["metadata"]["name"], sel)


def _ingress_sources(selector: dict[str, str], port: int) -> list[dict[str, Any]]:
    """Every peer allowed to reach pods with ``selector`` on ``port``."""
    peers: list[dict[str, Any]] = []
    for policy in of_kind("NetworkPolicy"):
        chosen = policy["spec"]["podSelector"].get("matchLabels", {})
        if not chosen or not matches(chosen, selector):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            peers.extend(rule.get("from", [{"anyone": True}]))
    return peers


def test_default_deny_then_only_envoy_reaches_the_tap() -> None:
    deny = [p for p in of_kind("NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny[0]["spec"]
    sources = _ingress_sources(TAP, 9001)
    assert sources == [{"podSelector": {"matchLabels": GATEWAY}}]


def test_only_the_data_path_reaches_postgresql() -> None:
    sources = _ingress_sources({"app.kubernetes.io/name": "postgresql"}, 5432)
    selectors = [s["podSelector"]["matchLabels"] for s in sources]
    assert all("namespaceSelector" not in s and "ipBlock" not in s for s in sources)
    assert TAP in selectors
    # Envoy only because in ext_proc mode its tcp_proxy carries the bytes the tap allowed.
    assert all(s in (TAP, GATEWAY) for s in selectors)


def test_policyd_and_maskd_are_reached_by_the_tap_only() -> None:
    for name, port in (("pgwarden-policyd", 50061), ("pgwarden-maskd", 50062)):
        sources = _ingress_sources({"app.kubernetes.io/name": name}, port)
        assert sources == [{"podSelector": {"matchLabels": TAP}}], name


def test_envoy_finds_the_taps_where_the_manifests_put_them() -> None:
    envoy = yaml.safe_load((BASE / "envoy.yaml").read_text())
    cluster = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "tap")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    address = endpoint["address"]["socket_address"]
    service = next(s for s in of_kind("Service") if s["metadata"]["name"] == address["address"])
    assert service["spec"]["clusterIP"] == "None"  # headless: Envoy sees every replica
    assert address["port_value"] in [p["port"] for p in service["spec"]["ports"]]
    assert matches(service["spec"]["selector"], TAP)


def test_pod_disruption_budgets_cover_the_data_path() -> None:
    covered = [p["spec"]["selector"]["matchLabels"] for p in of_kind("PodDisruptionBudget")]
    assert GATEWAY in covered and TAP in covered
    for deployment in of_kind("Deployment"):
        assert deployment["spec"]["replicas"] >= 2


def test_opa_is_a_sidecar_of_policyd_on_loopback() -> None:
    policyd = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "pgwarden-policyd")
    by_name = {c["name"]: c for c in containers(policyd)}
    assert set(by_name) == {"policyd", "opa"}
    assert "127.0.0.1:8181" in by_name["opa"]["args"]
    assert "http://127.0.0.1:8181" in by_name["policyd"]["args"]


# ------------------------------------------------------------------ compose


def test_compose_has_the_production_services() -> None:
    services = compose()["services"]
    assert {"envoy", "tap", "policyd", "maskd", "opa", "postgres", "audit-db"} <= set(services)
    assert services["envoy"]["image"].startswith("envoyproxy/envoy-contrib:v")
    assert services["opa"]["image"].startswith("openpolicyagent/opa:")
    for name, service in services.items():
        image = str(service.get("image", ""))
        assert image and not image.endswith(":latest") and ":" in image, name


def test_compose_runs_pgwarden_as_non_root() -> None:
    services = compose()["services"]
    for name in ("tap", "policyd", "maskd", "envoy", "opa"):
        user = str(services[name]["user"])
        assert user.split(":")[0] not in ("0", "root"), name
        assert services[name]["read_only"] is True


def test_compose_networks_keep_postgresql_on_the_data_path() -> None:
    services = compose()["services"]

    def nets(name: str) -> set[str]:
        return set(services[name].get("networks", []))

    on_pg_network = {n for n in services if nets(n) & nets("postgres")} - {"postgres"}
    assert on_pg_network == {"tap", "envoy"}
    published = {n for n, s in services.items() if s.get("ports")}
    assert published == {"envoy"}  # agents reach Envoy and nothing else
    assert "policyd:50061" in (ROOT / "examples" / "pgwarden.yaml").read_text()
    assert "tap" in services and "policyd" in services  # names the configs resolve


# --------------------------------------------------------------- Dockerfile


def test_dockerfile_is_pinned_non_root_and_runs_pgwarden() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?|python@sha256:[0-9a-f]{64}", base.group(1))
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["pgwarden"\]$', text, re.MULTILINE)
    # Every COPY source exists in the repository (the build context is the root).
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source



def test_dockerfile_compiles_the_c_module_in_the_build_stage_only() -> None:
    import tomllib

    text = (DEPLOY / "Dockerfile").read_text()
    build, runtime = re.split(r"^FROM .*$", text, flags=re.MULTILINE)[1:3]
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "ext-modules"]
    assert [m["name"] for m in modules] == ["tap._wire"]
    # pip wheel builds pgwarden's own wheel from source: it needs a compiler
    # before that step; the image that runs has none.
    assert re.search(r"apt-get install[^\n]*\bgcc\b[\s\S]*pip wheel", build)
    assert "gcc" not in runtime


# ------------------------------------------- what the tap relies on in policyd


def _policyd_needs() -> tuple[list[str], list[str]]:
    """(files policyd reads, folders it writes) when it hosts the approval
    service and the audit sink for the production configuration."""
    from urllib.parse import parse_qs, urlsplit

    from pgwarden.config import load

    cfg = load(ROOT / "examples" / "pgwarden.yaml", environ={})
    audit = cfg.tap.audit
    assert audit is not None
    # The tap depends on policyd for both (the defaults the example keeps).
    assert audit.ship_to == "policyd" and cfg.tap.approvals
    query = parse_qs(urlsplit(audit.url).query)
    reads = ["/etc/pgwarden/pgwarden.yaml", str(audit.signing_key_file),
             *query.get("passfile", []), *query.get("sslrootcert", [])]
    writes = [str(audit.spool_dir), str(Path(str(audit.checkpoint_file)).parent)]
    return reads, writes


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_policyd_in_kubernetes_hosts_what_the_taps_rely_on() -> None:
    """The taps ship their audit spool to policyd and hold statements through
    its approval service: without --config policyd serves neither, and the
    taps' spools fill until every statement is refused."""
    policyd = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "pgwarden-policyd")
    main = next(c for c in containers(policyd) if c["name"] == "policyd")
    args = main["args"]
    assert args[args.index("--config") + 1] == "/etc/pgwarden/pgwarden.yaml"
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    reads, writes = _policyd_needs()
    for path in reads:
        assert _under(path, list(mounts)), f"policyd cannot read {path}"
    for path in writes:
        writable = [p for p, m in mounts.items() if not m.get("readOnly")]
        assert _under(path, writable), f"policyd cannot write {path}"
    # It gets the audit store's secrets, not the upstream credentials or the masking key.
    volumes = {v["name"]: v for v in policyd["spec"]["template"]["spec"]["volumes"]}
    keys = {i["key"] for i in volumes["secrets-source"]["secret"]["items"]}
    assert keys == {"audit-signing.key", "audit.pgpass"}


def test_policyd_in_compose_hosts_what_the_tap_relies_on() -> None:
    service = compose()["services"]["policyd"]
    command = service["command"]
    assert command[command.index("--config") + 1] == "/etc/pgwarden/pgwarden.yaml"
    mounts = {v.split(":")[1]: v for v in service["volumes"]}
    mounts.update({s["target"]: s["target"] for s in service["secrets"]})
    reads, writes = _policyd_needs()
    for path in reads:
        assert _under(path, list(mounts)), f"policyd cannot read {path}"
    for path in writes:
        writable = [p for p, v in mounts.items() if not str(v).endswith(":ro") and ":" in str(v)]
        assert _under(path, writable), f"policyd cannot write {path}"
    assert "audit-db" in service["depends_on"]
    assert set(service["networks"]) & set(compose()["services"]["audit-db"]["networks"])


def test_compose_lets_token_checkers_reach_the_identity_provider_and_nothing_else_out() -> None:
    """The tap (agents' tokens) and policyd (approvers' tokens) fetch the
    issuer's keys from identity.jwks_url: on internal networks only, every
    token would be refused. Databases stay on internal networks."""
    from pgwarden.config import load

    cfg = load(ROOT / "examples" / "pgwarden.yaml", environ={})
    assert cfg.identity is not None and str(cfg.identity["jwks_url"]).startswith("https://")
    spec = compose()
    internal = {n for n, v in spec["networks"].items() if (v or {}).get("internal")}
    services = spec["services"]
    for name in ("tap", "policyd"):
        assert set(services[name]["networks"]) - internal, f"{name} cannot reach the JWKS"
    for name in ("postgres", "audit-db", "maskd", "opa"):
        assert set(services[name].get("networks", [])) <= internal, name

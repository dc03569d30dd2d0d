#!/usr/bin/env python3
"""Checks the meshid Helm chart (charts/meshid). Run through tests/helm/check.sh.

For every values file in tests/helm/values/:

1. lint (Helm v4's linter, through helm-python-sdk) and validate the values against
   values.schema.json;
2. render, and validate every object with kubernetes-validate in strict mode (unknown fields are
   errors) for each Kubernetes version in KUBE_VERSIONS; CRD kinds (ServiceMonitor) have no
   schema there and are checked by shape instead;
3. check the chart's own contract on the rendered objects (hardening, probes, RBAC rules, config
   file, ...) and write the manifests and meshid's config file to the output directory.

Then, when a kube-apiserver is available (MESHID_TEST_KUBECONFIG, see tests/kube-harness/run.sh):

4. apply every object of the scenarios marked `apply` with server-side apply, and exercise the
   RBAC with a real token of the chart's ServiceAccount: what meshid does must be allowed, and a
   sample of what it must never do must be forbidden;
5. install, upgrade and uninstall the defaults with Helm itself.

Without MESHID_TEST_KUBECONFIG steps 4-5 are skipped, unless CI is true, where that is a failure
(the same rule as tests/common/kube.rs).
"""

from __future__ import annotations

import argparse
import base64
import copy
import os
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml
from kubernetes import client as k8s
from kubernetes import config as kconfig
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "meshid"
VALUES_DIR = Path(__file__).resolve().parent / "values"

# Strict schema validation for these Kubernetes versions (1.35 is the test apiserver's).
KUBE_VERSIONS = ("1.33.0", "1.35.0")
# Kinds from CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {"ServiceMonitor"}
# Namespace and release name of the offline renders (what the docs use).
RELEASE_NAMESPACE = "meshid-system"
RELEASE_NAME = "meshid"
FIELD_MANAGER = "meshid-test"
TEST_LABEL = "meshid.dev/test"
ROOT_CONFIGMAP = "istio-ca-root-cert"

# Scenarios applied to the apiserver. The others are rendered and validated only.
APPLY = {"defaults", "aws-pca-irsa", "istiod-cert", "minimal", "multicluster"}


# --------------------------------------------------------------------------------------------
# Results


_FAILED = object()


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def check(self, name: str, fn: Callable[[], Any]) -> bool:
        """Runs one check; an exception fails it (and is reported), the run goes on."""
        return self.value(name, fn) is not _FAILED

    def value(self, name: str, fn: Callable[[], Any]) -> Any:
        """Like `check`, returning what `fn` returned, or `_FAILED`."""
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported the same way
            self.failed.append(name)
            detail = str(e) if isinstance(e, CheckError) else traceback.format_exc()
            print(f"FAIL {name}: {detail.strip()}", flush=True)
            return _FAILED
        self.passed += 1
        print(f"ok   {name}", flush=True)
        return value

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(name)
        print(f"skip {name}: {why}", flush=True)


class CheckError(Exception):
    """A failed expectation with a readable message."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


# --------------------------------------------------------------------------------------------
# Rendering


def load_values(name: str) -> dict[str, Any]:
    text = (VALUES_DIR / f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def render(values: dict[str, Any], *, name: str, namespace: str) -> list[dict[str, Any]]:
    """Renders the chart like `helm install` would and returns the objects, in file order."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects = []
    for path in sorted(files):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(files[path]):
            if doc:
                doc.setdefault("metadata", {})
                objects.append(doc)
    return objects


def app_version() -> str:
    with helm.Chart.load(CHART) as chart:
        return str(chart.metadata["appVersion"])


def merged_values(values: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(values)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    expect(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def meshid_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    cm = one(objects, "ConfigMap")
    return yaml.safe_load(cm["data"]["config.yaml"])


def fullname(v: dict[str, Any], release: str) -> str:
    return v["fullnameOverride"] or (release if "meshid" in release else f"{release}-meshid")


# --------------------------------------------------------------------------------------------
# Offline checks


def check_lint(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=RELEASE_NAMESPACE, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    expect(not problems, f"helm lint: {problems}")


def check_schema(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)


def check_kubernetes_schemas(objects: list[dict[str, Any]], version: str) -> None:
    errors = []
    for o in objects:
        if o["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            errors.append(f"{o['kind']}/{o['metadata'].get('name')}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(e.message)
    expect(not errors, "\n  ".join(errors))


def check_service_monitor_shape(objects: list[dict[str, Any]], enabled: bool) -> None:
    monitors = kinds(objects, "ServiceMonitor")
    expect(len(monitors) == (1 if enabled else 0), f"{len(monitors)} ServiceMonitors, enabled={enabled}")
    if not enabled:
        return
    sm = monitors[0]
    expect(sm["apiVersion"] == "monitoring.coreos.com/v1", sm["apiVersion"])
    svc = one(objects, "Service")
    selector = sm["spec"]["selector"]["matchLabels"]
    labels = svc["metadata"]["labels"]
    expect(all(labels.get(k) == v for k, v in selector.items()), f"selector {selector} misses Service {labels}")
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        expect(ep["port"] in ports, f"endpoint port {ep['port']} not in Service ports {ports}")
        expect(ep["path"] == "/metrics", ep["path"])
    expect(set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints"}, f"unexpected fields {set(sm['spec'])}")


def check_common_metadata(objects: list[dict[str, Any]], v: dict[str, Any], namespace: str) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for o in objects:
        meta = o["metadata"]
        where = f"{o['kind']}/{meta.get('name')}"
        labels = meta.get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"):
            expect(key in labels, f"{where} lacks label {key}")
        if o["kind"] in cluster_scoped:
            expect("namespace" not in meta, f"{where} is cluster-scoped but has a namespace")
        elif meta["name"].endswith("-istiod-cert"):
            expect(meta.get("namespace") == v["istiodCert"]["namespace"], f"{where} in {meta.get('namespace')}")
        else:
            expect(meta.get("namespace") == namespace, f"{where} in {meta.get('namespace')}, not {namespace}")


def check_deployment(objects: list[dict[str, Any]], v: dict[str, Any]) -> None:
    d = one(objects, "Deployment")
    spec = d["spec"]
    expect(spec["replicas"] == v["replicaCount"], f"replicas {spec['replicas']}")
    pod = spec["template"]["spec"]
    expect(pod.get("automountServiceAccountToken", True) is True, "the SA token must be mounted (TokenReview)")
    sa_names = [o["metadata"]["name"] for o in kinds(objects, "ServiceAccount")]
    expect(pod["serviceAccountName"] in sa_names or not v["serviceAccount"]["create"], "serviceAccountName")
    psc = pod["securityContext"]
    expect(psc.get("runAsNonRoot") is True, "pod runAsNonRoot")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccomp RuntimeDefault")
    labels = spec["template"]["metadata"]["labels"]
    expect(labels.get("sidecar.istio.io/inject") == "false", "meshid must not get a sidecar")
    expect(labels.get("istio.io/dataplane-mode") == "none", "meshid must not be captured by ztunnel")
    (c,) = pod["containers"]
    image = v["image"]
    want = (f"{image['repository']}@{image['digest']}" if image["digest"]
            else f"{image['repository']}:{image['tag'] or app_version()}")
    expect(c["image"] == want, f"image {c['image']} != {want}")
    expect(c["args"][:1] == ["server"] and "--config" in c["args"], f"args {c['args']}")
    expect(not [e for e in c.get("env", []) if e["name"].startswith("MESHID_")],
           "no MESHID_* variables: the config file is the single source of truth")
    sc = c["securityContext"]
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    expect(sc.get("runAsNonRoot") is True, "container runAsNonRoot")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "drop ALL capabilities")
    res = c["resources"]
    for part in ("requests", "limits"):
        expect({"cpu", "memory"} <= set(res.get(part, {})), f"resources.{part} needs cpu and memory")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expect(ports == {"grpc": v["ports"]["grpc"], "http": v["ports"]["http"]}, f"ports {ports}")
    expect(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, "liveness /healthz on http")
    expect(c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, "readiness /readyz on http")
    affinity = pod.get("affinity", {})
    if v["podAntiAffinity"] == "soft":
        expect("preferredDuringSchedulingIgnoredDuringExecution" in affinity.get("podAntiAffinity", {}), "soft anti-affinity")
    if v["podAntiAffinity"] == "hard":
        expect("requiredDuringSchedulingIgnoredDuringExecution" in affinity.get("podAntiAffinity", {}), "hard anti-affinity")
    pdbs = kinds(objects, "PodDisruptionBudget")
    want_pdb = v["podDisruptionBudget"]["enabled"] and v["replicaCount"] > 1
    expect(len(pdbs) == (1 if want_pdb else 0), f"{len(pdbs)} PodDisruptionBudgets, want {int(want_pdb)}")
    if pdbs:
        expect(pdbs[0]["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"], "PDB selector")
    # Secret volumes are read-only and not world-readable.
    for vol in pod["volumes"]:
        if "secret" in vol:
            expect(vol["secret"].get("defaultMode", 0o644) & 0o007 == 0, f"volume {vol['name']} is world-readable")
    for m in c["volumeMounts"]:
        if m["name"] != "tmp":
            expect(m.get("readOnly") is True, f"mount {m['name']} must be read-only")


def check_service(objects: list[dict[str, Any]], v: dict[str, Any]) -> None:
    svc = one(objects, "Service")
    ports = {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]}
    expect(ports.get(v["service"]["port"]) == "grpc", f"Service {v['service']['port']} -> grpc: {ports}")
    expect(ports.get(v["service"]["metricsPort"]) == "http", f"Service metrics -> http: {ports}")
    d = one(objects, "Deployment")
    expect(svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"], "Service selects the Deployment's pods")


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """Flattens RBAC rules to (apiGroup, resource, resourceName or *, verb) tuples."""
    out = set()
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for name in r.get("resourceNames", ["*"]):
                    for verb in r["verbs"]:
                        out.add((g, res, name, verb))
    return out


def expected_cluster_rules(v: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    want = {("authentication.k8s.io", "tokenreviews", "*", "create")}
    if v["rootConfigMap"]["enabled"]:
        want |= {("", "configmaps", "*", verb) for verb in ("get", "list", "watch", "create", "update", "patch")}
        want |= {("", "namespaces", "*", verb) for verb in ("get", "list", "watch")}
    if v["ztunnel"]["trustedNodeAccounts"]:
        want |= {("", "pods", "*", verb) for verb in ("get", "list")}
    return want


def controllers_enabled(v: dict[str, Any]) -> bool:
    """meshid runs its controllers (and so leader election) only when one of them is on."""
    return bool(v["rootConfigMap"]["enabled"] or v["istiodCert"]["enabled"])


def check_rbac(objects: list[dict[str, Any]], v: dict[str, Any], release: str, namespace: str) -> None:
    name = fullname(v, release)
    sa = v["serviceAccount"]["name"] or name
    cr = one(objects, "ClusterRole")
    got, want = rule_set(cr["rules"]), expected_cluster_rules(v)
    expect(got == want, f"ClusterRole rules: extra {got - want}, missing {want - got}")
    for binding in kinds(objects, "ClusterRoleBinding") + kinds(objects, "RoleBinding"):
        expect(binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
               f"{binding['metadata']['name']} subjects {binding['subjects']}")
    lease = v["leaderElection"]["leaseName"] or f"{name}-leader"
    lease_roles = [r for r in kinds(objects, "Role") if r["metadata"]["name"] == f"{name}-leader-election"]
    expect(len(lease_roles) == (1 if controllers_enabled(v) else 0), "leader-election Role iff a controller is on")
    want_lease_rules = {("coordination.k8s.io", "leases", "*", "create"),
                        ("coordination.k8s.io", "leases", lease, "get"),
                        ("coordination.k8s.io", "leases", lease, "update"),
                        ("", "configmaps", "*", "create"),
                        ("", "configmaps", f"{lease}-signing-roots", "get"),
                        ("", "configmaps", f"{lease}-signing-roots", "patch")}
    for role in lease_roles:
        expect(rule_set(role["rules"]) == want_lease_rules, f"leader-election Role {role['rules']}")
    remote_roles = [r for r in kinds(objects, "Role") if r["metadata"]["name"] == f"{name}-remote-secrets"]
    expect(len(remote_roles) == (1 if v["remoteClusters"]["secrets"] else 0), "remote Secrets Role iff remoteClusters.secrets")
    for role in remote_roles:
        expect(role["metadata"]["namespace"] == (v["remoteClusters"]["secretsNamespace"] or namespace),
               f"remote Secrets Role in {role['metadata']['namespace']}")
        expect(rule_set(role["rules"]) == {("", "secrets", "*", verb) for verb in ("get", "list", "watch")},
               f"remote Secrets Role {role['rules']}")
    istiod_roles = [r for r in kinds(objects, "Role") if r["metadata"]["name"] == f"{name}-istiod-cert"]
    expect(len(istiod_roles) == (1 if v["istiodCert"]["enabled"] else 0), "istiod Secret Role iff istiodCert.enabled")
    if istiod_roles:
        secret = v["istiodCert"]["secretName"]
        expect(rule_set(istiod_roles[0]["rules"]) == {("", "secrets", "*", "create"), ("", "secrets", secret, "get"),
                                                      ("", "secrets", secret, "update")},
               f"istiod Role {istiod_roles[0]['rules']}")
    # Nothing in the chart may touch Secrets cluster-wide or use wildcards.
    for r in kinds(objects, "ClusterRole") + kinds(objects, "Role"):
        for rule in r["rules"]:
            expect("*" not in rule["verbs"] and "*" not in rule.get("resources", []), f"wildcard in {r['metadata']['name']}")
    expect(not any(res == "secrets" for (_, res, _, _) in got), "ClusterRole must not grant secrets")


def check_service_account(objects: list[dict[str, Any]], v: dict[str, Any]) -> None:
    sas = kinds(objects, "ServiceAccount")
    expect(len(sas) == (1 if v["serviceAccount"]["create"] else 0), "ServiceAccount iff serviceAccount.create")
    if not sas:
        return
    annotations = sas[0]["metadata"].get("annotations", {})
    want = dict(v["serviceAccount"]["annotations"])
    if v["serviceAccount"]["awsRoleArn"]:
        want["eks.amazonaws.com/role-arn"] = v["serviceAccount"]["awsRoleArn"]
    expect(annotations == want, f"ServiceAccount annotations {annotations} != {want}")


def check_config_file(objects: list[dict[str, Any]], v: dict[str, Any], release: str, namespace: str) -> None:
    """The config file says what the values say, and every file it names is mounted."""
    cfg = meshid_config(objects)
    expect(all(val is not None and val != "" for val in cfg.values()), f"empty settings in {cfg}")
    expect(cfg["trust-domain"] == v["trustDomain"] and cfg["cluster-id"] == v["clusterID"], "trust domain / cluster ID")
    expect(cfg["audiences"] == v["audiences"], "audiences")
    expect(cfg["listen"].endswith(f":{v['ports']['grpc']}") and cfg["http-listen"].endswith(f":{v['ports']['http']}"),
           "listen addresses match the container ports")
    expect(cfg["signer"] == v["signer"]["type"], "signer")
    if v["signer"]["type"] == "local":
        expect({"ca-cert", "ca-key"} <= set(cfg) and "pca-arn" not in cfg, f"local signer settings {cfg}")
    else:
        pca = v["signer"]["awsPca"]
        expect(cfg["pca-arn"] == pca["arn"] and cfg["pca-mode"] == pca["mode"] and cfg["pca-tps"] == pca["tps"],
               f"aws-pca settings {cfg}")
        expect("ca-cert" not in cfg and "ca-key" not in cfg, "no CA files with aws-pca")
    expect(cfg["root-configmap"] is v["rootConfigMap"]["enabled"], "root-configmap")
    expect(cfg["istiod-cert"] is v["istiodCert"]["enabled"], "istiod-cert")
    if v["istiodCert"]["enabled"]:
        expect(cfg["istiod-namespace"] == v["istiodCert"]["namespace"], "istiod-namespace")
    expect(cfg["trusted-node-accounts"] == v["ztunnel"]["trustedNodeAccounts"], "trusted-node-accounts")
    if v["remoteClusters"]["secrets"]:
        expect(cfg["remote-secrets"] is True
               and cfg["remote-secrets-namespace"] == (v["remoteClusters"]["secretsNamespace"] or namespace),
               f"remote secrets settings {cfg}")
    else:
        expect("remote-secrets" not in cfg and "remote-secrets-namespace" not in cfg, "no remote secrets settings")
    if controllers_enabled(v):
        expect(cfg["leader-election-namespace"] == namespace, "leader election in the release namespace")
        expect(cfg["signing-roots-interval"] == v["leaderElection"]["signingRootsInterval"]
               and cfg["signing-roots-grace"] == v["leaderElection"]["signingRootsGrace"], "signing-roots registry timing")
    else:
        expect("lease-name" not in cfg, "no lease settings without controllers")
    if v["servingCert"]["secretName"]:
        expect("serving-hosts" not in cfg and {"tls-cert", "tls-key"} <= set(cfg), "operator serving cert")
    else:
        svc = one(objects, "Service")["metadata"]["name"]
        expect(f"{svc}.{namespace}.svc" in cfg["serving-hosts"], f"serving-hosts {cfg['serving-hosts']} lack the caAddress host")
    # Every path setting must lie under a read-only mount of the container.
    c = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    mounts = [m["mountPath"].rstrip("/") + "/" for m in c["volumeMounts"] if m.get("readOnly")]
    for key in ("ca-cert", "ca-key", "ca-chain", "root-cert", "tls-cert", "tls-key", "extra-roots"):
        if key in cfg:
            expect(any(cfg[key].startswith(m) for m in mounts), f"{key}={cfg[key]} is not under a mount {mounts}")
    expect(any(m == "/etc/meshid/config/" for m in mounts) and c["args"][-1] == "/etc/meshid/config/config.yaml",
           "config file is mounted where --config points")


# Values the chart must refuse, with a word the error message must contain.
REJECTED_VALUES = [
    ({"signer": {"type": "aws-pca"}}, "arn"),
    ({"signer": {"type": "vault"}}, "type"),
    ({"signer": {"local": {"secretName": ""}}}, "secretName"),
    ({"trustDomian": "cluster.local"}, "trustDomian"),
    ({"ztunnel": {"trustedNodeAccounts": ["ztunnel"]}}, "trustedNodeAccounts"),
    ({"replicaCount": 0}, "replicaCount"),
    ({"remoteClusters": {"secrets": "yes"}}, "secrets"),
    ({"certificates": {"maxTTL": "two days"}}, "maxTTL"),
    ({"istiodCert": {"enabled": True, "namespace": ""}}, "istiodCert.namespace"),
]


def check_rejects(values: dict[str, Any], word: str) -> None:
    try:
        render(values, name=RELEASE_NAME, namespace=RELEASE_NAMESPACE)
    except helm.HelmError as e:
        expect(word in str(e), f"refused, but the message does not name {word!r}: {e}")
        return
    raise CheckError(f"rendered {values} without complaint")


def offline_checks(results: Results, scenario: str, out_dir: Path) -> None:
    values = load_values(scenario)
    v = merged_values(values)
    prefix = f"[{scenario}]"
    results.check(f"{prefix} helm lint --strict", lambda: check_lint(values))
    results.check(f"{prefix} values.schema.json accepts the values", lambda: check_schema(values))
    objects = results.value(f"{prefix} render", lambda: render(values, name=RELEASE_NAME, namespace=RELEASE_NAMESPACE))
    if objects is _FAILED:
        return
    for version in KUBE_VERSIONS:
        results.check(f"{prefix} kubernetes-validate --strict {version} ({len(objects)} objects)",
                      lambda version=version: check_kubernetes_schemas(objects, version))
    crds = sorted({o["kind"] for o in objects if o["kind"] in CRD_KINDS})
    if crds:
        print(f"note {prefix} {', '.join(crds)} checked by shape only (CRD kinds have no schema in kubernetes-validate)")
    results.check(f"{prefix} ServiceMonitor only when enabled", lambda: check_service_monitor_shape(objects, v["serviceMonitor"]["enabled"]))
    results.check(f"{prefix} labels and namespaces", lambda: check_common_metadata(objects, v, RELEASE_NAMESPACE))
    results.check(f"{prefix} Deployment hardening, probes, PDB", lambda: check_deployment(objects, v))
    results.check(f"{prefix} Service ports", lambda: check_service(objects, v))
    results.check(f"{prefix} RBAC rules are exactly the expected ones", lambda: check_rbac(objects, v, RELEASE_NAME, RELEASE_NAMESPACE))
    results.check(f"{prefix} ServiceAccount annotations", lambda: check_service_account(objects, v))
    results.check(f"{prefix} meshid config file", lambda: check_config_file(objects, v, RELEASE_NAME, RELEASE_NAMESPACE))

    target = out_dir / scenario
    target.mkdir(parents=True, exist_ok=True)
    (target / "manifests.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    (target / "config.yaml").write_text(one(objects, "ConfigMap")["data"]["config.yaml"])


# --------------------------------------------------------------------------------------------
# Against the apiserver


@dataclass
class Cluster:
    kubeconfig: str
    admin: k8s.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        cfg = k8s.Configuration()
        kconfig.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        self._cfg = cfg
        self.admin = k8s.ApiClient(cfg)

    def client_for_token(self, token: str) -> k8s.ApiClient:
        """A client that authenticates with `token` only (no client certificate)."""
        cfg = copy.copy(self._cfg)
        cfg.cert_file = None
        cfg.key_file = None
        cfg.api_key = {"authorization": f"Bearer {token}"}
        return k8s.ApiClient(cfg)

    def create_namespace(self, name: str) -> str:
        body = k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels={TEST_LABEL: "true"}))
        k8s.CoreV1Api(self.admin).create_namespace(body)
        return name

    def token(self, namespace: str, sa: str, audiences: list[str] | None = None) -> str:
        req = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=audiences or [], expiration_seconds=600))
        return k8s.CoreV1Api(self.admin).create_namespaced_service_account_token(sa, namespace, req).status.token

    def apply(self, objects: list[dict[str, Any]]) -> None:
        """Server-side applies every object; errors name the object and the apiserver's reason."""
        dyn = DynamicClient(self.admin)
        errors = []
        for o in objects:
            try:
                res = dyn.resources.get(api_version=o["apiVersion"], kind=o["kind"])
                res.server_side_apply(body=o, namespace=o["metadata"].get("namespace"),
                                      field_manager=FIELD_MANAGER, force_conflicts=True)
            except Exception as e:  # noqa: BLE001
                body = getattr(e, "body", None) or str(e)
                errors.append(f"{o['kind']}/{o['metadata']['name']}: {body}")
        expect(not errors, "apiserver refused:\n  " + "\n  ".join(errors))


def outcome(fn: Callable[[], Any]) -> str:
    """`allowed` or `forbidden`. 404/409/422 come after authorization, so they mean allowed."""
    try:
        fn()
        return "allowed"
    except ApiException as e:
        if e.status == 403:
            return "forbidden"
        if e.status in (404, 409, 422):
            return "allowed"
        raise


def eventually(fn: Callable[[], str], want: str, timeout: float = 15.0) -> str:
    """RBAC objects reach the authorizer through a watch: retry until `want` or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got == want or time.monotonic() >= deadline:
            return got
        time.sleep(0.2)


def watch_once(list_fn: Callable[..., Any], **kwargs: Any) -> None:
    resp = list_fn(watch=True, timeout_seconds=1, _preload_content=False, **kwargs)
    try:
        if not 200 <= resp.status <= 299:
            raise ApiException(status=resp.status, reason=resp.reason)
    finally:
        resp.release_conn()


@dataclass
class Access:
    """The permission checks of one scenario: (what, call, expected outcome)."""
    allowed: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    forbidden: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)

    def allow(self, what: str, fn: Callable[[], Any]) -> None:
        self.allowed.append((what, fn))

    def deny(self, what: str, fn: Callable[[], Any]) -> None:
        self.forbidden.append((what, fn))


def access_plan(api: k8s.ApiClient, v: dict[str, Any], ns: str, workload_ns: str, istiod_ns: str,
                lease: str, meshid_deployment: str) -> Access:
    core = k8s.CoreV1Api(api)
    coord = k8s.CoordinationV1Api(api)
    apps = k8s.AppsV1Api(api)
    rbac = k8s.RbacAuthorizationV1Api(api)
    a = Access()

    # Leader election in the release namespace, and nowhere else.
    def lease_body(name: str) -> k8s.V1Lease:
        return k8s.V1Lease(metadata=k8s.V1ObjectMeta(name=name), spec=k8s.V1LeaseSpec(holder_identity="meshid-0"))

    lease_allowed = a.allow if controllers_enabled(v) else a.deny
    lease_allowed(f"get lease {ns}/{lease}", lambda: coord.read_namespaced_lease(lease, ns))
    lease_allowed(f"create lease {ns}/{lease}", lambda: coord.create_namespaced_lease(ns, lease_body(lease)))

    def renew() -> None:
        current = coord.read_namespaced_lease(lease, ns)
        current.spec.holder_identity = "meshid-1"
        coord.replace_namespaced_lease(lease, ns, current)

    lease_allowed(f"update lease {ns}/{lease}", renew)
    a.deny(f"get lease {ns}/someone-elses-lease", lambda: coord.read_namespaced_lease("someone-elses-lease", ns))
    a.deny(f"create lease in {workload_ns}", lambda: coord.create_namespaced_lease(workload_ns, lease_body(lease)))
    a.deny(f"delete lease {ns}/{lease}", lambda: coord.delete_namespaced_lease(lease, ns))

    # The signing-roots registry: one ConfigMap next to the Lease, patched key by key.
    registry = f"{lease}-signing-roots"
    lease_allowed(f"create configmap {ns}/{registry}", lambda: core.create_namespaced_config_map(
        ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=registry), data={})))
    lease_allowed(f"patch configmap {ns}/{registry}", lambda: core.patch_namespaced_config_map(
        registry, ns, {"data": {"meshid-0": "{}"}}))
    lease_allowed(f"get configmap {ns}/{registry}", lambda: core.read_namespaced_config_map(registry, ns))

    # Root distribution: istio-ca-root-cert in another namespace.
    cm_calls = {
        f"get configmap {workload_ns}/{ROOT_CONFIGMAP}": lambda: core.read_namespaced_config_map(ROOT_CONFIGMAP, workload_ns),
        f"create configmap {workload_ns}/{ROOT_CONFIGMAP}": lambda: core.create_namespaced_config_map(
            workload_ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=ROOT_CONFIGMAP, labels={"istio.io/config": "true"}),
                                         data={"root-cert.pem": "placeholder\n"})),
        f"update configmap {workload_ns}/{ROOT_CONFIGMAP}": lambda: core.replace_namespaced_config_map(
            ROOT_CONFIGMAP, workload_ns, _with_data(core.read_namespaced_config_map(ROOT_CONFIGMAP, workload_ns), "updated\n")),
        f"patch configmap {workload_ns}/{ROOT_CONFIGMAP}": lambda: core.patch_namespaced_config_map(
            ROOT_CONFIGMAP, workload_ns, {"data": {"root-cert.pem": "patched\n"}}),
        "list configmaps in all namespaces": lambda: core.list_config_map_for_all_namespaces(
            field_selector=f"metadata.name={ROOT_CONFIGMAP}"),
        "watch configmaps in all namespaces": lambda: watch_once(
            core.list_config_map_for_all_namespaces, field_selector=f"metadata.name={ROOT_CONFIGMAP}"),
        "list namespaces": lambda: core.list_namespace(),
        "watch namespaces": lambda: watch_once(core.list_namespace),
        f"get namespace {workload_ns}": lambda: core.read_namespace(workload_ns),
    }
    for what, fn in cm_calls.items():
        (a.allow if v["rootConfigMap"]["enabled"] else a.deny)(what, fn)
    a.deny(f"delete configmap {workload_ns}/{ROOT_CONFIGMAP}", lambda: core.delete_namespaced_config_map(ROOT_CONFIGMAP, workload_ns))
    a.deny("create namespace", lambda: core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="meshid-must-not"))))

    # ztunnel node authorization reads pods; it never changes them.
    pod_calls = {
        f"list pods in {workload_ns} on a node": lambda: core.list_namespaced_pod(workload_ns, field_selector="spec.nodeName=node-a"),
        f"get pod {workload_ns}/app": lambda: core.read_namespaced_pod("app", workload_ns),
    }
    for what, fn in pod_calls.items():
        (a.allow if v["ztunnel"]["trustedNodeAccounts"] else a.deny)(what, fn)
    a.deny(f"delete pod {workload_ns}/app", lambda: core.delete_namespaced_pod("app", workload_ns))
    a.deny(f"create pod in {workload_ns}", lambda: core.create_namespaced_pod(workload_ns, k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="x"), spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="x", image="x")]))))

    # Secrets: only istiod's serving-certificate Secret, only when enabled.
    secret = v["istiodCert"]["secretName"]
    tls = {"tls.crt": base64.b64encode(b"crt").decode(), "tls.key": base64.b64encode(b"key").decode()}

    def secret_body() -> k8s.V1Secret:
        return k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=secret), type="kubernetes.io/tls", data=tls)

    def rewrite_secret() -> None:
        s = core.read_namespaced_secret(secret, istiod_ns)
        s.data = dict(tls, **{"ca.crt": base64.b64encode(b"root").decode()})
        core.replace_namespaced_secret(secret, istiod_ns, s)

    istiod_calls = {
        f"get secret {istiod_ns}/{secret}": lambda: core.read_namespaced_secret(secret, istiod_ns),
        f"create secret {istiod_ns}/{secret}": lambda: core.create_namespaced_secret(istiod_ns, secret_body()),
        f"update secret {istiod_ns}/{secret}": rewrite_secret,
    }
    for what, fn in istiod_calls.items():
        (a.allow if v["istiodCert"]["enabled"] else a.deny)(what, fn)
    a.deny(f"get secret {istiod_ns}/cacerts", lambda: core.read_namespaced_secret("cacerts", istiod_ns))
    a.deny(f"list secrets in {istiod_ns}", lambda: core.list_namespaced_secret(istiod_ns))
    a.deny(f"delete secret {istiod_ns}/{secret}", lambda: core.delete_namespaced_secret(secret, istiod_ns))
    a.deny(f"get secret {workload_ns}/anything", lambda: core.read_namespaced_secret("anything", workload_ns))
    # Remote clusters: the remote Secrets in the release namespace, read only.
    remote = a.allow if v["remoteClusters"]["secrets"] else a.deny
    remote(f"list secrets in {ns}", lambda: core.list_namespaced_secret(ns))
    remote(f"watch secrets in {ns}", lambda: watch_once(core.list_namespaced_secret, namespace=ns))
    remote(f"get secret {ns}/istio-remote-secret-b", lambda: core.read_namespaced_secret("istio-remote-secret-b", ns))
    a.deny(f"create secret in {ns}", lambda: core.create_namespaced_secret(
        ns, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="meshid-must-not"))))
    a.deny("list secrets in all namespaces", lambda: core.list_secret_for_all_namespaces())

    # No path to more privilege, and not even to its own Deployment.
    a.deny(f"patch deployment {ns}/{meshid_deployment}", lambda: apps.patch_namespaced_deployment(
        meshid_deployment, ns, {"spec": {"replicas": 5}}))
    a.deny("create clusterrolebinding", lambda: rbac.create_cluster_role_binding(k8s.V1ClusterRoleBinding(
        metadata=k8s.V1ObjectMeta(name="meshid-must-not"),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="cluster-admin"),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="meshid", namespace=ns)])))
    return a


def _with_data(cm: k8s.V1ConfigMap, pem: str) -> k8s.V1ConfigMap:
    cm.data = {"root-cert.pem": pem}
    return cm


def cluster_checks(results: Results, cluster: Cluster, scenario: str) -> None:
    prefix = f"[{scenario}] apiserver:"
    suffix = secrets.token_hex(3)
    release = f"meshid-{suffix}"
    values = load_values(scenario)
    ns = cluster.create_namespace(f"helm-{scenario}-{suffix}")
    workload_ns = cluster.create_namespace(f"helm-workload-{suffix}")
    istiod_ns = cluster.create_namespace(f"helm-istio-{suffix}")
    values = dict(values, istiodCert=dict(values.get("istiodCert", {}), namespace=istiod_ns))
    v = merged_values(values)
    objects = render(values, name=release, namespace=ns)
    name = fullname(v, release)
    sa = v["serviceAccount"]["name"] or name

    if not results.check(f"{prefix} server-side apply of {len(objects)} objects", lambda: cluster.apply(objects)):
        return

    def stored_deployment_keeps_hardening() -> None:
        d = k8s.AppsV1Api(cluster.admin).read_namespaced_deployment(name, ns)
        c = d.spec.template.spec.containers[0]
        expect(c.security_context.read_only_root_filesystem is True, "readOnlyRootFilesystem lost")
        expect(d.spec.template.spec.security_context.seccomp_profile.type == "RuntimeDefault", "seccomp lost")
        expect(d.spec.replicas == v["replicaCount"], f"replicas {d.spec.replicas}")

    results.check(f"{prefix} stored Deployment keeps the hardening", stored_deployment_keeps_hardening)

    # Apply again: server-side apply of unchanged manifests must be a no-op, not a conflict.
    results.check(f"{prefix} re-apply is idempotent", lambda: cluster.apply(objects))

    # The chart's ServiceAccount, with a real token: authenticate a workload token as meshid does.
    core_admin = k8s.CoreV1Api(cluster.admin)
    core_admin.create_namespaced_service_account(workload_ns, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="workload")))
    meshid = cluster.client_for_token(cluster.token(ns, sa))
    workload_token = cluster.token(workload_ns, "workload", ["istio-ca"])

    def token_review() -> None:
        review = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=workload_token, audiences=["istio-ca"]))

        def call() -> str:
            return outcome(lambda: k8s.AuthenticationV1Api(meshid).create_token_review(review))

        expect(eventually(call, "allowed") == "allowed", "create tokenreviews is forbidden")
        status = k8s.AuthenticationV1Api(meshid).create_token_review(review).status
        expect(status.authenticated is True, f"workload token not authenticated: {status.error}")
        expect(status.user.username == f"system:serviceaccount:{workload_ns}:workload", status.user.username)

    results.check(f"{prefix} create tokenreviews (and the review authenticates a workload)", token_review)

    plan = access_plan(meshid, v, ns, workload_ns, istiod_ns, v["leaderElection"]["leaseName"] or f"{name}-leader", name)
    # Allowed calls first (retrying while RBAC propagates); once they pass, a 403 is a real 403.
    for what, fn in plan.allowed:
        results.check(f"{prefix} may {what}",
                      lambda fn=fn: expect(eventually(lambda: outcome(fn), "allowed") == "allowed", "forbidden"))
    for what, fn in plan.forbidden:
        results.check(f"{prefix} may not {what}", lambda fn=fn: expect(outcome(fn) == "forbidden", "allowed"))


def chart_for(cluster: Cluster, scratch: Path) -> Path:
    """The chart to install. An apiserver built without version stamping reports
    v0.0.0-master, which no kubeVersion constraint admits: for such a server only, install a
    copy of the chart without Chart.yaml's kubeVersion (nothing else differs)."""
    version = k8s.VersionApi(cluster.admin).get_code().git_version
    if not version.startswith("v0.0.0"):
        return CHART
    print(f"note the apiserver reports {version}; installing a copy of the chart without kubeVersion")
    copy_dir = scratch / "meshid"
    shutil.copytree(CHART, copy_dir)
    chart_yaml = copy_dir / "Chart.yaml"
    lines = chart_yaml.read_text().splitlines(keepends=True)
    chart_yaml.write_text("".join(line for line in lines if not line.startswith("kubeVersion:")))
    return copy_dir


def helm_lifecycle(results: Results, cluster: Cluster) -> None:
    """Installs, upgrades and uninstalls the defaults with Helm itself (Helm v4 applies server-side)."""
    prefix = "[defaults] helm:"
    suffix = secrets.token_hex(3)
    ns = cluster.create_namespace(f"helm-release-{suffix}")
    release = f"meshid-{suffix}"
    apps = k8s.AppsV1Api(cluster.admin)
    chart = chart_for(cluster, Path(tempfile.mkdtemp(prefix="meshid-chart-")))
    with helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=ns) as cfg:
        def install() -> None:
            r = cfg.install(str(chart), release, {}, namespace=ns, timeout=60)
            expect(r["status"] == "deployed", f"status {r['status']}")
            expect(apps.read_namespaced_deployment(release, ns).spec.replicas == 2, "replicas")

        def upgrade() -> None:
            r = cfg.upgrade(str(chart), release, {"replicaCount": 3}, namespace=ns, timeout=60)
            expect(r["status"] == "deployed" and r["revision"] == 2, f"status {r['status']}, revision {r['revision']}")
            expect(apps.read_namespaced_deployment(release, ns).spec.replicas == 3, "replicas after upgrade")

        def uninstall() -> None:
            cfg.uninstall(release, timeout=60)
            try:
                apps.read_namespaced_deployment(release, ns)
                raise CheckError("Deployment still exists after uninstall")
            except ApiException as e:
                expect(e.status == 404, f"status {e.status}")

        if not results.check(f"{prefix} install", install):
            return
        results.check(f"{prefix} upgrade", upgrade)
        results.check(f"{prefix} uninstall", uninstall)


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "target" / "helm",
                        help="where rendered manifests and config files go (default: target/helm)")
    parser.add_argument("scenarios", nargs="*", help="values files to check (default: all in tests/helm/values)")
    args = parser.parse_args()

    scenarios = args.scenarios or sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))
    print(f"Helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
          f"kubernetes-validate {kubernetes_validate.__version__}")
    results = Results()
    for scenario in scenarios:
        offline_checks(results, scenario, args.out)
    for bad, word in REJECTED_VALUES:
        results.check(f"refuses {bad}", lambda bad=bad, word=word: check_rejects(bad, word))

    kubeconfig = os.environ.get("MESHID_TEST_KUBECONFIG")
    if not kubeconfig:
        how = 'start it with `eval "$(tests/kube-harness/run.sh up)"`'
        if os.environ.get("CI") in ("true", "1"):
            results.failed.append("apiserver")
            print(f"FAIL apiserver: MESHID_TEST_KUBECONFIG is not set and CI=true: {how}")
        else:
            results.skip("apiserver checks", f"MESHID_TEST_KUBECONFIG is not set; {how}")
    else:
        cluster = Cluster(kubeconfig)
        for scenario in scenarios:
            if scenario in APPLY:
                cluster_checks(results, cluster, scenario)
            else:
                print(f"note [{scenario}] not applied: it contains CRD kinds the test apiserver lacks")
        if "defaults" in scenarios:
            helm_lifecycle(results, cluster)

    print(f"rendered manifests and config files: {args.out}")
    if results.failed:
        print("failed:\n  " + "\n  ".join(results.failed))
    print(f"helm: {results.passed} passed, {len(results.failed)} failed"
          + (f", {len(results.skipped)} skipped" if results.skipped else ""))
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())

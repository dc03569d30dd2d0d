#!/usr/bin/env python3
"""Istio end to end with Istio's own binaries and meshid as the CA (driven by run.sh).

Runs on the kube-apiserver harness (MESHID_TEST_KUBECONFIG), everything on loopback:

- meshid server (TokenReview against the harness, --istiod-cert, root ConfigMaps);
- istiod (pilot-discovery) with ENABLE_CA_SERVER=false, serving the certificate from the
  Secret meshid maintains (written to the files given to --tlsCertFile/--tlsKeyFile/--caCertFile,
  as the kubelet would mount them);
- three VM-style workloads a, b, c, each pilot-agent + Envoy with CA_ADDR pointing at meshid,
  a TokenRequest token and the root from istio-ca-root-cert, in its own working directory (the
  agent's paths are relative: ./var/run/secrets/..., ./etc/istio/proxy), on its own loopback
  address 127.0.0.2-4 so that istiod tells their WorkloadEntries apart;
- Sidecar resources with captureMode NONE ingress/egress listeners, PeerAuthentication STRICT,
  an AuthorizationPolicy on b allowing only a's principal.

Prints one line per check and ends with `istio-e2e: N passed, M failed`; exits non-zero on any
failure. The environment is described in run.sh.
"""

import base64
import datetime
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
TRUST_DOMAIN = "cluster.local"
ISTIOD_NS = "istio-system"
MESHID_NS = "meshid-system"
# Short SVID lifetime (meshid's --max-ttl): istio-agent renews at half-life.
SVID_TTL_SECS = int(os.environ.get("ISTIO_E2E_SVID_TTL", "30"))
ROTATIONS = 2
# The meshid chart's values, as a user sets them for this mesh (docs/istio.md).
CHART_VALUES = {
    "istiodCert": {"enabled": True},
    "certificates": {"defaultTTL": f"{SVID_TTL_SECS}s", "maxTTL": f"{SVID_TTL_SECS}s",
                     "minTTL": f"{SVID_TTL_SECS}s"},
    # The VMs reach meshid at 127.0.0.1 (CA_ADDR): its serving certificate must name it.
    "servingCert": {"extraHosts": ["127.0.0.1"]},
    "logFormat": "text",
}

WORKLOADS = {
    # name: loopback address (one per workload: istiod maps a proxy to its WorkloadEntry by IP)
    "a": "127.0.0.2",
    "b": "127.0.0.3",
    "c": "127.0.0.4",
}
SERVICE_PORT = 9080  # b's service port, its inbound listener, and a's/c's egress listener
SERVICE_HOST = "b.e2e-b.svc.cluster.local"


def log(msg):
    print(f"istio-e2e: {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


def wait_for(what, fn, timeout=60, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise Failed(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- Kubernetes (stdlib REST)


class Kube:
    KINDS = {
        # kind: (api prefix, plural, namespaced)
        "Namespace": ("/api/v1", "namespaces", False),
        "ServiceAccount": ("/api/v1", "serviceaccounts", True),
        "ConfigMap": ("/api/v1", "configmaps", True),
        "Secret": ("/api/v1", "secrets", True),
        "Service": ("/api/v1", "services", True),
        "Deployment": ("/apis/apps/v1", "deployments", True),
        "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
        "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
        "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
        "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
        "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
        "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
        "ServiceEntry": ("/apis/networking.istio.io/v1", "serviceentries", True),
        "WorkloadEntry": ("/apis/networking.istio.io/v1", "workloadentries", True),
        "Sidecar": ("/apis/networking.istio.io/v1", "sidecars", True),
        "PeerAuthentication": ("/apis/security.istio.io/v1", "peerauthentications", True),
        "AuthorizationPolicy": ("/apis/security.istio.io/v1", "authorizationpolicies", True),
    }

    def __init__(self, kubeconfig, workdir):
        with open(kubeconfig) as f:
            cfg = yaml.safe_load(f)
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        self.server = cluster["server"]
        d = os.path.join(workdir, "kube-client")
        os.makedirs(d, exist_ok=True)
        paths = {}
        for key, name in [("certificate-authority-data", "ca.pem"), ("client-certificate-data", "cert.pem"),
                          ("client-key-data", "key.pem")]:
            src = cluster if key.startswith("certificate-authority") else user
            p = os.path.join(d, name)
            with open(p, "wb") as f:
                f.write(base64.b64decode(src[key]))
            paths[name] = p
        self.ca_path = paths["ca.pem"]
        self.ctx = ssl.create_default_context(cafile=paths["ca.pem"])
        self.ctx.load_cert_chain(paths["cert.pem"], paths["key.pem"])

    def request(self, method, path, body=None, content_type="application/json", ok404=False):
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            if ok404 and e.code == 404:
                return None
            raise Failed(f"{method} {path}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}") from None

    def path(self, kind, name=None, namespace=None):
        prefix, plural, namespaced = self.KINDS[kind]
        p = prefix
        if namespaced:
            p += f"/namespaces/{namespace}"
        p += f"/{plural}"
        if name:
            p += f"/{name}"
        return p

    def apply(self, obj):
        """Server-side apply, as `kubectl apply --server-side` does."""
        md = obj["metadata"]
        p = self.path(obj["kind"], md["name"], md.get("namespace")) + "?fieldManager=istio-e2e&force=true"
        return self.request("PATCH", p, json.dumps(obj).encode(), "application/apply-patch+yaml")

    def get(self, kind, name, namespace=None):
        return self.request("GET", self.path(kind, name, namespace), ok404=True)

    def token(self, namespace, sa, audience="istio-ca", seconds=3600):
        spec = {"expirationSeconds": seconds}
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        r = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token", body)
        return r["status"]["token"]


# ---------------------------------------------------------------- processes


class Procs:
    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, name, argv, cwd=None, env=None):
        logf = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, p))
        log(f"started {name} (pid {p.pid}), log {logf.name}")
        return p

    def check_alive(self):
        for name, p in self.procs:
            if p.poll() is not None:
                raise Failed(f"{name} exited with {p.returncode}; see {self.workdir}/{name}.log")

    def stop_all(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def http_get(url, timeout=5, headers=None, ctx=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
        return r.status, r.read()


# ---------------------------------------------------------------- the local applications


class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = f"hello from {self.server.app_name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_app(name):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    srv.daemon_threads = True
    srv.app_name = name
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# ---------------------------------------------------------------- the e2e


class E2E:
    def __init__(self, workdir, kube, istio_bin, meshid_bin, envoy_bin, istio_mod):
        self.workdir = workdir
        self.kube = kube
        self.istio_bin = istio_bin
        self.meshid_bin = meshid_bin
        self.envoy_bin = envoy_bin
        self.istio_mod = istio_mod
        self.procs = Procs(workdir)
        self.results = []
        self.ports = {}

    def check(self, name, fn):
        try:
            detail = fn()
            self.results.append((name, True))
            print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            self.results.append((name, False))
            print(f"FAIL {name}: {e}", flush=True)

    # -- set-up

    def install_crds(self):
        path = os.path.join(self.istio_mod, "manifests/charts/base/files/crd-all.gen.yaml")
        with open(path) as f:
            crds = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition"]
        for crd in crds:
            crd["metadata"].pop("creationTimestamp", None)
            self.kube.apply(crd)
        for crd in crds:
            name = crd["metadata"]["name"]
            wait_for(f"CRD {name} established", lambda n=name: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in (self.kube.get("CustomResourceDefinition", n) or {}).get("status", {}).get("conditions", [])))
        log(f"applied {len(crds)} Istio CRDs from {path}")

    def namespaces(self):
        for ns in [ISTIOD_NS, MESHID_NS, "e2e-a", "e2e-b", "e2e-c"]:
            self.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for w in WORKLOADS:
            self.kube.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                             "metadata": {"name": w, "namespace": f"e2e-{w}"}})

    def start_meshid(self):
        """meshid as `helm install meshid charts/meshid -n meshid-system` with MESHID_CHART_VALUES.

        The chart is rendered and applied to the harness (ServiceAccount, RBAC, ConfigMap,
        Service, Deployment). Nothing runs the Deployment's pod here, so this runs its container:
        `meshid server --config <the rendered config.yaml>` with the pod's credentials (a
        TokenRequest token of the chart's ServiceAccount) and the files the pod would mount given
        by flags, which take precedence over the file (listeners on loopback instead of 0.0.0.0).
        """
        d = os.path.join(self.workdir, "meshid")
        os.makedirs(d, exist_ok=True)
        # The mesh's root (istio-csr's root in docs/istio.md's migration) and meshid's signing CA,
        # an intermediate under it; the Secret as docs/istio.md creates it.
        def openssl(*args):
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "istio-root-key.pem", "-out", "istio-root.pem", "-days", "7",
                "-subj", f"/O={TRUST_DOMAIN}/CN=istio-e2e root CA",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "meshid-intermediate-key.pem", "-out", "meshid-intermediate.csr",
                "-subj", f"/O={TRUST_DOMAIN}/CN=meshid intermediate CA")
        with open(os.path.join(d, "intermediate.ext"), "w") as f:
            f.write("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        openssl("x509", "-req", "-in", "meshid-intermediate.csr", "-CA", "istio-root.pem", "-CAkey",
                "istio-root-key.pem", "-CAcreateserial", "-days", "7", "-extfile", "intermediate.ext",
                "-out", "meshid-intermediate.pem")
        openssl("pkcs8", "-topk8", "-nocrypt", "-in", "meshid-intermediate-key.pem",
                "-out", "meshid-intermediate-key.pk8.pem")
        ca = {}
        for key, name in [("tls.crt", "meshid-intermediate.pem"), ("tls.key", "meshid-intermediate-key.pk8.pem"),
                          ("ca.crt", "istio-root.pem")]:
            with open(os.path.join(d, name), "rb") as f:
                ca[key] = base64.b64encode(f.read()).decode()
        self.kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                         "metadata": {"name": "meshid-ca", "namespace": MESHID_NS}, "data": ca})
        # The Secret volume of the pod (mounted at /etc/meshid/ca).
        ca_dir = os.path.join(d, "etc/meshid/ca")
        os.makedirs(ca_dir, exist_ok=True)
        for key, b64 in ca.items():
            with open(os.path.join(ca_dir, key), "wb") as f:
                f.write(base64.b64decode(b64))

        objects = json.loads(subprocess.run(
            [os.environ["HELM_PYTHON"], os.path.join(HERE, "render_chart.py"), "meshid", MESHID_NS,
             json.dumps(CHART_VALUES)], check=True, capture_output=True, text=True).stdout)
        for o in objects:
            self.kube.apply(o)
        cm = next(o for o in objects if o["kind"] == "ConfigMap")
        os.makedirs(os.path.join(d, "etc/meshid/config"), exist_ok=True)
        config = os.path.join(d, "etc/meshid/config/config.yaml")
        with open(config, "w") as f:
            f.write(cm["data"]["config.yaml"])
        log(f"rendered the chart with {json.dumps(CHART_VALUES)}: {len(objects)} objects applied")

        # The pod's service-account credentials, as a kubeconfig.
        sa = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        kubeconfig = os.path.join(d, "kubeconfig")
        with open(kubeconfig, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "pod",
                "clusters": [{"name": "c", "cluster": {"server": self.kube.server,
                                                     "certificate-authority": self.kube.ca_path}}],
                "users": [{"name": "sa", "user": {"token": self.kube.token(MESHID_NS, sa, audience=None)}}],
                "contexts": [{"name": "pod", "context": {"cluster": "c", "user": "sa"}}]}, f)
        os.chmod(kubeconfig, 0o600)

        self.ports["meshid"] = free_port()
        self.ports["meshid_http"] = free_port()
        argv = [self.meshid_bin, "server", "--config", config,
                "--listen", f"127.0.0.1:{self.ports['meshid']}",
                "--http-listen", f"127.0.0.1:{self.ports['meshid_http']}",
                "--kubeconfig", kubeconfig,
                "--ca-cert", os.path.join(ca_dir, "tls.crt"),
                "--ca-key", os.path.join(ca_dir, "tls.key"),
                "--root-cert", os.path.join(ca_dir, "ca.crt")]
        self.procs.start("meshid", argv, cwd=d,
                         env={"POD_NAME": "meshid-e2e-0", "POD_NAMESPACE": MESHID_NS, "RUST_LOG": "info"})
        wait_for("meshid /readyz", lambda: http_get(f"http://127.0.0.1:{self.ports['meshid_http']}/readyz")[0] == 200)
        with open(os.path.join(d, "istio-root.pem")) as f:
            return f.read()

    def meshid_root(self, ca_pem):
        """istio-ca-root-cert in istio-system, once meshid has written its CA there."""
        def root():
            cm = self.kube.get("ConfigMap", "istio-ca-root-cert", ISTIOD_NS)
            return cm and cm["data"]["root-cert.pem"].strip() == ca_pem.strip() and cm["data"]["root-cert.pem"]
        return wait_for("meshid's root in istio-ca-root-cert of istio-system", root)

    def start_istiod(self, root):
        d = os.path.join(self.workdir, "istiod")
        tls = os.path.join(d, "var/run/secrets/istiod/tls")
        os.makedirs(tls, exist_ok=True)
        def secret():
            s = self.kube.get("Secret", "istiod-tls", ISTIOD_NS)
            return s and base64.b64decode(s["data"]["ca.crt"]).decode().strip() == root.strip() and s
        secret = wait_for("Secret istiod-tls written by meshid", secret, timeout=60)
        # What the kubelet does for the istiod chart's `istiod-tls` volume.
        for key in ["tls.crt", "tls.key", "ca.crt"]:
            with open(os.path.join(tls, key), "wb") as f:
                f.write(base64.b64decode(secret["data"][key]))
        for k in ["istiod_http", "istiod_grpc", "istiod_xds", "istiod_https", "istiod_mon", "istiod_ctrlz"]:
            self.ports[k] = free_port()
        mesh = {
            "trustDomain": TRUST_DOMAIN,
            "rootNamespace": ISTIOD_NS,
            "enableAutoMtls": True,
            "defaultConfig": {"discoveryAddress": f"127.0.0.1:{self.ports['istiod_xds']}"},
        }
        os.makedirs(os.path.join(d, "etc/istio/config"), exist_ok=True)
        with open(os.path.join(d, "etc/istio/config/mesh"), "w") as f:
            yaml.safe_dump(mesh, f)
        argv = [os.path.join(self.istio_bin, "pilot-discovery"), "discovery",
                "--kubeconfig", os.environ["MESHID_TEST_KUBECONFIG"],
                "--meshConfig", "./etc/istio/config/mesh",
                "--httpAddr", f"127.0.0.1:{self.ports['istiod_http']}",
                "--grpcAddr", f"127.0.0.1:{self.ports['istiod_grpc']}",
                "--secureGRPCAddr", f"127.0.0.1:{self.ports['istiod_xds']}",
                "--httpsAddr", f"127.0.0.1:{self.ports['istiod_https']}",
                "--monitoringAddr", f"127.0.0.1:{self.ports['istiod_mon']}",
                "--ctrlz_port", str(self.ports["istiod_ctrlz"]),
                "--tlsCertFile", os.path.join(tls, "tls.crt"),
                "--tlsKeyFile", os.path.join(tls, "tls.key"),
                "--caCertFile", os.path.join(tls, "ca.crt"),
                "--log_output_level", "default:info"]
        env = {"ENABLE_CA_SERVER": "false", "POD_NAMESPACE": ISTIOD_NS, "POD_NAME": "istiod-e2e-0",
               "REVISION": "default", "CLUSTER_ID": "Kubernetes", "PILOT_ENABLE_ANALYSIS": "false",
               "KUBECONFIG": os.environ["MESHID_TEST_KUBECONFIG"],
               # PyPI's Envoy is upstream Envoy, without istio/proxy's extensions (metadata
               # exchange, peer metadata, ALPN override, stats): istiod must not configure them.
               "PILOT_ENABLE_METADATA_EXCHANGE": "false", "PILOT_ENABLE_ALPN_FILTER": "false",
               "PILOT_DISABLE_MX_ALPN": "true"}
        self.procs.start("istiod", argv, cwd=d, env=env)
        wait_for("istiod /ready", lambda: http_get(f"http://127.0.0.1:{self.ports['istiod_http']}/ready")[0] == 200,
                 timeout=120)

    def mesh_config(self):
        def ns_obj(kind, ns, name, spec, **md):
            api = {"ServiceEntry": "networking.istio.io/v1", "WorkloadEntry": "networking.istio.io/v1",
                   "Sidecar": "networking.istio.io/v1", "PeerAuthentication": "security.istio.io/v1",
                   "AuthorizationPolicy": "security.istio.io/v1"}[kind]
            return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": ns, **md}, "spec": spec}

        objs = [ns_obj("PeerAuthentication", ISTIOD_NS, "default", {"mtls": {"mode": "STRICT"}})]
        for w, ip in WORKLOADS.items():
            ns = f"e2e-{w}"
            # What a VM's WorkloadGroup auto-registration (or a kubelet for a pod) would create.
            objs.append(ns_obj("WorkloadEntry", ns, w, {
                "address": ip, "serviceAccount": w,
                "labels": {"app": w, "security.istio.io/tlsMode": "istio"}}))
            sidecar = {
                "egress": [{"port": {"number": SERVICE_PORT, "protocol": "HTTP", "name": "http"},
                            "bind": ip, "captureMode": "NONE", "hosts": ["e2e-b/*"]}],
            }
            if w == "b":
                sidecar["ingress"] = [{"port": {"number": SERVICE_PORT, "protocol": "HTTP", "name": "http"},
                                       "bind": ip, "captureMode": "NONE",
                                       "defaultEndpoint": f"127.0.0.1:{self.ports['app_b']}"}]
                # b's egress listener would collide with its ingress one: give it another port.
                sidecar["egress"][0]["port"]["number"] = SERVICE_PORT + 1
            objs.append(ns_obj("Sidecar", ns, "default", sidecar))
        objs.append(ns_obj("ServiceEntry", "e2e-b", "b", {
            "hosts": [SERVICE_HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
            "ports": [{"number": SERVICE_PORT, "name": "http", "protocol": "HTTP"}],
            "workloadSelector": {"labels": {"app": "b"}}}))
        objs.append(ns_obj("AuthorizationPolicy", "e2e-b", "allow-a", {
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [f"{TRUST_DOMAIN}/ns/e2e-a/sa/a"]}}]}]}))
        for o in objs:
            self.kube.apply(o)

    def start_workload(self, w, root):
        ip = WORKLOADS[w]
        ns = f"e2e-{w}"
        d = os.path.join(self.workdir, f"workload-{w}")
        for sub in ["var/run/secrets/tokens", "var/run/secrets/istio", "var/lib/istio/envoy", "etc/istio/proxy"]:
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        # The projected token and the istio-ca-root-cert ConfigMap, as the kubelet mounts them.
        with open(os.path.join(d, "var/run/secrets/tokens/istio-token"), "w") as f:
            f.write(self.kube.token(ns, w))
        def ns_root():
            cm = self.kube.get("ConfigMap", "istio-ca-root-cert", ns)
            return cm and cm["data"]["root-cert.pem"].strip() == root.strip() and cm["data"]["root-cert.pem"]
        with open(os.path.join(d, "var/run/secrets/istio/root-cert.pem"), "w") as f:
            f.write(wait_for(f"meshid's root in istio-ca-root-cert of {ns}", ns_root))
        # Istio's own bootstrap template, with its wildcard listeners (Prometheus, health) bound to
        # the workload's loopback address instead of 0.0.0.0.
        with open(os.path.join(self.istio_mod, "tools/packaging/common/envoy_bootstrap.json")) as f:
            tmpl = f.read().replace("{{ .wildcard }}", ip)
        with open(os.path.join(d, "var/lib/istio/envoy/envoy_bootstrap_tmpl.json"), "w") as f:
            f.write(tmpl)
        ports = {k: free_port() for k in ["admin", "status", "envoy_status", "prom"]}
        self.ports[w] = ports
        proxy_config = {
            "discoveryAddress": f"127.0.0.1:{self.ports['istiod_xds']}",
            "binaryPath": self.envoy_bin,
            "configPath": "./etc/istio/proxy",
            "proxyAdminPort": ports["admin"],
            "statusPort": ports["status"],
            "controlPlaneAuthPolicy": "MUTUAL_TLS",
            # Istio keeps only some Envoy stats by default; the checks read the TLS ones.
            "proxyStatsMatcher": {"inclusionRegexps": [r".*\.ssl\..*"]},
        }
        env = {
            "PROXY_CONFIG": json.dumps(proxy_config),
            "CA_ADDR": f"127.0.0.1:{self.ports['meshid']}",
            "ISTIOD_SAN": f"istiod.{ISTIOD_NS}.svc",
            "POD_NAME": f"{w}-vm", "POD_NAMESPACE": ns, "SERVICE_ACCOUNT": w,
            "INSTANCE_IP": ip,
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
            "ISTIO_META_INTERCEPTION_MODE": "NONE",
            "ISTIO_META_WORKLOAD_NAME": w,
            "ISTIO_METAJSON_LABELS": json.dumps({"app": w}),
            "TRUST_DOMAIN": TRUST_DOMAIN,
            "ENVOY_STATUS_PORT": str(ports["envoy_status"]),
            "ENVOY_PROMETHEUS_PORT": str(ports["prom"]),
            "PROXY_XDS_DEBUG_VIA_AGENT": "false",
            "SECRET_TTL": f"{SVID_TTL_SECS}s",
        }
        argv = [os.path.join(self.istio_bin, "pilot-agent"), "proxy", "sidecar", "--concurrency", "1"]
        self.procs.start(f"agent-{w}", argv, cwd=d, env=env)

    def admin(self, w, path):
        return http_get(f"http://127.0.0.1:{self.ports[w]['admin']}{path}")[1].decode()

    def wait_envoy_ready(self, w):
        def ready():
            status, body = http_get(f"http://127.0.0.1:{self.ports[w]['admin']}/ready")
            return status == 200 and b"LIVE" in body
        wait_for(f"Envoy of {w} LIVE", ready, timeout=90)

    # -- observations

    def certs(self, w):
        """(serial, spiffe uri, expiration) of the workload cert Envoy holds, from /certs."""
        data = json.loads(self.admin(w, "/certs"))
        out = []
        for c in data.get("certificates", []):
            for cc in c.get("cert_chain", []):
                uris = [s["uri"] for s in cc.get("subject_alt_names", []) if "uri" in s]
                if uris:
                    out.append((cc["serial_number"], uris[0], cc.get("expiration_time")))
        return out

    def stats(self, w, pattern):
        text = self.admin(w, "/stats?filter=" + urllib.parse.quote(pattern))
        return {k: int(v) for k, v in (line.split(": ", 1) for line in text.splitlines() if ": " in line)
                if v.strip().isdigit()}

    def call_b(self, w, timeout=5):
        """GET through w's egress listener to b's service; (status, body)."""
        url = f"http://{WORKLOADS[w]}:{SERVICE_PORT}/"
        try:
            return http_get(url, timeout=timeout, headers={"Host": SERVICE_HOST})
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def main():
    workdir = os.environ.get("ISTIO_E2E_WORKDIR") or tempfile.mkdtemp(prefix="istio-e2e-")
    os.makedirs(workdir, exist_ok=True)
    kube = Kube(os.environ["MESHID_TEST_KUBECONFIG"], workdir)
    e = E2E(workdir, kube, os.environ["ISTIO_E2E_BIN"], os.environ["MESHID_BIN"], os.environ["ENVOY_BIN"],
            os.environ["ISTIO_MODULE_DIR"])
    log(f"work dir {workdir}")
    try:
        run(e)
    except Exception as ex:  # noqa: BLE001
        e.results.append(("set-up", False))
        print(f"FAIL set-up: {ex}", flush=True)
    finally:
        e.procs.stop_all()
    passed = sum(1 for _, ok in e.results if ok)
    failed = len(e.results) - passed
    print(f"istio-e2e: {passed} passed, {failed} failed", flush=True)
    sys.exit(0 if failed == 0 else 1)


def run(e):
    e.install_crds()
    e.namespaces()
    ca_pem = e.start_meshid()
    root = e.meshid_root(ca_pem)
    e.start_istiod(root)
    app_b = start_app("b")
    e.ports["app_b"] = app_b.server_address[1]
    e.mesh_config()
    for w in WORKLOADS:
        e.start_workload(w, root)
    for w in WORKLOADS:
        e.wait_envoy_ready(w)
    e.procs.check_alive()
    run_checks(e, root)


def x509(pem_text, *args):
    return subprocess.run(["openssl", "x509", "-noout", *args], input=pem_text.encode(), capture_output=True,
                          check=True).stdout.decode()


def verify_chain(root_pem, chain_pem, workdir):
    """openssl verify of a leaf (first PEM of chain_pem) against root_pem, intermediates in between."""
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", chain_pem, re.S)
    d = tempfile.mkdtemp(dir=workdir)
    paths = {}
    for name, text in [("root", root_pem), ("leaf", pems[0] + "\n"), ("untrusted", "\n".join(pems[1:]) + "\n")]:
        paths[name] = os.path.join(d, name + ".pem")
        with open(paths[name], "w") as f:
            f.write(text)
    argv = ["openssl", "verify", "-CAfile", paths["root"]]
    if len(pems) > 1:
        argv += ["-untrusted", paths["untrusted"]]
    r = subprocess.run(argv + [paths["leaf"]], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def peer_chain(host, port, server_name, client_cert=None):
    """The certificate chain a TLS server presents (PEM), without verifying it."""
    r = subprocess.run(["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", server_name,
                        "-showcerts", "-alpn", "h2"], input=b"", capture_output=True, timeout=20)
    return "\n".join(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", r.stdout.decode(errors="replace"), re.S))


def run_checks(e, root):
    spiffe = {w: f"spiffe://{TRUST_DOMAIN}/ns/e2e-{w}/sa/{w}" for w in WORKLOADS}

    def istiod_xds_cert():
        # The certificate istiod serves on its xDS port is the one meshid keeps in istiod-tls,
        # and it verifies against meshid's root for the name the agents check (ISTIOD_SAN).
        chain = peer_chain("127.0.0.1", e.ports["istiod_xds"], f"istiod.{ISTIOD_NS}.svc")
        secret = e.kube.get("Secret", "istiod-tls", ISTIOD_NS)
        served = x509(chain, "-fingerprint", "-sha256")
        kept = x509(base64.b64decode(secret["data"]["tls.crt"]).decode(), "-fingerprint", "-sha256")
        if served != kept:
            raise Failed(f"istiod serves {served.strip()}, the Secret holds {kept.strip()}")
        ctx = ssl.create_default_context(cadata=root)
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", e.ports["istiod_xds"]), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname=f"istiod.{ISTIOD_NS}.svc") as t:
                pass
        other = ssl.create_default_context()  # the system roots: must not accept it
        try:
            with socket.create_connection(("127.0.0.1", e.ports["istiod_xds"]), timeout=10) as s:
                with other.wrap_socket(s, server_hostname=f"istiod.{ISTIOD_NS}.svc"):
                    raise Failed("istiod's certificate also verified against the system roots")
        except ssl.SSLCertVerificationError:
            pass
        return f"served cert = istiod-tls ({kept.split('=')[1].strip()[:23]}...), verifies against meshid's root"

    e.check("istiod serves the certificate meshid keeps in istiod-tls, which verifies against meshid's root",
            istiod_xds_cert)

    def agents_connected():
        # Each agent's xDS stream to istiod is up (it verifies istiod against
        # ./var/run/secrets/istio/root-cert.pem, meshid's root): Envoy has istiod's listeners.
        out = []
        for w in WORKLOADS:
            dump = json.loads(e.admin(w, "/config_dump?resource=dynamic_listeners"))
            names = [c["active_state"]["listener"]["name"] for c in dump.get("configs", []) if "active_state" in c]
            if not names:
                raise Failed(f"{w}'s Envoy has no listeners from istiod")
            out.append(f"{w}: {','.join(sorted(names))}")
        syncz = json.loads(http_get(f"http://127.0.0.1:{e.ports['istiod_http']}/debug/syncz")[1])
        ids = sorted(p.get("proxy", "") for p in syncz)
        for w in WORKLOADS:
            if not any(i.startswith(f"{w}-vm.e2e-{w}") for i in ids):
                raise Failed(f"istiod lists no proxy for {w}: {ids}")
        return "; ".join(out)

    e.check("each pilot-agent holds an xDS stream to istiod over TLS verified against meshid's root",
            lambda: wait_for("listeners from istiod", agents_connected, timeout=60))

    def svids():
        out = []
        for w in WORKLOADS:
            certs = wait_for(f"{w}'s SVID in Envoy", lambda w=w: e.certs(w), timeout=60)
            serial, uri, exp = certs[0]
            if uri != spiffe[w]:
                raise Failed(f"{w}'s Envoy holds {uri}, expected {spiffe[w]}")
            cfg = json.loads(e.admin(w, "/config_dump?resource=dynamic_active_secrets"))
            chain = None
            for s in cfg.get("configs", []):
                if s.get("name") == "default":
                    tc = s["secret"]["tls_certificate"]["certificate_chain"]
                    chain = base64.b64decode(tc["inline_bytes"]).decode() if "inline_bytes" in tc else None
            if chain is None:
                raise Failed(f"{w}'s Envoy has no `default` secret in its config dump")
            ok, msg = verify_chain(root, chain, e.workdir)
            if not ok:
                raise Failed(f"{w}'s SVID does not verify against meshid's root: {msg}")
            out.append(f"{w}={uri} serial {serial}")
        return "; ".join(out)

    e.check("every Envoy holds a meshid-issued SPIFFE SVID that verifies against meshid's root", svids)

    def a_to_b():
        before = e.stats("b", "ssl.handshake")
        status, body = wait_for("a -> b 200", lambda: (lambda r: r if r[0] == 200 else None)(e.call_b("a")),
                                timeout=60)
        if body != b"hello from b\n":
            raise Failed(f"unexpected body {body!r}")
        after = e.stats("b", "ssl.handshake")
        grew = [k for k, v in after.items() if v > before.get(k, 0)]
        if not grew:
            raise Failed(f"no TLS handshake counted on b: {after}")
        # Istio names the cluster's stats `cluster.outbound|<port>||<host>;.ssl.*`.
        a_stats = e.stats("a", re.escape(f"outbound|{SERVICE_PORT}||{SERVICE_HOST}") + r".*\.ssl\.handshake$")
        if sum(a_stats.values()) == 0:
            raise Failed(f"a's cluster to b made no TLS handshake: {a_stats}")
        return f"HTTP {status}; b: {', '.join(grew)}; a: {a_stats}"

    e.check("a reaches b over mTLS with the SVIDs meshid issued", a_to_b)

    def c_denied():
        status, body = e.call_b("c")
        if status != 403:
            raise Failed(f"c got HTTP {status} {body[:200]!r}, expected 403")
        denied = e.stats("b", "rbac")
        return f"HTTP 403 ({body.decode(errors='replace').strip()}); b's rbac stats: {denied}"

    e.check("c, a third identity, is denied by b's AuthorizationPolicy", c_denied)

    def rotation_under_load():
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        errors = []

        def load():
            while not stop.is_set():
                status, _ = e.call_b("a")
                if status == 200:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    errors.append(status)

        def load_safe():
            while not stop.is_set():
                try:
                    load()
                except Exception as ex:  # noqa: BLE001 - a transport error is a failed request
                    counts["failed"] += 1
                    errors.append(str(ex))

        threads = [threading.Thread(target=load_safe, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        seen = {w: {e.certs(w)[0][0]} for w in ("a", "b")}
        start = time.monotonic()
        try:
            while any(len(s) < ROTATIONS + 1 for s in seen.values()):
                if time.monotonic() - start > SVID_TTL_SECS * (ROTATIONS + 2):
                    raise Failed(f"serials seen: { {w: sorted(s) for w, s in seen.items()} }")
                for w in seen:
                    for c in e.certs(w):
                        seen[w].add(c[0])
                time.sleep(0.5)
            time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
        if counts["failed"]:
            raise Failed(f"{counts['failed']} of {counts['ok'] + counts['failed']} requests failed: {errors[:5]}")
        rot = {w: len(s) - 1 for w, s in seen.items()}
        return (f"{rot['a']} rotations of a's SVID and {rot['b']} of b's (lifetime {SVID_TTL_SECS}s) in "
                f"{time.monotonic() - start:.0f}s; {counts['ok']} requests, 0 failed")

    e.check(f"with {SVID_TTL_SECS}s SVIDs, a's and b's certificates rotate at least {ROTATIONS} times "
            "under load with no failed request", rotation_under_load)


if __name__ == "__main__":
    main()

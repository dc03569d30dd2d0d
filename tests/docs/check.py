#!/usr/bin/env python3
"""Checks that the YAML and the marked shell commands printed in docs/*.md work as printed.
Run through tests/docs/check.sh.

Every fenced ```yaml block in docs/*.md is one of three kinds, told apart by its content:

- an Envoy bootstrap (it has `static_resources`): `envoy --mode validate -c FILE` must accept it;
- Kubernetes objects (each document has `apiVersion` and `kind`): kubernetes-validate --strict
  (Kubernetes 1.33 and 1.35) must accept each, then the test apiserver in a server-side dry-run
  apply (MESHID_TEST_KUBECONFIG, see tests/kube-harness/run.sh). Kinds without a schema (CRDs
  such as Istio's) are reported as skipped with the reason, for each of the two checks;
- Helm values for charts/meshid (every top-level key is one of the chart's values): the chart is
  rendered with them and every object validated as above.

A YAML block of any other kind fails the check: add a checker here for it.

Shell blocks marked with an HTML comment on the line before the fence are run as printed:

    <!-- doc-test: run; output contains: TEXT, TEXT -->

with bash -e in a fresh network, PID and mount namespace (so fixed loopback ports and the
daemons the commands start go away with it), with the release `meshid` (--meshid) and `envoy`
on PATH. Each TEXT must appear in what they print. Blocks of the same page marked
`<!-- doc-test: file PATH -->` are written to PATH first, as the page tells its reader to do;
each such directory is a private, empty tmpfs in the run's mount namespace.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]


def _load_helm_check() -> Any:
    """tests/helm/check.py: chart rendering, Results, Cluster (loaded by path: same file name)."""
    spec = importlib.util.spec_from_file_location("helm_check", REPO / "tests" / "helm" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["helm_check"] = module
    spec.loader.exec_module(module)
    return module


helm_check = _load_helm_check()
CheckError, Results, expect = helm_check.CheckError, helm_check.Results, helm_check.expect

DOCS = REPO / "docs"
KUBE_VERSIONS = helm_check.KUBE_VERSIONS
FIELD_MANAGER = "meshid-docs-test"
RUN_TIMEOUT_S = 180
MESHID_IMAGE = "ghcr.io/meshid/meshid"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<lang>[\w+-]*)[^`]*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<what>.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None  # the doc-test marker on the line before the fence, if any

    @property
    def where(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file, including ones indented inside list items."""
    lines = path.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks = len(m["indent"]), m["ticks"]
        prev = lines[i - 1] if i > 0 else ""
        marker = MARKER.match(prev)
        body = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{ticks}`*\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        found.append(Block(path, i + 1, m["lang"].lower(), "\n".join(body) + "\n",
                           marker["what"] if marker else None))
        i = j + 1
    return found


# --------------------------------------------------------------------------------------------
# YAML blocks


def chart_value_keys() -> set[str]:
    return set(yaml.safe_load((helm_check.CHART / "values.yaml").read_text()))


def classify(docs: list[Any], value_keys: set[str]) -> str | None:
    if len(docs) == 1 and isinstance(docs[0], dict) and "static_resources" in docs[0]:
        return "envoy"
    if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
        return "kubernetes"
    if len(docs) == 1 and isinstance(docs[0], dict) and docs[0] and set(docs[0]) <= value_keys:
        return "helm-values"
    return None


def containers(o: dict[str, Any]) -> list[dict[str, Any]]:
    spec = o.get("spec") or {}
    spec = (spec.get("template") or {}).get("spec", spec)
    return [c for key in ("initContainers", "containers") for c in spec.get(key) or []]


def check_meshid_images(objects: list[dict[str, Any]]) -> None:
    """Images of ours that the docs name are ones the Dockerfile builds, at the chart's version."""
    version = helm_check.app_version()
    ours = {f"{MESHID_IMAGE}:{version}", f"{MESHID_IMAGE}:{version}-agent"}
    named = [c["image"] for o in objects for c in containers(o) if c.get("image", "").startswith(MESHID_IMAGE)]
    wrong = [i for i in named if i not in ours]
    expect(not wrong, f"{wrong}: the images docs/image.md builds are {sorted(ours)}")


def envoy_validate(block: Block, scratch: Path) -> None:
    file = scratch / f"envoy-{block.path.stem}-{block.line}.yaml"
    file.write_text(block.text)
    proc = subprocess.run(["envoy", "--mode", "validate", "-c", str(file), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip()
    expect(proc.returncode == 0 and f"configuration '{file}' OK" in out,
           f"envoy --mode validate exited {proc.returncode}:\n{out}")


def schema_check(results: Results, name: str, objects: list[dict[str, Any]]) -> None:
    for o in objects:
        what = f"{name} {o['kind']}/{o.get('metadata', {}).get('name') or '(unnamed)'}"
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                results.skip(f"{what} kubernetes-validate {version}",
                             f"no schema for {o['apiVersion']} {o['kind']} (a CRD kind)")
                continue
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                results.check(f"{what} kubernetes-validate {version}",
                              lambda path=path, e=e: expect(False, f"{path}: {e.message}"))
                continue
            results.check(f"{what} kubernetes-validate {version}", lambda: None)


class DryRun:
    """Server-side dry-run apply on the test apiserver, each page's objects in a scratch namespace
    (the objects' own namespace is replaced), with the ServiceAccounts their pods name."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client as k8s
        from kubernetes.dynamic import DynamicClient

        self.k8s = k8s
        self.cluster = helm_check.Cluster(kubeconfig)
        self.dyn = DynamicClient(self.cluster.admin)
        self.namespaces: list[str] = []

    def namespace(self) -> str:
        name = f"docs-test-{os.getpid()}-{len(self.namespaces)}"
        self.cluster.create_namespace(name)
        self.namespaces.append(name)
        return name

    def resource(self, o: dict[str, Any]) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            return self.dyn.resources.get(api_version=o["apiVersion"], kind=o["kind"])
        except ResourceNotFoundError:
            return None

    def apply(self, results: Results, name: str, objects: list[dict[str, Any]]) -> None:
        ns = None
        for o in objects:
            what = f"{name} {o['kind']}/{o.get('metadata', {}).get('name') or '(unnamed)'} server-side dry-run"
            res = self.resource(o)
            if res is None:
                results.skip(what, f"the test apiserver has no {o['apiVersion']} {o['kind']} (a CRD kind)")
                continue
            body = dict(o, metadata=dict(o.get("metadata", {})))
            if res.namespaced:
                ns = ns or self.namespace()
                body["metadata"]["namespace"] = ns
                self.prerequisites(body, ns)
            results.check(what, lambda res=res, body=body: self.dry_run(res, body))

    def prerequisites(self, o: dict[str, Any], ns: str) -> None:
        """The ServiceAccount a pod (template) names must exist for the pod to be admitted."""
        spec = o.get("spec", {})
        spec = spec.get("template", {}).get("spec", spec)
        sa = spec.get("serviceAccountName")
        if sa:
            body = self.k8s.V1ServiceAccount(metadata=self.k8s.V1ObjectMeta(name=sa))
            try:
                self.k8s.CoreV1Api(self.cluster.admin).create_namespaced_service_account(ns, body)
            except self.k8s.rest.ApiException as e:
                if e.status != 409:
                    raise

    def dry_run(self, res: Any, body: dict[str, Any]) -> None:
        try:
            res.server_side_apply(body=body, namespace=body["metadata"].get("namespace"),
                                  field_manager=FIELD_MANAGER, dry_run="All")
        except Exception as e:  # noqa: BLE001
            raise CheckError(f"apiserver refused: {getattr(e, 'body', None) or e}") from e

    def cleanup(self) -> None:
        for ns in self.namespaces:
            self.k8s.CoreV1Api(self.cluster.admin).delete_namespace(ns)


def check_yaml_block(results: Results, block: Block, value_keys: set[str], scratch: Path,
                     dry: DryRun | None) -> None:
    try:
        docs = [d for d in yaml.safe_load_all(block.text) if d is not None]
    except yaml.YAMLError as e:
        results.check(f"{block.where} parses as YAML", lambda e=e: expect(False, str(e)))
        return
    kind = classify(docs, value_keys)
    if kind is None:
        results.check(f"{block.where} is an Envoy bootstrap, Kubernetes objects or chart values",
                      lambda: expect(False, "unknown kind of YAML: add a checker to tests/docs/check.py"))
    elif kind == "envoy":
        results.check(f"{block.where} Envoy bootstrap: envoy --mode validate",
                      lambda: envoy_validate(block, scratch))
    else:
        if kind == "kubernetes":
            objects = docs
        else:
            objects = results.value(f"{block.where} chart values render charts/meshid",
                                    lambda: helm_check.render(docs[0], name=helm_check.RELEASE_NAME,
                                                              namespace=helm_check.RELEASE_NAMESPACE))
            if objects is helm_check._FAILED:
                return
        schema_check(results, block.where, objects)
        if any(c.get("image", "").startswith(MESHID_IMAGE) for o in objects for c in containers(o)):
            results.check(f"{block.where} names meshid images that docs/image.md builds",
                          lambda: check_meshid_images(objects))
        if dry is not None:
            dry.apply(results, block.where, objects)


# --------------------------------------------------------------------------------------------
# Shell blocks


def parse_run_marker(marker: str) -> list[str] | None:
    """`run; output contains: A, B` → ["A", "B"]; None when the marker is not a run marker."""
    head, _, rest = marker.partition(";")
    if head.strip() != "run":
        return None
    rest = rest.strip()
    if not rest:
        return []
    key, _, values = rest.partition(":")
    expect(key.strip() == "output contains", f"unknown doc-test option {rest!r}")
    return [v.strip() for v in values.split(",") if v.strip()]


def run_block(block: Block, files: dict[str, str], expected: list[str], path_dir: Path) -> None:
    """Runs `block` as printed with bash -e in its own network, PID and mount namespaces."""
    setup_lines = ["set -eu", "ip link set lo up"]
    # The directories of the page's files are private (an empty tmpfs each), so runs do not see
    # each other's or a reader's files there.
    for d in sorted({str(Path(dest).parent) for dest in files}):
        setup_lines.append(f"mkdir -p {sh_quote(d)} && mount -t tmpfs tmpfs {sh_quote(d)}")
    with tempfile.TemporaryDirectory(prefix="meshid-docs-") as tmp:
        staged = Path(tmp)
        for i, (dest, text) in enumerate(files.items()):
            src = staged / f"file-{i}"
            src.write_text(text)
            setup_lines.append(f"cp {sh_quote(str(src))} {sh_quote(dest)}")
        script = staged / "block.sh"
        script.write_text(block.text)
        setup_lines.append(f"cd / && exec bash -e {sh_quote(str(script))}")
        env = dict(os.environ, PATH=f"{path_dir}:{os.environ['PATH']}")
        proc = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount", "--kill-child",
                               "bash", "-c", "\n".join(setup_lines)],
                              capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    expect(proc.returncode == 0, f"exited {proc.returncode}; output:\n{out}")
    missing = [e for e in expected if e not in proc.stdout]
    expect(not missing, f"output lacks {missing}; output:\n{out}")
    print("\n".join(f"     | {line}" for line in proc.stdout.splitlines()))


def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshid", type=Path, required=True, help="the meshid binary the shell blocks run")
    parser.add_argument("pages", nargs="*", type=Path, help="Markdown files (default: docs/*.md)")
    args = parser.parse_args()
    pages = [p.resolve() for p in args.pages] or sorted(DOCS.glob("*.md"))

    results = Results()
    for tool in ("envoy", "unshare", "ip", "curl"):
        if shutil.which(tool) is None:
            results.check(f"{tool} is on PATH", lambda tool=tool: expect(False, f"{tool} not found"))
    if results.failed:
        return 1
    kubeconfig = os.environ.get("MESHID_TEST_KUBECONFIG")
    dry = DryRun(kubeconfig) if kubeconfig else None
    if dry is None:
        how = 'start it with `eval "$(tests/kube-harness/run.sh up)"`'
        if os.environ.get("CI") in ("true", "1"):
            results.check("apiserver", lambda: expect(False, f"MESHID_TEST_KUBECONFIG is not set and CI=true: {how}"))
        else:
            results.skip("server-side dry-runs", f"MESHID_TEST_KUBECONFIG is not set; {how}")

    value_keys = chart_value_keys()
    counts = {"yaml": 0, "run": 0}
    with tempfile.TemporaryDirectory(prefix="meshid-docs-") as scratch_dir:
        scratch = Path(scratch_dir)
        bin_dir = scratch / "bin"
        bin_dir.mkdir()
        (bin_dir / "meshid").symlink_to(args.meshid.resolve())
        try:
            for page in pages:
                page_blocks = blocks(page)
                files = {}
                for b in page_blocks:
                    if b.marker and b.marker.startswith("file "):
                        files[b.marker.removeprefix("file ").strip()] = b.text
                for b in page_blocks:
                    if b.lang in ("yaml", "yml"):
                        counts["yaml"] += 1
                        check_yaml_block(results, b, value_keys, scratch, dry)
                    if b.marker is None:
                        continue
                    expected = parse_run_marker(b.marker)
                    if expected is None:
                        continue
                    counts["run"] += 1
                    results.check(f"{b.where} runs as printed",
                                  lambda b=b, expected=expected, files=files: run_block(b, files, expected, bin_dir))
        finally:
            if dry is not None:
                dry.cleanup()

    print(f"{counts['yaml']} YAML blocks, {counts['run']} shell blocks run, in {len(pages)} pages")
    if results.failed:
        print("failed:\n  " + "\n  ".join(results.failed))
    print(f"docs: {results.passed} passed, {len(results.failed)} failed"
          + (f", {len(results.skipped)} skipped" if results.skipped else ""))
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())

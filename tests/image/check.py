#!/usr/bin/env python3
"""Checks meshid's container image without a container engine. Run through tests/image/check.sh.

1. Runs the block of docs/image.md marked `<!-- doc-test: run by tests/image/check.sh -->` as
   printed, from the repository root: it builds the full image (and the agent image, when the
   block has a `build.sh --agent` line) with tests/image/build.sh (crane, no daemon).
2. For each image: reads the image config from the tarball (user 65532:65532, entrypoint
   /usr/local/bin/meshid, the agent image's cmd `agent`, linux/amd64), unpacks its root
   filesystem with `crane export`, and runs the entrypoint from it as a container runtime would:
   chrooted, as the config's user. `--version` must print the Cargo version; the full image must
   complete `meshid quickstart` (files it writes must belong to uid 65532); the agent image must
   run `meshid agent --help` and refuse `quickstart`.
3. The Dockerfile says the same (stages, user, entrypoint, bases, --locked), and the Helm chart's
   default image is this one: `image.repository` ghcr.io/meshid/meshid, tag = appVersion = the
   Cargo version, which docs/image.md names.

Needs root (chroot), python3, and what tests/image/build.sh needs (Go, cargo).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "image.md"
MARKER = "<!-- doc-test: run by tests/image/check.sh -->"
REPOSITORY = "ghcr.io/meshid/meshid"
USER = "65532:65532"
ENTRYPOINT = ["/usr/local/bin/meshid"]
CRANE_VERSION = "v0.22.1"


class CheckError(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def check(self, name: str, fn: Callable[[], Any]) -> bool:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.failed.append(name)
            detail = str(e) if isinstance(e, CheckError) else traceback.format_exc()
            print(f"FAIL {name}: {detail.strip()}", flush=True)
            return False
        self.passed += 1
        print(f"ok   {name}", flush=True)
        return True


def cargo_version() -> str:
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def marked_block() -> str:
    lines = DOC.read_text().splitlines()
    idx = [i for i, line in enumerate(lines) if line.strip() == MARKER]
    expect(len(idx) == 1, f"{DOC.name}: expected one {MARKER!r}, found {len(idx)}")
    start = idx[0] + 1
    expect(lines[start].strip() == "```sh", f"{DOC.name}: the marker must precede a ```sh block")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
    return "\n".join(lines[start + 1:end]) + "\n"


def image_config(tarball: Path) -> tuple[list[str], dict[str, Any]]:
    """The tags and config of the one image in a docker-style tarball (manifest.json)."""
    with tarfile.open(tarball) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        expect(len(manifest) == 1, f"{tarball.name}: {len(manifest)} images, expected 1")
        return manifest[0]["RepoTags"], json.load(tar.extractfile(manifest[0]["Config"]))


def unpack(crane: Path, tarball: Path, dest: Path) -> None:
    """Unpacks the image's root filesystem (its layers flattened by `crane export`)."""
    flat = dest.with_suffix(".rootfs.tar")
    with tarball.open("rb") as stdin:
        subprocess.run([str(crane), "export", "-", str(flat)], stdin=stdin, check=True)
    dest.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpf", str(flat), "-C", str(dest)], check=True)
    flat.unlink()


def run_in(root: Path, config: dict[str, Any], args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs the image's entrypoint with `args` (instead of its cmd) like a runtime: chrooted
    into the root filesystem, as the config's user, with the config's environment only."""
    c = config["config"]
    env = dict(e.split("=", 1) for e in c.get("Env") or [])
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    cmd = [chroot, f"--userspec={c['User']}", str(root), *c["Entrypoint"], *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def check_config(config: dict[str, Any], agent: bool) -> None:
    c = config.get("config") or {}
    expect(config.get("os") == "linux" and config.get("architecture") == "amd64",
           f"platform {config.get('os')}/{config.get('architecture')}")
    expect(c.get("User") == USER, f"User {c.get('User')!r}, want {USER!r}")
    expect(c.get("Entrypoint") == ENTRYPOINT, f"Entrypoint {c.get('Entrypoint')!r}")
    want_cmd = ["agent"] if agent else None
    expect(c.get("Cmd") == want_cmd, f"Cmd {c.get('Cmd')!r}, want {want_cmd!r}")


def check_version(root: Path, config: dict[str, Any]) -> None:
    p = run_in(root, config, ["--version"])
    expect(p.returncode == 0 and p.stdout.strip() == f"meshid {cargo_version()}",
           f"exit {p.returncode}, stdout {p.stdout!r}, stderr {p.stderr!r}")


def check_quickstart(root: Path, config: dict[str, Any]) -> None:
    p = run_in(root, config, ["quickstart", "--dir", "/tmp/quickstart"])
    out = p.stdout + p.stderr
    expect(p.returncode == 0, f"exit {p.returncode}: {out}")
    for want in ("issued an SVID", "spiffe://cluster.local/ns/default/sa/quickstart",
                 "verified against the root"):
        expect(want in p.stdout, f"output lacks {want!r}: {out}")
    owners = {f.stat().st_uid for f in (root / "tmp" / "quickstart").rglob("*")}
    expect(owners == {65532}, f"files the quickstart wrote belong to uids {owners}, want 65532")
    print("\n".join(f"     | {line}" for line in p.stdout.splitlines()))


def check_agent_only(root: Path, config: dict[str, Any]) -> None:
    p = run_in(root, config, ["agent", "--help"])
    expect(p.returncode == 0 and "--sds-socket" in p.stdout, f"agent --help: exit {p.returncode}: {p.stderr}")
    p = run_in(root, config, ["quickstart"])
    expect(p.returncode != 0 and "quickstart" in p.stderr,
           f"the agent-only binary ran `quickstart`: exit {p.returncode}")


def check_rootfs_contents(root: Path) -> None:
    """Nothing but the binary, its libraries, passwd/group and /tmp; owned by root, /tmp 1777."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    unexpected = [f for f in files if not (f == "usr/local/bin/meshid" or f in ("etc/passwd", "etc/group")
                                           or re.fullmatch(r"(usr/)?lib(64|/x86_64-linux-gnu)/[^/]+\.so[.\d]*", f))]
    expect(not unexpected, f"unexpected files in the image: {unexpected}")
    expect("lib64/ld-linux-x86-64.so.2" in files, f"no dynamic loader in {files}")
    owners = {p.stat().st_uid for p in root.rglob("*")}
    expect(owners == {0}, f"owners {owners}")
    expect((root / "tmp").stat().st_mode & 0o7777 == 0o1777, "/tmp is not 1777")
    passwd = (root / "etc" / "passwd").read_text()
    expect("nonroot:x:65532:65532:" in passwd, f"/etc/passwd: {passwd}")


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name → its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.I)
        if m:
            current = m[2] or f"stage{len(stages)}"
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def check_dockerfile() -> None:
    stages = dockerfile_stages()
    names = list(stages)
    expect(names[-1] == "meshid", f"the last (default) stage is {names[-1]!r}, want 'meshid'")
    expect("agent" in stages, "no `agent` target")
    for name, want_build in (("meshid", "cargo build --release --locked"),
                             ("agent", "cargo build --profile agent --no-default-features --locked")):
        stage = stages[name]
        expect(stage[0].startswith("FROM gcr.io/distroless/cc-debian12:nonroot"), f"{name}: {stage[0]}")
        expect(f"USER {USER}" in stage, f"{name}: no USER {USER}")
        expect(f"ENTRYPOINT {json.dumps(ENTRYPOINT)}" in stage, f"{name}: entrypoint")
        copy = [i for i in stage if i.startswith("COPY --from=")]
        expect(len(copy) == 1 and copy[0].endswith(" /usr/local/bin/meshid"), f"{name}: {copy}")
        builder = stages[copy[0].split()[1].removeprefix("--from=")]
        expect(re.match(r"FROM rust:1\.\d+-bookworm ", builder[0]) is not None,
               f"{name}: builder {builder[0]} is not Debian 12 (bookworm) like the runtime base")
        expect(any(want_build in i for i in builder), f"{name}: builder does not run {want_build!r}")
    expect('CMD ["agent"]' in stages["agent"], "agent: no CMD [\"agent\"]")


def check_chart_default_image() -> None:
    values = (REPO / "charts" / "meshid" / "values.yaml").read_text()
    chart = (REPO / "charts" / "meshid" / "Chart.yaml").read_text()
    expect(re.search(rf"^  repository: {re.escape(REPOSITORY)}$", values, re.M) is not None,
           f"values.yaml image.repository is not {REPOSITORY}")
    expect(re.search(r'^  tag: ""$', values, re.M) is not None, "values.yaml image.tag is not empty (appVersion)")
    app = re.search(r'^appVersion: "?([^"\n]+)"?$', chart, re.M)
    expect(app is not None and app[1] == cargo_version(),
           f"Chart appVersion {app and app[1]} differs from the Cargo version {cargo_version()}")
    expect(f"{REPOSITORY}:{cargo_version()}" in DOC.read_text(), f"{DOC.name} does not name {REPOSITORY}:{cargo_version()}")


def main() -> int:
    results = Results()
    crane = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshid" / "tools" / f"crane-{CRANE_VERSION}" / "crane"
    results.check("the Dockerfile: distroless/cc nonroot, user, entrypoint, agent target, --locked", check_dockerfile)
    results.check("the chart's default image is ghcr.io/meshid/meshid:<appVersion = Cargo version>", check_chart_default_image)

    block = marked_block()
    print("== docs/image.md, as printed:\n" + "\n".join(f"     $ {line}" for line in block.splitlines()), flush=True)
    started = time.monotonic()
    built = results.check("docs/image.md's build commands run as printed",
                          lambda: subprocess.run(["bash", "-e", "-c", block], cwd=REPO, check=True, stdin=subprocess.DEVNULL))
    print(f"     (image builds took {time.monotonic() - started:.0f}s)", flush=True)
    if not built:
        return report(results)

    images = re.findall(r"tests/image/build\.sh (--agent )?(\S+\.tar)", block)
    expect([a for a, _ in images].count("") == 1, f"docs/image.md should build the full image once: {images}")
    with tempfile.TemporaryDirectory(prefix="meshid-image-") as tmp:
        for agent_flag, path in images:
            agent = bool(agent_flag)
            name = "agent image" if agent else "image"
            tarball = REPO / path
            tags, config = image_config(tarball)
            want_tag = f"{REPOSITORY}:{cargo_version()}" + ("-agent" if agent else "")
            results.check(f"{name}: tagged {want_tag}",
                          lambda tags=tags, want_tag=want_tag: expect(tags == [want_tag], f"tags {tags}"))
            results.check(f"{name}: config has user {USER}, entrypoint {ENTRYPOINT}"
                          + (", cmd [agent]" if agent else ", no cmd"), lambda: check_config(config, agent))
            root = Path(tmp) / ("agent" if agent else "full")
            if not results.check(f"{name}: crane export unpacks its root filesystem", lambda: unpack(crane, tarball, root)):
                continue
            results.check(f"{name}: holds only the binary, its libraries, passwd, group and /tmp",
                          lambda: check_rootfs_contents(root))
            results.check(f"{name}: meshid --version prints the Cargo version, as uid 65532 in the image",
                          lambda: check_version(root, config))
            if agent:
                results.check("agent image: meshid agent runs and quickstart is absent", lambda: check_agent_only(root, config))
            else:
                results.check("image: meshid quickstart issues and verifies an SVID as uid 65532 in the image",
                              lambda: check_quickstart(root, config))
    return report(results)


def report(results: Results) -> int:
    if results.failed:
        print("failed:\n  " + "\n  ".join(results.failed))
    print(f"image: {results.passed} passed, {len(results.failed)} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())

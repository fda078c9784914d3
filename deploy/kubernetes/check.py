#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests, run by scripts/test:

1. every manifest validates (strictly) against the Kubernetes JSON schemas
   that the kubernetes-validate package ships, for the oldest and newest
   Kubernetes versions we support;
2. every kustomization names files that exist, and the default install's
   JSON patch applies and still validates;
3. every Weft container's command line and environment, with Kubernetes'
   $(VAR) expansion, is accepted by the real binary's own flag parser
   (`--check-config`), and the init container copies a file the agent image
   has.

Usage: check.py BIN_DIR   (where weft-server and weft-agent were built)
"""
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
K8S_VERSIONS = ["1.30.0", "1.37.0"]
# What Kubernetes would supply at run time.
SERVICE_ENV = {
    "WEFT_SERVER_SERVICE_HOST": "10.96.0.10",
    "WEFT_SERVER_SERVICE_PORT": "7400",
    "WEFT_SERVER_SERVICE_PORT_GRPC": "7400",
    "WEFT_POSTGRES_SERVICE_HOST": "10.96.0.11",
    "WEFT_POSTGRES_SERVICE_PORT": "5432",
}
FIELD_REFS = {"spec.nodeName": "node-a"}
SECRET_VALUES = {("weft-database", "url"): "postgres://weft:secret@db.example.com:5432/weft?sslmode=require",
                 ("weft-database", "password"): "secret"}

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def validate(docs, label):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
        path = f.name
    try:
        for version in K8S_VERSIONS:
            r = subprocess.run(["kubernetes-validate", "--strict", "--quiet", "-k", version, path],
                               capture_output=True, text=True)
            check(f"{label} validates against Kubernetes {version}", r.returncode == 0, r.stdout + r.stderr)
    finally:
        os.unlink(path)


def kustomize(directory):
    """A small kustomize: resources (files or directories) and JSON6902
    patches with op replace/add, which is all these kustomizations use."""
    k = load(os.path.join(directory, "kustomization.yaml"))[0]
    docs = []
    for res in k.get("resources", []):
        path = os.path.normpath(os.path.join(directory, res))
        check(f"{os.path.relpath(directory, HERE)}: resource {res} exists", os.path.exists(path), path)
        if os.path.isdir(path):
            docs.extend(kustomize(path))
        elif os.path.exists(path):
            docs.extend(load(path))
    for p in k.get("patches", []):
        target, ops = p["target"], yaml.safe_load(p["patch"])
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        check(f"{os.path.relpath(directory, HERE)}: patch target {target['kind']}/{target['name']} exists", len(hits) == 1)
        for d in hits:
            for op in ops:
                parts = [int(x) if x.isdigit() else x for x in op["path"].strip("/").split("/")]
                node = d
                for key in parts[:-1]:
                    node = node[key]
                node[parts[-1]] = copy.deepcopy(op["value"])
    return docs


def expand(value, env):
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def container_env(container, configmaps):
    env = dict(SERVICE_ENV)
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
            continue
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            env[e["name"]] = SECRET_VALUES[(ref["name"], ref["key"])]
        elif "fieldRef" in src:
            env[e["name"]] = FIELD_REFS[src["fieldRef"]["fieldPath"]]
    return env


def check_binaries(docs, label, bin_dir):
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for d in docs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("containers", []):
            binary = {"weft/weft-server": "weft-server", "weft/weft-agent": "weft-agent"}.get(c["image"].split(":")[0])
            if not binary:
                continue
            env = container_env(c, configmaps)
            argv = [expand(a, env) for a in c.get("command", [])[1:] + c.get("args", [])]
            r = subprocess.run([os.path.join(bin_dir, binary), *argv, "--check-config"],
                               env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)
            check(f"{label}: {d['kind']}/{d['metadata']['name']} {c['name']} args and env accepted by {binary}",
                  r.returncode == 0, r.stderr.strip())
        for c in spec.get("initContainers", []):
            script = " ".join(c.get("command", []))
            dockerfile = open(os.path.join(ROOT, "deploy/docker/agent.Dockerfile")).read()
            check(f"{label}: init container {c['name']} installs what the image has",
                  "/usr/local/bin/weft " in script and "COPY --from=build /src/target/release-shim/weft /usr/local/bin/weft" in dockerfile
                  and "mv -f" in script, script)
            # The agent's default --chain: the image must carry them and the
            # init container install them where the node has none.
            check(f"{label}: init container {c['name']} installs the chained plugins from the image",
                  "for p in portmap bandwidth" in script and "/usr/lib/cni/$p" in script
                  and "containernetworking-plugins=${CNI_PLUGINS_VERSION}" in dockerfile, script)


def main():
    bin_dir = sys.argv[1]
    for name in ["base", "default", "byo-postgres"]:
        docs = kustomize(os.path.join(HERE, name))
        check(f"{name}: renders resources", len(docs) > 0)
        validate(docs, name)
        check_binaries(docs, name, bin_dir)
    print(f"manifests: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Builds a tiny OCI image archive whose only file is Debian's static
busybox, to serve as the pod sandbox ("pause") image: no registry is
reachable here. Usage: pause-image.py OUT.tar NAME"""
import hashlib, io, json, os, sys, tarfile

out, name = sys.argv[1], sys.argv[2]
busybox = "/bin/busybox"

def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data

layer_buf = io.BytesIO()
with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    d = tarfile.TarInfo("bin"); d.type = tarfile.DIRTYPE; d.mode = 0o755
    t.addfile(d)
    info = t.gettarinfo(busybox, arcname="bin/busybox"); info.uid = info.gid = 0
    info.uname = info.gname = "root"; info.mtime = 0
    with open(busybox, "rb") as f:
        t.addfile(info, f)
layer_digest, layer = blob(layer_buf.getvalue())
config_digest, config = blob(json.dumps({
    "architecture": "amd64", "os": "linux",
    # A sandbox only has to hold the namespaces open.
    "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
    "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
}).encode())
manifest_digest, manifest = blob(json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}],
}).encode())
index = json.dumps({"schemaVersion": 2, "manifests": [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": len(manifest),
    "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
    "platform": {"architecture": "amd64", "os": "linux"},
}]}).encode()

with tarfile.open(out, "w") as t:
    def add(path, data):
        i = tarfile.TarInfo(path); i.size = len(data); i.mode = 0o644
        t.addfile(i, io.BytesIO(data))
    add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add("index.json", index)
    for digest, data in [(layer_digest, layer), (config_digest, config), (manifest_digest, manifest)]:
        add("blobs/sha256/" + digest.split(":")[1], data)

"""The real node's generated files: the pause image archive, containerd's config and the registry hosts.

Pure file generation (no daemon starts): the archive must be a valid OCI layout whose digests match
its blobs, containerd must be told to restrict oom_score_adj (runc cannot lower it in this VM) and
to resolve ghcr.io only through the local registry, never through the public one.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import tarfile
import tomllib

from localcluster import certs, controlplane, realnode


def test_pause_archive_is_a_valid_oci_layout(tmp_path: pathlib.Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really, but bytes")
    with tarfile.open(fileobj=io.BytesIO(realnode.pause_image_archive(binary))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == realnode.PAUSE_IMAGE

    def blob(descriptor: dict[str, object]) -> bytes:
        data = files[f"blobs/sha256/{str(descriptor['digest']).split(':')[1]}"]
        assert descriptor["digest"] == f"sha256:{hashlib.sha256(data).hexdigest()}"
        assert descriptor["size"] == len(data)
        return data

    manifest = json.loads(blob(entry))
    config = json.loads(blob(manifest["config"]))
    (layer,) = manifest["layers"]
    with tarfile.open(fileobj=io.BytesIO(blob(layer)), mode="r:gz") as tar:
        member = tar.getmember("pause")
        assert member.mode == 0o755 and tar.extractfile(member).read() == binary.read_bytes()  # type: ignore[union-attr]
    assert config["config"]["Entrypoint"] == ["/pause"]
    assert config["rootfs"]["diff_ids"][0].startswith("sha256:")


def test_containerd_config_and_registry_hosts(tmp_path: pathlib.Path) -> None:
    node = realnode.RealNodePaths(controlplane.ClusterPaths(tmp_path))
    node.run = tmp_path / "run"  # not /run: nothing outside the test's folder
    realnode.write_containerd_config(node)
    config = tomllib.loads(node.containerd_config.read_text())
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == realnode.PAUSE_IMAGE
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    hosts_dir = pathlib.Path(cri["registry"]["config_path"])
    for host in ("ghcr.io", realnode.REGISTRY):
        hosts = tomllib.loads((hosts_dir / host / "hosts.toml").read_text())
        # `server` replaces the upstream: a miss in the local registry never falls back outside.
        assert hosts["server"] == f"http://{realnode.REGISTRY}"
    conflist = json.loads((pathlib.Path(cri["cni"]["conf_dir"]) / "10-kquant.conflist").read_text())
    bridge = conflist["plugins"][0]
    assert bridge["ipMasq"] is False and bridge["ipam"]["ranges"] == [[{"subnet": realnode.POD_SUBNET}]]
    # Pods route to this machine's networks and the Services (the API server's ClusterIP), no further.
    assert bridge["ipam"]["routes"] == [{"dst": realnode.LOCAL_NETWORK}, {"dst": certs.SERVICE_RANGE}]

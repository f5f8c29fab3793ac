"""What a Ray cluster needs from the config: storage and tracking that every node can reach.

Plain functions of the config and of facts about the cluster (node addresses), so the rules are
testable without a cluster; training.connect() feeds them the live facts.

A cluster is *remote* when it spans more than one host, or when it is reached through Ray Client
(`ray://`, where the driver-side code itself runs on the cluster). Then checkpoints written by
workers on other hosts must land on shared storage, and the MLflow store must be a server, not a
SQLite file on one machine's disk. A single-host cluster (`ray start --head` on a laptop, or the
tests' two-node cluster) shares this machine's disk, so local paths are fine there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mixer.config import Config, ConfigError

# Filesystems whose files every host that mounts them sees: checkpoints can live there.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "fuse.ceph", "cephfs", "glusterfs",
    "fuse.glusterfs", "beegfs", "9p", "virtiofs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
    "fuse.mountpoint-s3", "fuse.goofys", "fuse.rclone", "afs", "ocfs2", "weka", "wekafs",
})


class ClusterError(ConfigError):
    """The config cannot work on the cluster it points at; the message says what to change."""


def is_client_address(address: str | None) -> bool:
    return bool(address) and address.startswith("ray://")


def spans_hosts(node_ips: Iterable[str]) -> bool:
    return len(set(node_ips)) > 1


def check_before_connect(cfg: Config) -> None:
    """Refuse, before connecting, what a Ray Client (ray://) cluster can never reach."""
    if is_client_address(cfg.ray.address):
        check_shared(cfg, f"the Ray cluster at {cfg.ray.address} runs this driver's work remotely")


def check_nodes(cfg: Config, node_ips: Iterable[str]) -> None:
    """Refuse, once connected, local storage and tracking on a cluster of several hosts."""
    ips = sorted(set(node_ips))
    if spans_hosts(ips):
        check_shared(cfg, f"the Ray cluster spans {len(ips)} hosts ({', '.join(ips[:4])})")


def check_shared(cfg: Config, why: str) -> None:
    storage = cfg.ray.storage_path
    kind = None if _is_uri(storage) else filesystem_type(Path(storage))
    if kind is not None and kind not in NETWORK_FILESYSTEMS:
        raise ClusterError(
            f"ray.storage_path: {storage} is on this machine's {kind} disk, but {why}: "
            "workers on other hosts cannot write checkpoints there; use a shared path (NFS) or a URI "
            "such as s3://bucket/ray or gs://bucket/ray")
    if cfg.mlflow.tracking_uri.startswith("sqlite:"):
        raise ClusterError(
            f"mlflow.tracking_uri: {cfg.mlflow.tracking_uri} is a file on this machine, but {why}: "
            "start an MLflow server (`mixer server --host 0.0.0.0`) and set "
            "MLFLOW_TRACKING_URI=http://<host>:5000")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (or its nearest existing parent), from /proc/self/mounts."""
    target = path.resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:  # not Linux: nothing to go on, so assume local (the safe answer)
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        if _under(target, Path(mount_point)) and len(mount_point) >= len(best):
            best, kind = mount_point, fields[2]
    return kind


def _under(path: Path, mount_point: Path) -> bool:
    return path == mount_point or mount_point in path.parents


def _is_uri(path: str) -> bool:
    return "://" in path

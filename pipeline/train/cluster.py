"""The driver's view of the cluster: how many nodes, whether a storage path is shared, what to stage.

In:  a connected Ray driver and the run's storage root (`train.storage_path`).
Out: * `multi_node()` — True when more than one alive node could run our tasks;
     * `check_shared_storage(storage)` — on a multi-node cluster, a local `storage_path` must be a
       folder every node sees (NFS): a probe file written here is looked for from every node, and a
       node that cannot see it is a one-line error naming it;
     * `stage_root(storage)` — where the driver stages what it prepared (model, local or built-in
       corpus) for the other nodes: the storage root on a multi-node cluster, None on one node (then
       local paths are used as they are, and nothing is copied).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pipeline.errors import FluidError
from pipeline.sources.staging import is_remote


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def multi_node() -> bool:
    return len(alive_nodes()) > 1


def _sees(path: str) -> bool:
    return Path(path).is_file()


def check_shared_storage(storage: str) -> None:
    """Fail when `storage` is a local folder that some node of a multi-node cluster cannot see."""
    if is_remote(storage) or not multi_node():
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = Path(storage.removeprefix("file://")) / f".fluid-shared-probe-{uuid.uuid4().hex[:8]}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    try:
        check = ray.remote(num_cpus=0)(_sees)
        nodes = alive_nodes()
        seen = ray.get([check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(str(probe)) for n in nodes])
    finally:
        probe.unlink(missing_ok=True)
    blind = [n.get("NodeManagerAddress", n["NodeID"]) for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise FluidError(f"train.storage_path {storage} is a local folder that {len(blind)} of {len(nodes)} nodes "
                         f"cannot see (e.g. {blind[0]}); on a multi-node cluster use s3://…, gs://… or a "
                         "folder every node mounts")


def stage_root(storage: str) -> str | None:
    """The storage root to stage driver-prepared inputs under, or None on a single node."""
    if not multi_node():
        return None
    if not is_remote(storage):
        storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
    check_shared_storage(storage)
    return storage

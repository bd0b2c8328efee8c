"""A job for the multi-node test: which nodes see the given paths? Prints one JSON line
{"head": [...], "workers": [[...], ...]} (True = the path exists on that node)."""

import json
import os
import sys

import ray


def _sees(paths: list[str]) -> tuple[bool, list[bool]]:
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return cpus, [os.path.exists(p) for p in paths]


def main() -> None:
    paths = sys.argv[1:]
    ray.init()
    head = [os.path.exists(p) for p in paths]  # the driver runs on the head
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    workers = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    seen = ray.get([ray.remote(num_cpus=1)(_sees).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths) for n in workers])
    print(json.dumps({"head": head, "workers": [s for _, s in seen]}))


if __name__ == "__main__":
    main()

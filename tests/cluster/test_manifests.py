"""Cluster artifacts a platform team applies as they are: schemas, entrypoints, import paths, the image."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _manifests() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(CLUSTER.glob("kuberay-*.yaml")) for d in _docs(p.name)]


def _validate_launcher(config: dict) -> None:
    import json

    import jsonschema
    import ray.autoscaler

    schema = Path(ray.autoscaler.__file__).with_name("ray-schema.json")  # what `ray up` validates against
    jsonschema.validate(config, json.loads(schema.read_text()))


def test_launcher_config_validates_against_rays_schema():
    config = _docs("cluster-launcher-aws.yaml")[0]
    _validate_launcher(config)  # Ray's own ray-schema.json, as `ray up` checks it
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    with pytest.raises(Exception, match="'many' is not of type"):
        _validate_launcher({**config, "max_workers": "many"})  # the check can fail


def _check_entrypoint(entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module = importlib.import_module(argv[2])
    assert callable(module.main)
    overrides = [a for a in argv[3:] if a.startswith("--") and "." in a.split("=", 1)[0]]
    assert overrides == argv[3:], f"only --section.key=value overrides expected: {argv[3:]}"
    load_config(None, overrides)  # every key exists and has the right type


def _check_serve_config(config: dict) -> None:
    assert config["applications"]
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        from_dict({"serve": app.get("args", {})})  # the args are ServeConfig keys


def test_every_manifest_entrypoint_and_serve_import_path_resolve():
    kinds = {}
    for name, doc in _manifests():
        kinds.setdefault(doc["kind"], []).append(name)
        spec = doc["spec"]
        if doc["kind"] == "RayJob":
            _check_entrypoint(spec["entrypoint"])
        if doc["kind"] == "RayService":
            _check_serve_config(yaml.safe_load(spec["serveConfigV2"]))
    assert set(kinds) == {"RayCluster", "RayJob", "RayService"}
    _check_serve_config(_docs("serve_config.yaml")[0])
    with pytest.raises(Exception, match="unknown config key"):
        _check_entrypoint("python -m jobs.adapt --train.no_such_key=1")


def _clusters() -> list[dict]:
    out = []
    for _, doc in _manifests():
        if doc["kind"] == "RayCluster":
            out.append(doc["spec"])
        elif doc["kind"] == "RayService":
            out.append(doc["spec"]["rayClusterConfig"])
    return out


def test_clusters_have_a_cpu_less_head_autoscaling_groups_and_no_public_service():
    import ray

    for spec in _clusters():
        assert spec["rayVersion"] == ray.__version__
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert spec["enableInTreeAutoscaling"] is True
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] > 1
    groups = {g["groupName"] for g in _clusters()[0]["workerGroupSpecs"]}
    assert groups == {"cpu", "gpu"}
    for _, doc in _manifests():
        text = yaml.safe_dump(doc)
        assert "LoadBalancer" not in text and "NodePort" not in text
    service = next(d for _, d in _manifests() if d["kind"] == "RayService")
    assert "FLUID_API_KEY_FILE: /etc/fluid/api-key" in service["spec"]["serveConfigV2"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "api-key", "mountPath": "/etc/fluid", "readOnly": True} in head["containers"][0]["volumeMounts"]


def _install_lines(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", c.replace("--no-cache-dir", "")).strip() for c in text]


def test_the_dockerfile_installs_as_the_readme_says_on_the_pinned_ray_image():
    import ray

    docker = (CLUSTER / "Dockerfile").read_text()
    run = re.search(r"^RUN (python -m pip install .*?)(?<!\\)$", docker, re.MULTILINE | re.DOTALL).group(1)
    steps = _install_lines(run.replace("\\\n", " ").split("&&"))
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- install-step -->\s*```bash\n(.*?)```", readme, re.DOTALL).group(1)
    assert steps == _install_lines(block.strip().splitlines())
    assert re.search(rf"^ARG BASE_TAG={re.escape(ray.__version__)}-py311$", docker, re.MULTILINE)
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"TORCH_SPEC \?= (\S+)", makefile).group(1)
    assert f'"{torch_pin}"' in steps[0]

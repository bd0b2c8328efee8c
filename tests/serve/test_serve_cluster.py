"""`fluid serve` against an already-running Ray instance (started by this test session with ray.init, as a
cluster is started by `ray start`; the CLI joins it with --address, so the replicas never see the CLI's
environment): the API key given to the CLI (raw in its env, or as a key file) is enforced by the
replicas, Ctrl-C deletes only the application that CLI deployed, and the node's metrics export port
serves our counters next to Ray's."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.test_openai_api import export_tiny

pytestmark = pytest.mark.ray

HTTP = 18371
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(ray_local, tmp_path_factory):
    import ray
    from ray import serve

    serve.shutdown()  # the CLIs start Serve on HTTP (an earlier module's Serve would keep its port)
    node = ray._private.worker.global_worker.node
    tmp = tmp_path_factory.mktemp("cluster")
    yield {"address": ray.get_runtime_context().gcs_address, "tmp": tmp, "export": export_tiny(tmp / "tiny"),
           "metrics": f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"}
    serve.shutdown()


def fluid_serve(cluster, name: str, env: dict, log: Path, address: str | None = None,
                port: int = HTTP) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env}
    for k in ("RAY_ADDRESS", "FLUID_API_KEY", "FLUID_API_KEY_FILE"):
        if k not in env or env[k] is None:
            env.pop(k, None)
    extra = ["--num-cpus", "4"] if address == "local" else []
    cmd = [sys.executable, "-m", "jobs.serve", "--address", address or cluster["address"], *extra,
           f"--serve.model={cluster['export']}", f"--serve.port={port}", f"--serve.app_name={name}",
           f"--serve.route_prefix=/{name}", "--serve.max_batch_size=4", "--serve.num_cpus=1"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if "serving " in log.read_text():
            return proc
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"fluid serve {name} did not start: {log.read_text()[-3000:]}")


def call(name: str, key: str | None, path: str = "/v1/completions", port: int = HTTP):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"http://127.0.0.1:{port}/{name}{path}"
    with httpx.Client(trust_env=False, timeout=60) as c:
        if path == "/v1/completions":
            return c.post(url, headers=headers, json={"prompt": "the cat", "max_tokens": 6, "temperature": 0,
                                                      "ignore_eos": True})
        return c.get(url, headers=headers)


def test_key_is_enforced_on_a_running_cluster_and_ctrl_c_deletes_only_its_app(cluster):
    tmp = cluster["tmp"]
    key_file = tmp / "api-key"
    key_file.write_text("file-key-0123456789abcdef\n")
    a = fluid_serve(cluster, "a", {"FLUID_API_KEY": "raw-key-0123456789abcdef"}, tmp / "a.log")
    b = None
    try:
        b = fluid_serve(cluster, "b", {"FLUID_API_KEY_FILE": str(key_file)}, tmp / "b.log")
        assert "auth on" in (tmp / "a.log").read_text()
        for name, key in (("a", "raw-key-0123456789abcdef"), ("b", "file-key-0123456789abcdef")):
            for path in ("/v1/completions", "/v1/models"):
                for wrong in (None, "nope", "raw-key" if name == "b" else "file-key-0123456789abcdef"):
                    r = call(name, wrong, path)
                    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (name, path)
            r = call(name, key)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
            assert call(name, None, "/healthz").json()["auth"] is True
        a.send_signal(signal.SIGINT)  # Ctrl-C
        assert a.wait(60) == 0
        assert call("a", "raw-key-0123456789abcdef").status_code == 404  # its app is gone …
        assert call("b", "file-key-0123456789abcdef").status_code == 200  # … the other one still serves
        names = ("fluid_generated_tokens_total", "fluid_forwards_total", "fluid_requests_rejected_total",
                 "fluid_accepted_length_bucket", "fluid_queue_depth", "fluid_kv_tokens_held")

        def exported(text: str) -> bool:  # each metric reaches the exporter in its own report cycle
            return all(f"ray_{n}" in text for n in names) and bool(
                re.search(r"^ray_fluid_generated_tokens_total\{[^}]*\} [1-9]", text, re.M))

        metrics = ""
        deadline = time.time() + 90
        while time.time() < deadline and not exported(metrics):
            time.sleep(1.0)
            metrics = httpx.get(cluster["metrics"], trust_env=False, timeout=10).text
        for name in names:
            assert f"ray_{name}" in metrics, name
        assert re.search(r"^ray_fluid_generated_tokens_total\{[^}]*\} [1-9]", metrics, re.M)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) if d.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def test_the_raw_key_reaches_no_process_of_a_local_ray_instance(cluster):
    """`fluid serve` that starts its own Ray instance with FLUID_API_KEY in its environment: the key is
    enforced, yet no other process on this machine (GCS, raylet, workers, replicas: all children of the
    CLI) has it in its environment or command line, and no file of that Ray session holds it."""
    import secrets

    key, port = "raw-" + secrets.token_hex(16), HTTP + 1
    proc = fluid_serve(cluster, "leak", {"FLUID_API_KEY": key}, cluster["tmp"] / "leak.log", "local", port)
    try:
        assert call("leak", key, port=port).status_code == 200
        assert call("leak", None, port=port).status_code == 401
        ray_procs, hits, sessions = descendants(proc.pid), [], set()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == proc.pid:  # the CLI: where the key was read
                continue
            try:
                environ, cmdline = (d / "environ").read_bytes(), (d / "cmdline").read_bytes()
            except OSError:
                continue
            if key.encode() in environ + cmdline:
                hits.append((d.name, cmdline[:200]))
            if int(d.name) in ray_procs:
                sessions |= set(re.findall(rb"(/[^\0=]*/session_[0-9_\-]+)", cmdline))
        assert len(ray_procs) >= 4 and hits == [], (len(ray_procs), hits)
        assert len(sessions) == 1, sessions  # this instance's session folder: logs, runtime envs
        files = [f for f in Path(sessions.pop().decode()).rglob("*") if f.is_file() and f.stat().st_size < 50e6]
        assert files and not [f for f in files if key.encode() in f.read_bytes()]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()

"""A local multi-node Ray cluster whose worker nodes cannot see the driver's files, and an S3 server.

The head (num_cpus=0, dashboard for `ray job submit`) runs in this mount namespace; each worker node
is `ray start --block` inside its own `unshare -m` namespace with an empty tmpfs over every folder in
`hide` (the driver's caches, the test's model and corpus) and over the head's temp dir (so each node
has its own session folder, as on separate machines), its own FLUID_CACHE_DIR and an unreachable
package index. Every node is started with `--node-ip-address=127.0.0.1` and its own ports (the ray CLI
advertises a loopback node address as the host's own address, which the kernel routes over the
loopback device: nothing leaves the machine); all nodes and the CLI share one auth token (Ray 2.60
token authentication). Every process is stopped by PID — with its descendants,
collected before the stop — never by `ray stop`, which would end every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
RAY_START = [str(VENV_BIN / "ray"), "start"]


class Procs:
    """Processes started by the test, stopped by PID (and their descendants) in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict, log: Path, cwd: str | None = None,
              append: bool = False) -> subprocess.Popen:
        fh = open(log, "ab" if append else "wb")
        p = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        fh.close()
        self.procs.append((name, p))
        return p

    def stop_one(self, proc: subprocess.Popen) -> None:
        _stop_trees([proc.pid])
        self.forget(proc)

    def forget(self, proc: subprocess.Popen) -> None:
        """Stop tracking a process that has ended (its pid may be reused: never signal it again)."""
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        _stop_trees([p.pid for _, p in reversed(self.procs)])  # all at once: one grace period, not one each
        self.procs.clear()


def _session_of(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def _stop_trees(pids: list[int], grace: float = 5.0) -> None:
    """Stop each of `pids` (started as session leaders) and every process of their sessions or below
    them, with one grace period for all: Ray's agents re-parent to init, but keep the session id."""
    sessions = set(pids)
    family = {p for p in psutil.process_iter() if p.pid != os.getpid() and _session_of(p) in sessions}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            family.update([*root.children(recursive=True), root])
    family = list(family)
    if not family:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def wait_until(check, timeout: float, what: str, every: float = 0.5):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            out = check()
            if out:
                return out
        except Exception as e:  # noqa: BLE001 — not up yet
            last = e
        time.sleep(every)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last})")


@dataclass
class Job:
    """A `ray job submit` CLI running in the background (`LocalCluster.start_job`)."""

    name: str
    proc: subprocess.Popen
    log: Path
    t0: float


class LocalCluster:
    """`with LocalCluster(root, hide=[...], base_port=18200) as c:` → head + 2 hidden-file workers + moto."""

    def __init__(self, root: Path, *, hide: list[Path], base_port: int, workers: int = 2, worker_cpus: int = 2,
                 cwd: str | None = None):
        self.root, self.hide, self.base, self.n_workers, self.worker_cpus = root, hide, base_port, workers, worker_cpus
        self.cwd = cwd
        self.procs = Procs()
        self.timings: dict[str, float] = {}  # seconds per phase, printed by the test
        self.token = secrets.token_hex(16)
        self.s3_port = base_port + 1
        self.gcs_port = base_port + 10
        self.dashboard_port = base_port + 11
        self.serve_port = base_port + 80
        self.bucket = "fluid"
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: unix socket paths ≤ 107 chars
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # --- environment -------------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLUID_CACHE_DIR", "AWS_"))}
        env.update({
            "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_NO_INDEX": "", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # tiny steps: see tests/conftest.py
            # three nodes' agents start at once on 2 cores: Ray's 60 s start-up waits are too short there
            "RAY_raylet_start_wait_time_s": "300", "RAY_agent_register_timeout_ms": "300000",
        })
        env.pop("PIP_NO_INDEX")
        env.update(extra)
        return env

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # --- start ------------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        t0 = time.time()
        try:
            self._start_s3()
            self._start_head()
            self.timings["start head + S3"] = time.time() - t0
            t0 = time.time()
            starting = {i: self._start_worker(i) for i in range(self.n_workers)}  # together (see env())
            for _ in range(3):
                up = self._wait_workers(starting, 1 + self.n_workers)
                if up:
                    break
                for i, p in list(starting.items()):
                    if p.poll() is not None:  # a start that failed on a busy machine: try again
                        self.procs.stop_one(p)
                        starting[i] = self._start_worker(i)
            else:
                raise RuntimeError(f"worker nodes did not start; see {self.logs}/worker*.log")
            self.timings["start worker nodes"] = time.time() - t0
        except BaseException:
            self.procs.stop_all()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # the nodes' session folders (logs stay in root/logs)

    def _wait_workers(self, procs: dict[int, subprocess.Popen], nodes: int) -> bool:
        end = time.time() + 180
        while time.time() < end and all(p.poll() is None for p in procs.values()):
            with contextlib.suppress(Exception):
                if self._alive_nodes() >= nodes:
                    return True
            time.sleep(1)
        return False

    def _start_s3(self) -> None:
        self.procs.start("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                         self.env(), self.logs / "moto.log")
        s3 = self.s3fs()
        wait_until(lambda: s3.mkdir(self.bucket) or True, 30, "moto S3 server")

    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": f"http://127.0.0.1:{self.s3_port}",
                                                "region_name": "us-west-2"})

    def _ports(self, first: int) -> list[str]:
        return ["--node-manager-port", str(first), "--object-manager-port", str(first + 1),
                "--dashboard-agent-listen-port", str(first + 2), "--dashboard-agent-grpc-port", str(first + 3),
                "--runtime-env-agent-port", str(first + 4), "--metrics-export-port", str(first + 5)]

    def _common(self) -> list[str]:
        return ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                "--object-store-memory", str(90 * 1024**2)]

    def _start_head(self) -> None:
        b = self.base
        cmd = [*RAY_START, "--head", "--num-cpus=0", "--port", str(self.gcs_port),
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--ray-client-server-port", str(b + 12), "--min-worker-port", str(b + 20),
               "--max-worker-port", str(b + 39), "--temp-dir", str(self.temp_dir), *self._ports(b + 13),
               *self._common()]
        self.procs.start("head", cmd, self.env(FLUID_CACHE_DIR=str(self.root / "head-cache")),
                         self.logs / "head.log", cwd=self.cwd)
        wait_until(lambda: self._alive_nodes() >= 1, 240, "Ray head (dashboard)")

    def worker_cache(self, i: int) -> Path:
        return self.root / f"worker{i}-cache"

    def _start_worker(self, i: int) -> subprocess.Popen:
        first = self.base + 40 + 20 * i  # 40–59, 60–79: six ports, then the worker-port range
        ray_cmd = [*RAY_START, f"--address=127.0.0.1:{self.gcs_port}",
                   f"--num-cpus={self.worker_cpus}", *self._ports(first), "--min-worker-port", str(first + 6),
                   "--max-worker-port", str(first + 19), *self._common()]
        # the head's temp dir too: Ray hands the head's session folder to every node, and nodes on one
        # machine would then share it — one node re-extracting a job's working_dir under another's feet
        mounts = " && ".join(f"mkdir -p {shlex.quote(str(h))} && mount -t tmpfs tmpfs {shlex.quote(str(h))}"
                             for h in [*self.hide, self.temp_dir])
        script = f"{mounts} && exec {shlex.join(ray_cmd)}"
        self.worker_cache(i).mkdir(parents=True, exist_ok=True)
        return self.procs.start(f"worker{i}", ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         self.env(FLUID_CACHE_DIR=str(self.worker_cache(i))), self.logs / f"worker{i}.log", append=True,
                         cwd=self.cwd)

    def worker_sees(self, i: int, path: Path) -> bool:
        """Whether worker node `i` (its `ray start` process, whose mount namespace every raylet, agent and
        Ray worker of that node inherits) sees `path`."""
        pid = next(p.pid for name, p in self.procs.procs if name == f"worker{i}")
        out = subprocess.run(["nsenter", "-t", str(pid), "-m", "--", "test", "-e", str(path)], timeout=30)
        if out.returncode not in (0, 1):
            raise RuntimeError(f"nsenter into worker node {i} failed ({out.returncode})")
        return out.returncode == 0

    def _alive_nodes(self) -> int:
        """Alive nodes, from the dashboard's State API (token-authenticated)."""
        import httpx

        r = httpx.get(f"{self.address}/api/v0/nodes", headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        r.raise_for_status()
        return sum(n["state"] == "ALIVE" for n in r.json()["data"]["result"]["result"])

    # --- jobs -------------------------------------------------------------------------------------
    def submit(self, name: str, args: list[str], timeout: float = 240) -> str:
        """`ray job submit` (blocking); returns the job's log; raises with the log's tail on failure."""
        return self.finish(self.start_job(name, args), timeout=timeout)

    def start_job(self, name: str, args: list[str]) -> Job:
        """`ray job submit` in the background (the CLI still tails the job until it ends): `finish` it.
        Started through `procs`, so the cluster's teardown stops it if the test fails first."""
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.address, "--submission-id",
               f"{name}-{secrets.token_hex(3)}", "--runtime-env", "cluster/runtime_env.yaml", "--",
               "python", "-m", *args]
        log = self.logs / f"job-{name}.log"
        return Job(name, self.procs.start(f"job {name}", cmd, self.env(), log, cwd=self.cwd), log, time.time())

    def finish(self, job: Job, timeout: float = 240) -> str:
        """Wait for a job started by `start_job`; returns its log; raises with the log's tail on failure."""
        try:
            job.proc.wait(timeout=max(1.0, job.t0 + timeout - time.time()))
            self.procs.forget(job.proc)
        except subprocess.TimeoutExpired:
            self.procs.stop_one(job.proc)
        self.timings[f"job {job.name}"] = time.time() - job.t0
        out = job.log.read_text()
        if job.proc.returncode != 0:
            raise AssertionError(f"job {job.name} failed ({job.proc.returncode}):\n{out[-4000:]}")
        return out

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / args[0]), *args[1:]], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=self.cwd)

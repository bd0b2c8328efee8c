"""End to end on a local multi-node cluster whose worker nodes share nothing with the driver but S3.

Head (num_cpus=0) + two worker nodes, each in its own mount namespace with an empty tmpfs over the
driver's caches and the test's model and corpus folders, its own FLUID_CACHE_DIR and an unreachable
package index; all storage on a moto S3 server on 127.0.0.1. `ray job submit`: preprocess → adapt
(2 workers, one per node, checkpoints in S3) → export (of the last S3 checkpoint), then served from
s3:// (proxy on the head only) to answer one completion, while fit-horizon fits the horizon head on
the run's own export beside them. (Resuming — a
re-submitted run, and in-run recovery after a worker failure — is tested in tests/train/test_train.py:
the same code path without the cluster's start-up cost.) Needs root (mount namespaces): under CI=true it fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]
BASE_PORT = 18200


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root for mount namespaces (unshare -m)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs unshare and nsenter (util-linux)"
    try:
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        return f"needs the dev extras ({e.name}: pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _requirements()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"multi-node test cannot run: {why}")
        pytest.skip(why)
    from pipeline.sources.model_source import default_cache_dir
    from tests.cluster.local_cluster import LocalCluster
    from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("mn")
    model, corpus = root / "model", root / "corpus"
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    rng = np.random.default_rng(0)
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(40, 80)))))
    (root / "api-key").write_text("mn-secret-key\n")
    hide = [root / "head-cache", model, corpus, default_cache_dir()]
    t0 = time.time()
    with LocalCluster(root, hide=hide, base_port=BASE_PORT, cwd=str(REPO)) as c:
        c.model, c.corpus, c.t0 = model, corpus, t0
        yield c


def _common(c) -> list[str]:
    return [f"--model.spec={c.model}", f"--data.corpus={c.corpus}", "--data.seq_len=16", "--noise.k_max=4",
            "--data.val_fraction=0.2", "--data.test_fraction=0.1", f"--train.storage_path=s3://{c.bucket}/runs"]


def test_pipeline_on_nodes_that_share_only_object_storage(cluster):
    c = cluster
    s3 = c.s3fs()
    # the worker nodes really cannot see the driver's files (their raylets, and so every Ray worker they
    # start, live in their own mount namespaces)
    paths = [c.model / "config.json", c.corpus / "doc00.txt"]
    assert all(p.exists() for p in paths)
    assert [[c.worker_sees(i, p) for p in paths] for i in range(2)] == [[False, False]] * 2

    c.submit("preprocess", ["jobs.preprocess", "--output", f"s3://{c.bucket}/shards", *_common(c)])
    assert s3.glob(f"{c.bucket}/shards/*.parquet") and s3.exists(f"{c.bucket}/shards/fluid_summary.json")

    adapt = ["jobs.adapt", *_common(c), f"--data.preprocessed=s3://{c.bucket}/shards", "--train.workers=2",
             "--train.cpus_per_worker=2", "--train.global_batch_size=4", "--train.checkpoint_every=1",
             "--train.run_name=mn", "--train.eval_batches=1", "--train.warmup_steps=1"]
    # (no held-out split here: evaluation across ranks is tests/train/test_train.py's, and each Ray Data
    # start costs ~15 s on 2 cores; so is resuming from a checkpoint — a failure and its recovery cost a
    # second worker-group start, ~25 s — while the export job below loads the S3 checkpoint)
    c.submit("adapt", [*adapt, "--train.max_steps=2", "--data.val_fraction=0"])
    metrics = [json.loads(line) for line in s3.cat_file(f"{c.bucket}/runs/mn/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics if "event" not in m] == [1, 2]
    staged = s3.glob(f"{c.bucket}/runs/.fluid/models/*/manifest.json")
    assert len(staged) == 1  # the model was staged once, content-addressed
    sha = staged[0].split("/")[-2]
    for i in range(2):  # each worker node fetched its own checksummed copy into its own cache
        assert (c.worker_cache(i) / "staged" / sha / "config.json").is_file(), f"worker {i} has no staged model"
    assert s3.exists(f"{c.bucket}/runs/mn/export/fluid.json")

    # the horizon head is fitted on the run's own export while the last checkpoint is exported and served
    # (independent jobs, run side by side as a platform team would: the test's wall time is mostly Ray's
    # fixed start-up cost per job, and these two overlap)
    horizon = c.start_job("fit-horizon", ["jobs.fit_horizon", "--export", f"s3://{c.bucket}/runs/mn/export", *_common(c),
                                          "--horizon.examples=8", "--horizon.epochs=3", "--horizon.workers=2"])
    ckpt = sorted(p for p in s3.glob(f"{c.bucket}/runs/mn/checkpoint_*") if not p.endswith(".json"))[-1]
    c.submit("export", ["jobs.export", "--checkpoint", f"s3://{ckpt}", "--output", f"s3://{c.bucket}/exports/mn"])
    meta = json.loads(s3.cat_file(f"{c.bucket}/exports/mn/fluid.json"))
    assert meta["train_config"]["steps_done"] == 2

    t0 = time.time()
    _serve_one_completion(c)
    c.timings["serve"] = time.time() - t0

    c.finish(horizon)
    assert s3.exists(f"{c.bucket}/runs/mn/export/horizon_head.safetensors")
    assert "horizon_head" in json.loads(s3.cat_file(f"{c.bucket}/runs/mn/export/fluid.json"))
    print(f"multi-node pipeline wall time: {time.time() - c.t0:.0f} s;",
          ", ".join(f"{k} {v:.0f} s" for k, v in c.timings.items()))


def _serve_one_completion(c) -> None:
    import httpx
    import yaml

    from tests.cluster.local_cluster import wait_until

    config = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": c.serve_port}
    app = config["applications"][0]
    app["args"].update(model=f"s3://{c.bucket}/exports/mn", api_key_file=str(c.root / "api-key"), num_cpus=1,
                       autoscaling=False, num_replicas=1, max_batch_size=2)
    path = c.root / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    out = c.cli("serve", "deploy", str(path), "--address", c.address)
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"http://127.0.0.1:{c.serve_port}/v1/completions"
    headers = {"Authorization": "Bearer mn-secret-key"}
    body = {"model": "mn", "prompt": "the quick brown", "max_tokens": 4, "temperature": 0}

    def ask():
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        return r if r.status_code == 200 else None

    r = wait_until(ask, 180, "Serve completion", every=0.5)
    choice = r.json()["choices"][0]
    assert isinstance(choice["text"], str) and r.json()["usage"]["completion_tokens"] >= 1

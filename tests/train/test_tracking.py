"""MLflow tracking (pipeline/train/tracking.py) against a local SQLite store: params, a metric history
through `MetricsLog`'s hook, and a re-submission that continues the same run."""

from __future__ import annotations

import json

import mlflow  # noqa: E402
import pytest

from pipeline.config import FluidConfig
from pipeline.errors import FluidError
from pipeline.train import tracking
from pipeline.train.metrics import MetricsLog

pytestmark = pytest.mark.usefixtures("tracking_on")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def _record(step: int) -> dict:
    return {"step": step, "loss": 3.0 - 0.1 * step, "ar_ce": 2.5, "tokens_per_s": 100.0, "data_wait_share": 0.0}


def _submit(run_dir, cfg: FluidConfig, steps: range, *, resume_step: int | None = None) -> str:
    """What `fit` and rank 0 of `train_loop_per_worker` do with the tracker, without Ray."""
    with tracking.tracked("auto", run_dir, "fluid-adapt", cfg.to_dict(), resume=True) as driver:
        worker = tracking.Tracker.attach(driver.spec())
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step, hooks=[worker])
        for step in steps:
            log.write(_record(step))
        log.eval(steps[-1], {"ar_ce": 2.4})
        worker.flush()
        driver.set_tags({"fluid.export": str(run_dir / "export")})
        driver.log_artifacts([run_dir / "metrics.jsonl"])
        return driver.run_id


def test_adapt_run_is_tracked_and_resubmission_continues_it(tmp_path):
    run_dir = tmp_path / "fluid-adapt"
    cfg = FluidConfig()
    first = _submit(run_dir, cfg, range(1, 4))
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == first
    assert (run_dir / tracking.DB_FILE).is_file()
    cfg.train.max_steps = 6  # a setting a re-submission may change
    second = _submit(run_dir, cfg, range(3, 7), resume_step=2)
    assert second == first

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / tracking.DB_FILE}")
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == json.dumps(cfg.train.lr)
    assert run.data.params["train.max_steps"] == "200"  # params cannot change: the new value is a tag
    assert run.data.tags["resubmit.train.max_steps"] == "6"
    assert run.data.tags["fluid.export"] == str(run_dir / "export")
    steps = sorted({m.step for m in client.get_metric_history(first, "loss")})
    assert steps == list(range(1, 7))
    assert sorted(m.step for m in client.get_metric_history(first, "val_ar_ce")) == [3, 6]
    assert [a.path for a in client.list_artifacts(first)] == ["metrics.jsonl"]
    assert run.info.artifact_uri.startswith((run_dir / tracking.ARTIFACTS).as_uri())  # not ./mlruns
    assert (run_dir / tracking.ARTIFACTS).is_dir()
    # metrics.jsonl stays, each step once
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6, 6]


def test_other_jobs_get_their_own_run_nested_under_the_adapt_run(tmp_path):
    run_dir = tmp_path / "run"
    adapt = _submit(run_dir, FluidConfig(), range(1, 3))
    with tracking.tracked("auto", run_dir, "fit-horizon", {"horizon": {"tau": 0.5}}) as t:
        t.log_metrics({"accuracy": 0.75, "note": "not a number"})
    assert t.run_id != adapt
    run = mlflow.tracking.MlflowClient(t.uri).get_run(t.run_id)
    assert run.data.tags["mlflow.parentRunId"] == adapt
    assert run.data.params == {"horizon.tau": "0.5"}
    assert run.data.metrics == {"accuracy": 0.75}
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == adapt  # still the adapt run


def test_modes_and_store(tmp_path, monkeypatch):
    assert tracking.tracking_uri("off", tmp_path) is None
    assert tracking.tracking_uri("auto", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.tracking_uri("auto", "s3://bucket/run") is None  # remote run folder: needs the env
    with pytest.raises(FluidError):
        tracking.tracking_uri("mlflow", "s3://bucket/run")
    with pytest.raises(FluidError):
        tracking.tracking_uri("on", tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_uri("auto", tmp_path) == "sqlite:///elsewhere.db"
    assert tracking.tracking_uri("off", tmp_path) is None
    monkeypatch.setattr(tracking, "available", lambda: False)
    assert tracking.tracking_uri("auto", tmp_path) is None
    with pytest.raises(FluidError):
        tracking.tracking_uri("mlflow", tmp_path)


def test_a_failing_store_does_not_stop_the_job(tmp_path, capsys):
    with tracking.tracked("auto", tmp_path, "x", {"a": 1}) as t:
        t.client = None  # every call now fails
        t.log_metrics({"step": 1, "loss": 1.0, "event": "eval"})
        t.set_tags({"k": "v"})
    assert not t.on
    assert "tracking off" in capsys.readouterr().err


def test_the_environment_switch_turns_auto_off_but_not_an_explicit_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.ENV_SWITCH, "off")
    assert tracking.tracking_uri("auto", tmp_path) is None
    assert tracking.tracking_uri("mlflow", tmp_path) == f"sqlite:///{tmp_path.resolve() / tracking.DB_FILE}"

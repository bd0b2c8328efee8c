"""Experiment tracking with MLflow (optional: `pip install 'fluid-on-ray[tracking]'`). No Ray.

In:  `train.tracking` (`auto`: on when mlflow is importable, unless the environment says
     `FLUID_TRACKING=off` — a switch for CI and test suites that install mlflow; `mlflow`: required; `off`),
     the environment's `MLFLOW_TRACKING_URI` / `MLFLOW_EXPERIMENT_NAME`, and a job's folder (the run folder
     of `fluid adapt`).
Out: `Tracker`: one MLflow run, written through `MlflowClient` (no global active run, so a Ray Train
     worker and the driver can share it): params (a config, flattened), metrics with their step (rank 0's
     `MetricsLog` hook, batched), tags and artifacts. The default store is a SQLite file in the job's
     folder, `<folder>/mlflow.db` (MLflow ≥ 3.7 refuses a new file store), with the artifacts in
     `<folder>/mlartifacts`; `<folder>/mlflow_run_id` names the run, so a re-submitted `fluid adapt`
     continues the same MLflow run.
     Tracking never stops a job: an error is reported once and tracking turns itself off.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from pipeline.errors import FluidError

RUN_ID_FILE = "mlflow_run_id"
DB_FILE = "mlflow.db"
ARTIFACTS = "mlartifacts"  # next to DB_FILE in the default store
EXPERIMENT = "fluid"
MODES = ("auto", "mlflow", "off")
ENV_SWITCH = "FLUID_TRACKING"  # "off": `auto` tracks nothing (an explicit train.tracking=mlflow still does)


def available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def tracking_uri(mode: str, folder: str | Path | None) -> str | None:
    """The store to track into, or None when tracking is off: `MLFLOW_TRACKING_URI`, else a SQLite file in
    `folder` (a local folder only: a run folder on object storage needs `MLFLOW_TRACKING_URI`)."""
    if mode not in MODES:
        raise FluidError(f"train.tracking must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and os.environ.get(ENV_SWITCH, "").lower() == "off"):
        return None
    if not available():
        if mode == "mlflow":
            raise FluidError("train.tracking=mlflow but mlflow is not installed: pip install 'fluid-on-ray[tracking]'")
        return None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if folder is None or "://" in str(folder):
        if mode == "mlflow":
            raise FluidError(f"train.tracking=mlflow: {folder} is not a local folder; set MLFLOW_TRACKING_URI")
        return None
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / DB_FILE}"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} → {"train.lr": "0.0001"} (MLflow params are strings of ≤ 6000 characters)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = (v if isinstance(v, str) else json.dumps(v, default=str))[:6000]
    return out


class Tracker:
    """One MLflow run. `open` starts or continues it; `attach` joins it from another process."""

    FLUSH_EVERY_S = 5.0

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id, self.client = uri, run_id, MlflowClient(uri)
        self.pending: list = []
        self.last_flush = time.monotonic()
        self.on = True

    @classmethod
    def open(cls, uri: str, name: str, *, id_file: Path | None = None, parent: str | None = None,
             artifacts: str | None = None) -> Tracker:
        """The run `id_file` names if the store has it (marked running again), else a new run `name` in
        `MLFLOW_EXPERIMENT_NAME` (default "fluid"; created with its artifacts under `artifacts`), whose id
        is written to `id_file`."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if id_file is not None and id_file.is_file():
            try:
                run_id = client.get_run(id_file.read_text().strip()).info.run_id
                client.update_run(run_id, status="RUNNING")
                return cls(uri, run_id)
            except MlflowException:
                pass  # another store, or the run was deleted: start a new one
        name_ = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        exp = client.get_experiment_by_name(name_)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name_, artifacts)
        tags = {"mlflow.parentRunId": parent} if parent else None
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        if id_file is not None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        return cls(uri, run_id)

    @classmethod
    def attach(cls, spec: dict | None) -> Tracker | None:
        """A tracker for `spec` ({"uri", "run_id"}, as `spec()` gives it), or None (also when this machine
        cannot open it: the job goes on untracked)."""
        try:
            return cls(spec["uri"], spec["run_id"]) if spec else None
        except Exception as e:
            print(f"[fluid] MLflow tracking off on this worker: {e}", file=sys.stderr)
            return None

    def spec(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id}

    def _guard(self, what: str, fn) -> None:
        """Run `fn()` unless tracking is off; turn it off on any error."""
        if not self.on:
            return
        try:
            fn()
        except Exception as e:  # tracking must never stop a job
            self.on = False
            print(f"[fluid] MLflow tracking off after an error ({what}): {e}", file=sys.stderr)

    def log_params(self, params: dict) -> None:
        """Flattened params; a key already logged with another value (a re-submission that changed it) is
        recorded as the tag `resubmit.<key>` instead (MLflow params cannot change)."""
        self._guard("params", lambda: self._log_params(flatten(params)))

    def _log_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        old = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in old]
        changed = [RunTag(f"resubmit.{k}", v) for k, v in flat.items() if k in old and old[k] != v]
        for i in range(0, max(len(new), len(changed)), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=changed[i:i + 100])

    def log_metrics(self, record: dict) -> None:
        """A `MetricsLog` record (every numeric key but `step` and `time`), sent in batches."""
        from mlflow.entities import Metric

        step, ts = int(record.get("step", 0)), int(1000 * record.get("time", time.time()))
        self.pending += [Metric(k, float(v), ts, step) for k, v in record.items()
                         if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if "event" in record or time.monotonic() - self.last_flush >= self.FLUSH_EVERY_S:
            self.flush()

    __call__ = log_metrics  # a `MetricsHook`

    def flush(self) -> None:
        batch, self.pending, self.last_flush = self.pending, [], time.monotonic()
        for i in range(0, len(batch), 1000):
            self._guard("metrics", lambda i=i: self.client.log_batch(self.run_id, metrics=batch[i:i + 1000]))

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._guard("tags", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))

    def log_artifacts(self, paths, artifact_path: str | None = None) -> None:
        """Local files (others are skipped) as artifacts of the run."""
        for p in paths:
            if p and "://" not in str(p) and Path(p).is_file():
                self._guard("artifacts", lambda p=p: self.client.log_artifact(self.run_id, str(p), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._guard("end", lambda: self.client.set_terminated(self.run_id, status))


def start(mode: str, folder: str | Path | None, name: str, params: dict | None = None, *,
          resume: bool = False) -> Tracker | None:
    """A tracker for a job writing to `folder` (None when tracking is off), its params logged. `resume`
    (`fluid adapt`): continue the run `<folder>/mlflow_run_id` names. Otherwise a new run, nested under that
    run when the folder has one (an evaluation or horizon fit of the run's export)."""
    uri = tracking_uri(mode, folder)
    if uri is None:
        return None
    local = folder is not None and "://" not in str(folder)
    id_file = Path(folder).expanduser() / RUN_ID_FILE if local else None
    try:
        parent = id_file.read_text().strip() if id_file is not None and id_file.is_file() and not resume else None
        own_store = local and not os.environ.get("MLFLOW_TRACKING_URI")  # not the working directory's ./mlruns
        artifacts = (Path(folder).expanduser().resolve() / ARTIFACTS).as_uri() if own_store else None
        tracker = Tracker.open(uri, name, id_file=id_file if resume else None, parent=parent, artifacts=artifacts)
    except Exception as e:
        print(f"[fluid] MLflow tracking off: {e}", file=sys.stderr)
        return None
    print(f"[fluid] MLflow run {tracker.run_id} in {uri}", flush=True)
    if params:
        tracker.log_params(params)
    return tracker


@contextlib.contextmanager
def tracked(mode: str, folder: str | Path | None, name: str, params: dict | None = None, *, resume: bool = False):
    """`start(...)` as a context: yields the tracker (or None) and ends its run FINISHED, or FAILED
    (KILLED when interrupted) if the block raises."""
    tracker = start(mode, folder, name, params, resume=resume)
    try:
        yield tracker
    except BaseException as e:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.end()

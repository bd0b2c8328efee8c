"""Quiet logs: each `[fluid]` line printed once, Ray's harmless chatter off unless `train.verbose`.

In:  the one setting, `train.verbose` (pipeline/config.py), recorded by `set_verbose` when a job parses
     its config (jobs/common.py) and read back by `verbose()`.
Out: `say(line)` (a progress line, one copy wherever it runs); the Ray knobs, applied where Ray starts
     or is joined (`pipeline.data.ray_pipeline.init_ray`) and where the trainer is built
     (`pipeline.train.fit`): `ray_init_options`, `DATA_CONTEXT_QUIET`, `quiet_driver`, `quiet_worker`
     (a `worker_process_setup_hook`), `train_log_level`, `one_copy_of_prints`, `quiet_ray_train`.

What is quiet at the default verbosity, each with Ray 2.60's own knob (nothing is grepped away):
* the driver's INFO lines ("Started a local Ray instance", "Connecting to existing Ray cluster"):
  `ray.init(logging_level=WARNING)`;
* Ray Data's progress dumps and execution-plan lines: `DataContext.enable_progress_bars` and
  `print_on_execution_start` off, its console handler at WARNING (its session log file keeps
  everything); our own throttled `[fluid] data: …` line (`Progress`) replaces them;
* Ray Train's INFO lines (worker-group start, each reported metrics dict):
  `RunConfig(logging_config=LoggingConfig(log_level=…))`, and the report logger named after a file path;
* Ray Train's placement-group cleaner, which warns every second while the State API cannot be
  reached (a local instance without the dashboard): its logger at ERROR in every worker process of the
  job, through the job's `worker_process_setup_hook`.
Always, whatever the verbosity: Ray Train's print patch is off (`RAY_TRAIN_ENABLE_PRINT_PATCH=0`), so a
`print` in a Train worker is one line on the driver, not one from the patched logger and one more from
the stream it tees to. WARNING and ERROR records, tracebacks and failed workers show as before.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time

_verbose = False

# Ray Train's print patch sends each `print` of a worker through the root logger (and tees it to a wrapped
# stdout): 2-3 copies of a line on the driver. Documented in ray.train.v2._internal.constants.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"

DATA_CONTEXT_QUIET = {"enable_progress_bars": False, "print_on_execution_start": False}
"""`ray.data.DataContext` settings at the default verbosity (untouched when verbose)."""

# Loggers of Ray that repeat harmless messages; set to ERROR at the default verbosity.
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Loggers whose INFO lines on the driver say nothing a user acts on ("Started Serve in namespace …",
# MLflow creating its tables); their warnings and errors still show.
DRIVER_INFO_LOGGERS = ("ray.serve", "mlflow")
DATA_PROGRESS = "ray.data._internal.progress"  # the progress dumps, and "Progress bars disabled" once


def set_verbose(on: bool) -> None:
    """Record `train.verbose` for this process (a job calls it once, after parsing its config)."""
    global _verbose
    _verbose = bool(on)


def verbose() -> bool:
    return _verbose


def say(line: str) -> None:
    """Print one progress line once. Inside a Ray Train worker with the print patch on, `print` logs
    through the root logger and also writes to the redirected stdout; writing to the stream directly gives
    one copy whatever the patch."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ray_init_options() -> dict:
    """Keyword arguments for `ray.init` at the current verbosity (empty when verbose). Joining a cluster
    from a submitted job, Ray merges the job's runtime env with this one."""
    if _verbose:
        return {}
    return {"logging_level": logging.WARNING, "runtime_env": {"worker_process_setup_hook": quiet_worker}}


def one_copy_of_prints() -> None:
    """Ray Train's print patch off for the trainers this driver builds next (whatever the verbosity): the
    trainer reads the driver's value and passes it to its controller and workers. A user's setting stays."""
    os.environ.setdefault(PRINT_PATCH_ENV, "0")


def quiet_driver() -> None:
    """This process's share of the knobs (module docstring): Ray Data's console at WARNING, its progress
    logger at ERROR. The `ray.data.DataContext` settings are `DATA_CONTEXT_QUIET`."""
    if _verbose:
        return
    logging.getLogger(DATA_PROGRESS).setLevel(logging.ERROR)
    for name in DRIVER_INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow sets its logger's level from this variable when it is imported (maybe later, maybe in a
    # worker started after this: workers inherit the environment); a user's own value stays
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console; the session log file keeps INFO
            handler.setLevel(logging.WARNING)


SERVE_QUIET = {"log_level": "WARNING", "enable_access_log": False}
"""`serve.start(logging_config=…)` for a Serve app a job starts for itself (the demo's serve stage, a
benchmark's local server) at the default verbosity: Serve's INFO lines and per-request access lines
would interleave with the job's own output. `fluid serve` keeps Serve's defaults: an operator wants them."""


def serve_logging_config() -> dict | None:
    """`SERVE_QUIET` at the default verbosity, None (Serve's defaults) when verbose."""
    return None if _verbose else dict(SERVE_QUIET)


def quiet_worker() -> None:
    """`worker_process_setup_hook` of a quiet job: runs in each of its worker processes at start-up."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)


def train_log_level(verbose: bool) -> str:
    """Ray Train's `LoggingConfig.log_level` (its console and app log files; the system log keeps all)."""
    return "INFO" if verbose else "WARNING"


def quiet_ray_train(verbose: bool = False) -> None:
    """In a Train worker: Ray Train logs every reported metrics dict at INFO level on every rank; keep its
    loggers at WARNING unless `train.verbose` asks for everything."""
    level = getattr(logging, train_log_level(verbose))
    logging.getLogger("ray.train").setLevel(level)
    # Ray Train 2.60 logs each report ("Reporting training result …") from a logger named after its
    # module's *file path*, outside the "ray.train" hierarchy
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
        if spec is not None and spec.origin:
            logging.getLogger(spec.origin).setLevel(level)


class Progress:
    """One `[fluid] <what>: …` line at most every `every_s` seconds (and at `done`), instead of a
    library's progress dump: `update(**counts)` as work finishes, `done(**counts)` at the end."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s = what, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, **counts) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            say(self._line(counts, now))

    def done(self, **counts) -> None:
        say(self._line(counts, time.perf_counter()) + ", done")

    def _line(self, counts: dict, now: float) -> str:
        parts = ", ".join(f"{v:,} {k}" for k, v in counts.items())
        return f"[fluid] {self.what}: {parts} ({now - self.t0:.0f} s)"

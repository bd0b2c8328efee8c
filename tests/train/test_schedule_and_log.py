"""The learning-rate schedule under a time budget, and metrics.jsonl after a replay (no Ray)."""

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.train.metrics import MetricsLog, drop_replayed
from pipeline.train.optim import build_optimizer, lr_lambda, plan_total_steps, probe_step


def _setup(*overrides):
    cfg = load_config(None, ["--train.warmup_steps=2", "--train.max_steps=1000", "--train.lr=1.0", *overrides])
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler, _ = build_optimizer(model, cfg)
    return cfg, optimizer, scheduler


def _run(cfg, optimizer, scheduler, steps, step_time=2.0, first_extra=5.0):
    totals = []
    for s in range(1, steps + 1):
        optimizer.step()
        scheduler.step()
        elapsed = s * step_time + first_extra
        totals.append(plan_total_steps(scheduler, cfg, {"step": s, "elapsed_s": elapsed,
                                                        "step_time_s": step_time + (first_extra if s == 1 else 0)}))
    return totals


def test_time_budget_sets_the_decay_horizon_once_after_warmup():
    cfg, opt, sched = _setup("--train.time_budget_s=105")
    totals = _run(cfg, opt, sched, 6)
    p = probe_step(cfg)
    assert p == 4 and totals[:p - 1] == [None] * (p - 1) and totals[p:] == [None, None]
    # at step 4, 13 s elapsed; 92 s left at 2 s per step (the slow first step excluded) → 46 more steps
    assert totals[p - 1] == 50 and sched.lr_lambdas[0].total == 50
    assert sched.get_last_lr()[0] == pytest.approx(lr_lambda(6, warmup=2, total=50))
    # the schedule (total included) travels in the scheduler state, so a resumed run keeps it
    cfg2, opt2, sched2 = _setup("--train.time_budget_s=999")
    sched2.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert sched2.lr_lambdas[0].total == 50 and sched2.lr_lambdas[0].estimated
    assert _run(cfg2, opt2, sched2, 6) == [None] * 6  # never re-estimated


def test_without_a_budget_the_schedule_follows_max_steps():
    cfg, opt, sched = _setup()
    assert _run(cfg, opt, sched, 6) == [None] * 6 and sched.lr_lambdas[0].total == 1000
    cfg, opt, sched = _setup("--train.time_budget_s=1e9", "--train.max_steps=300")
    assert _run(cfg, opt, sched, 4)[-1] == 300  # capped at max_steps


def test_replayed_steps_are_dropped_so_each_step_appears_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"event": "eval", "step": 0}] + [{"step": s, "loss": 1.0} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut by the failure
    log = MetricsLog(path, rank=0, resume_step=3)  # the last checkpoint was at step 3
    for s in (4, 5, 6):
        log.write({"step": s, "loss": 0.5, "ar_ce": 1.0, "draft_ce": 2.0, "tokens_per_s": 1.0, "data_wait_share": 0.0})
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert drop_replayed(path, 0) == 6 and path.read_text() == ""  # a restart from scratch logs eval 0 again
    path.write_text(json.dumps({"step": 5}) + "\n" + json.dumps({"event": "eval", "step": 5}) + "\n")
    assert drop_replayed(path, 5) == 1  # resuming the finished run: its final evaluation comes again


def test_quiet_ray_train_silences_the_per_report_line_unless_verbose():
    import importlib.util
    import logging

    from pipeline.logs import quiet_ray_train

    # Ray Train logs "Reporting training result …" from a logger named after its module's file path
    per_report = logging.getLogger(importlib.util.find_spec("ray.train.v2._internal.execution.context").origin)
    per_report.setLevel(logging.INFO)  # as on a Ray Train worker, whose logging Ray configures at INFO
    quiet_ray_train(verbose=False)
    assert per_report.level == logging.WARNING and logging.getLogger("ray.train").level == logging.WARNING
    quiet_ray_train(verbose=True)
    assert per_report.level == logging.INFO
    quiet_ray_train(verbose=False)


def test_metrics_hooks_get_every_record_as_written_and_only_on_rank_0(tmp_path):
    seen, other = [], []
    log = MetricsLog(tmp_path / "m.jsonl", rank=0, hooks=[seen.append])
    log.write({"step": 1, "loss": 0.5, "ar_ce": 1.0, "draft_ce": 2.0, "tokens_per_s": 3.0, "data_wait_share": 0.0,
               "note": "x", "skipped": [1, 2]})
    log.eval(1, {"ar_ce": 0.25, "verify_tpf": 1.5})
    written = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert seen == written and len(seen) == 2
    assert seen[0]["note"] == "x" and "skipped" not in seen[0]  # what the file holds, not the raw dict
    assert seen[1] == {"time": seen[1]["time"], "event": "eval", "step": 1, "val_ar_ce": 0.25, "val_verify_tpf": 1.5}
    MetricsLog(tmp_path / "r1.jsonl", rank=1, hooks=[other.append]).write({"step": 1, "loss": 0.5})
    assert other == [] and not (tmp_path / "r1.jsonl").exists()

"""`fluid bench serve --policies ar,verify` (pipeline/bench/serve_sweep.py): the agreement check and the
goals on synthetic runs (no Ray), and the whole sweep against a local Serve app of a tiny random export."""

import json
import socket
from types import SimpleNamespace

import pytest

from pipeline.bench import serve_sweep
from pipeline.bench.serve_sweep import COLUMNS, agreement, goals, summarize


def run_row(policy, clients, rnd, tok_s):
    return {"round": rnd, "policy": policy, "clients": clients, "requests": 4, "errors": 0, "unfinished": 0,
            "tok/s": tok_s, "ttft_p50_ms": 10.0, "tok_p50_ms": 2.0, "tok_p99_ms": 5.0, "tok/fwd": 1.0}


def test_agreement_names_the_runs_that_differ():
    same = {("ar", 1, 1): {0: ["a b"], 1: ["c"]}, ("verify", 4, 1): {0: ["a b", "a b"], 1: ["c"]}}
    assert agreement(same, ["a b", "c"], 2) == [] and agreement(same, None, 2) == []
    off = {**same, ("verify", 16, 2): {1: ["c", "x"]}}
    assert agreement(off, ["a b", "c"], 2) == ["prompt 1: differs from the single-request reference in verify@16 round 2"]
    assert agreement(same, ["a b", "d"], 2)[0].startswith("prompt 1: differs from the single-request reference in ar@1")


def test_summary_ratios_and_goals():
    rows = [run_row("ar", 1, r, 10.0) for r in (1, 2)] + [run_row("verify", 1, 1, 15.0), run_row("verify", 1, 2, 12.0)]
    rows += [run_row("ar", 16, r, 100.0) for r in (1, 2)] + [run_row("verify", 16, r, 90.0) for r in (1, 2)]
    summary = summarize(rows, ["ar", "verify"], [1, 16])
    assert [(r["policy"], r["clients"]) for r in summary] == [("ar", 1), ("ar", 16), ("verify", 1), ("verify", 16)]
    assert summary[0]["verify/ar"] is None and summary[2]["verify/ar"] == pytest.approx(1.35)
    assert summary[3]["verify/ar"] == pytest.approx(0.9) and summary[2]["requests"] == 8
    checks = {name: ok for name, ok, _ in goals(summary, [], min_ratio=1.0, min_speedup=1.3, checked_reference=True)}
    assert checks == {"greedy outputs identical across levels, policies, rounds and the single-request sampler": True,
                      "0 errors": True, "verify tok/s >= 1x ar at 1 clients": True,
                      "verify tok/s >= 1.3x ar at 1 clients": True, "verify tok/s >= 1x ar at 16 clients": False}
    bad = goals(summary, ["prompt 0: …"], min_ratio=0.0, min_speedup=0.0, checked_reference=False)
    assert [ok for _, ok, _ in bad] == [False, True, True, True, True]


def test_a_mismatch_with_the_reference_makes_the_exit_status_1(monkeypatch, capsys):
    outputs = {(p, c, 1): {0: ["same"]} for p in ("ar", "verify") for c in (1, 2)}
    rows = [run_row(p, c, 1, 10.0) for p in ("ar", "verify") for c in (1, 2)]
    monkeypatch.setattr(serve_sweep, "measure_sweep", lambda *a: (rows, outputs))
    monkeypatch.setattr(serve_sweep, "sweep_prompts", lambda *a: ["a prompt"])
    args = SimpleNamespace(policies="ar,verify", levels="1,2", prompts=None, max_tokens=8, rounds=1,
                           min_ratio=0.0, min_speedup=0.0, out=None)
    cfg = SimpleNamespace(serve=SimpleNamespace(model="/some/export"))
    for ref, rc in ((["same"], 0), (["other"], 1)):
        monkeypatch.setattr(serve_sweep, "reference", lambda *a, ref=ref: ref)
        assert serve_sweep.run_sweep(args, cfg, "http://127.0.0.1:1", {}, "m", tiny=True) == rc
    out = capsys.readouterr().out
    assert "MISMATCH prompt 0: differs from the single-request reference in ar@1 round 1" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_bench_serve_policies_on_a_tiny_export(ray_local, tmp_path, capsys):
    """One server, ar then verify at 1 and 2 clients: the table's columns, every greedy output equal to the
    sampler's single-request float32 output, and the exit status (speed goals set to 0: a tiny random
    model's drafts are noise)."""
    from ray import serve

    from jobs.load_test import main

    serve.shutdown()  # an earlier module's Serve keeps its own HTTP port
    out = tmp_path / "rows.jsonl"
    rc = main(["--tiny", "--policies", "ar,verify", "--levels", "1,2", "--rounds", "1", "--max-tokens", "12",
               "--min-ratio", "0", "--min-speedup", "0", f"--serve.port={free_port()}", "--out", str(out)])
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.split()[:2] == ["policy", "clients"])
    assert tuple(header.split()) == COLUMNS
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["policy"], r["clients"]) for r in rows] == [("ar", 1), ("ar", 2), ("verify", 1), ("verify", 2)]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == 4 and r["tok/s"] > 0 and r["ttft_p50_ms"] > 0, r
        assert r["tok_p99_ms"] >= r["tok_p50_ms"] > 0 and r["tok/fwd"] >= 1.0, r
    assert rows[0]["verify/ar"] is None and rows[2]["verify/ar"] > 0
    assert ("goal greedy outputs identical across levels, policies, rounds and the single-request sampler: "
            "0 prompts differ — met") in text
    assert "MISMATCH" not in text and rc == 0, text

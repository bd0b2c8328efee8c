"""One JSON schema and one table style for the benchmarks (pipeline/records.py, pipeline/bench/report.py,
jobs/bench.py)."""

import json

import pytest

from pipeline.errors import FluidError
from pipeline.records import SCHEMA, emit, markdown, record


def test_record_and_table(tmp_path, capsys):
    rows = [{"policy": "ar", "tokens/s": 15.25, "× HF": 1.0}, {"policy": "verify", "tokens/s": 16.0, "× HF": None}]
    rec = record("sampler", ["policy", "tokens/s", "× HF"], rows, command="fluid bench sampler --repeats 3",
                 goals=[{"goal": "never slower than AR", "value": 0.98, "met": True}], load_before=1.5)
    assert rec["schema"] == SCHEMA and rec["benchmark"] == "sampler" and rec["machine"]["cpus"] >= 1
    table = markdown(rec)
    lines = table.splitlines()
    assert lines[1] == "`fluid bench sampler --repeats 3`"
    assert "| policy | tokens/s | × HF |" in lines and "| ar | 15.2 | 1.000 |" in lines
    assert "| verify | 16.0 | — |" in lines and "- goal never slower than AR: 0.980 — met" in table
    emit(rec, tmp_path / "out" / "sampler.json")
    assert json.loads((tmp_path / "out" / "sampler.json").read_text())["rows"] == rows
    assert "| ar | 15.2 | 1.000 |" in capsys.readouterr().out


def test_bench_dispatch_names_its_benchmarks(capsys):
    from jobs.bench import main

    assert main([]) == 2 and "fluid bench sampler" in capsys.readouterr().out
    with pytest.raises(FluidError, match="unknown benchmark 'gpu'"):
        main(["gpu"])


def test_bench_record_names_each_benchmarks_columns():
    from pipeline.bench.report import bench_record

    raw = {"rows": [{"policy": "ar", "tokens_per_s": 10.0, "cpu_speedup_vs_ar": 1.0}], "goals": [],
           "hf_tokens_per_s": 9.0, "ar_equals_hf": 4, "hf_stock_tokens_per_s": 8.0, "matmul": "stock"}
    rec = bench_record("sampler", json.dumps(raw), command="fluid bench sampler", commit="abc")
    assert rec["rows"] == [{"policy": "ar", "tokens/s": 10.0}] and rec["columns"][:3] == ["policy", "tokens/forward",
                                                                                          "tokens/s"]
    assert rec["settings"] == {"hf_tokens_per_s": 9.0, "ar_equals_hf": 4, "hf_stock_tokens_per_s": 8.0,
                               "matmul": "stock", "dtype": None, "masked_step_ratio": None, "noise_floor": None}
    line = json.dumps({"time": 0.0, "tok/s": 2.0, "clients": 1, "round": 1})
    serve = bench_record("serve", f"{line}\n\n", command="fluid bench serve", commit="abc")
    assert serve["columns"] == ["round", "clients", "tok/s"] and serve["rows"][0]["time"] == 0.0
    assert bench_record("serve", "", command="fluid bench serve", commit="abc")["columns"] == []

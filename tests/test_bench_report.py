"""One JSON schema and one table style for the benchmarks (pipeline/records.py, jobs/bench.py)."""

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

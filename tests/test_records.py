"""Every figure README.md and BENCHMARKS.md link to a record says what it measured.

A record link is Markdown `[TEXT](benchmarks/records/NAME.json)`. It holds when:
* the file exists and is JSON, with the fields every record has: `figure` (what it measures),
  `command`, `commit`, `date` and `machine` (with `cpu_model` and `cpus`);
* TEXT quotes at least one number, and every number in TEXT equals a numeric leaf of the record
  (any depth; booleans are not numbers) rounded to the number of decimals TEXT quotes: "0.98×" matches
  0.9812, "+56 %" matches 55.96, "3.995" matches 3.99512. Signs count; thousands may be grouped by
  spaces or commas ("50 685 939").
Figures without a record are marked "historical, no record" in BENCHMARKS.md (see its opening).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md")
LINK = re.compile(r"\[([^\]]+)\]\((benchmarks/records/[^)\s#]+)(?:#[^)]*)?\)")
NUMBER = re.compile(r"(?<![\w.])([-−+]?)(\d{1,3}(?:[ ,\u2009\u202f]\d{3})+|\d+)(?:\.(\d+))?")
REQUIRED = ("figure", "command", "commit", "date", "machine")


def quoted_numbers(text: str) -> list[tuple[float, int]]:
    """The numbers a link text quotes, as (value, decimals quoted)."""
    out = []
    for sign, whole, frac in NUMBER.findall(text):
        value = float(re.sub(r"[ ,\u2009\u202f]", "", whole) + (f".{frac}" if frac else ""))
        out.append((-value if sign in "-−" and sign else value, len(frac)))
    return out


def numeric_leaves(obj) -> list[float]:
    """Every int or float anywhere in a JSON value (booleans excluded)."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return [x for v in obj for x in numeric_leaves(v)]
    return []


def check_link(text: str, target: str, root: Path = ROOT) -> list[str]:
    """Problems of one record link (empty when it holds; the module docstring has the rules)."""
    path = root / target
    if not path.is_file():
        return [f"{target}: no such file"]
    try:
        rec = json.loads(path.read_text())
    except ValueError as e:
        return [f"{target}: not JSON ({e})"]
    problems = [f"{target}: no {k!r}" for k in REQUIRED if not rec.get(k)]
    problems += [f"{target}: machine has no {k!r}" for k in ("cpu_model", "cpus")
                 if not (rec.get("machine") or {}).get(k)]
    numbers, leaves = quoted_numbers(text), numeric_leaves(rec)
    if not numbers:
        problems.append(f"[{text}]: quotes no number")
    for value, decimals in numbers:
        if not any(abs(round(leaf, decimals) - value) < 0.5 * 10 ** -(decimals + 2) for leaf in leaves):
            problems.append(f"[{text}]: {value} is not among the values of {target} (at {decimals} decimals)")
    return problems


def record_links(markdown: str) -> list[tuple[str, str]]:
    return LINK.findall(markdown)


def test_every_record_link_resolves_and_holds_the_quoted_value():
    links = [(doc, text, target) for doc in DOCS for text, target in record_links((ROOT / doc).read_text())]
    assert {doc for doc, _, _ in links} == set(DOCS)  # both documents link records
    problems = [f"{doc}: {p}" for doc, text, target in links for p in check_link(text, target)]
    assert not problems, "\n".join(problems)


def test_every_committed_record_is_linked():
    linked = {target for doc in DOCS for _, target in record_links((ROOT / doc).read_text())}
    committed = {f"benchmarks/records/{p.name}" for p in (ROOT / "benchmarks" / "records").glob("*.json")}
    assert committed <= linked | {"benchmarks/records/grad_accum_step_time.json"}


@pytest.fixture
def fake_root(tmp_path):
    rec = {"figure": "x", "command": "fluid bench x", "commit": "abc", "date": "2026-12-06",
           "machine": {"cpu_model": "cpu", "cpus": 2}, "rows": [{"× ar": 0.9812, "ok": True}, {"n": 50685939}],
           "goals": [{"value": -16.3}]}
    (tmp_path / "benchmarks" / "records").mkdir(parents=True)
    (tmp_path / "benchmarks" / "records" / "r.json").write_text(json.dumps(rec))
    (tmp_path / "benchmarks" / "records" / "bare.json").write_text(json.dumps({"rows": [1.5]}))
    (tmp_path / "benchmarks" / "records" / "broken.json").write_text("{")
    return tmp_path


@pytest.mark.parametrize("text", ["0.98×", "0.981", "1", "−16 %", "-16.3", "50 685 939 tokens", "50,685,939"])
def test_the_checker_accepts_quoted_values_of_the_record(text, fake_root):
    assert check_link(text, "benchmarks/records/r.json", fake_root) == []


@pytest.mark.parametrize("text, target, problem", [
    ("0.97×", "benchmarks/records/r.json", "0.97 is not among"),
    ("0.9813", "benchmarks/records/r.json", "not among"),
    ("+16 %", "benchmarks/records/r.json", "16.0 is not among"),
    ("50 685 940", "benchmarks/records/r.json", "not among"),
    ("met", "benchmarks/records/r.json", "quotes no number"),
    ("0.98×", "benchmarks/records/missing.json", "no such file"),
    ("1", "benchmarks/records/broken.json", "not JSON"),
    ("1.5", "benchmarks/records/bare.json", "no 'figure'"),
])
def test_the_checker_rejects_a_bad_link(text, target, problem, fake_root):
    assert any(problem in p for p in check_link(text, target, fake_root))


def test_links_are_found_in_markdown():
    md = "a [0.98×](benchmarks/records/a.json) b [docs](docs/method.md) [2.1](benchmarks/records/b.json#x)"
    assert record_links(md) == [("0.98×", "benchmarks/records/a.json"), ("2.1", "benchmarks/records/b.json")]

"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they catch what they forbid.

`lint-imports` counts every import, function-level ones included. A backward import (decode → train)
and a Ray import in the core, added to a copy of the tree, break the contracts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, capture_output=True, text=True, env=env, timeout=300)


def test_the_tree_keeps_its_import_contracts():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 kept, 0 broken" in out.stdout


def test_a_backward_import_and_ray_in_the_core_break_them(tmp_path):
    for part in ("pipeline", "jobs"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "pipeline" / "decode" / "kvcache.py", "a") as fh:
        fh.write("\n\ndef _backward():\n    from pipeline.train import export  # noqa: F401\n")
    with open(tmp_path / "pipeline" / "data" / "noise.py", "a") as fh:
        fh.write("\n\ndef _ray():\n    import ray  # noqa: F401\n")
    with open(tmp_path / "pipeline" / "decode" / "sampler.py", "a") as fh:  # the cycle Sampler.from_export made
        fh.write("\n\ndef _cycle():\n    from pipeline.decode.load import load_sampler  # noqa: F401\n")
    out = _lint(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "pipeline.decode is not allowed to import pipeline.train" in out.stdout
    assert "pipeline.decode.kvcache -> pipeline.train.export" in out.stdout
    assert "pipeline.data.noise -> ray" in out.stdout
    # serving reaches the trainer through decode now (indirect chains count): all four are broken
    assert "pipeline.serve is not allowed to import pipeline.train" in out.stdout
    assert "pipeline.decode.sampler -> pipeline.decode.load" in out.stdout
    assert "0 kept, 4 broken" in out.stdout

"""The package layout: the core stages import without Ray; users' Serve import path still resolves."""

from __future__ import annotations

import subprocess
import sys


def _core() -> list[str]:
    """The modules of pyproject.toml's "never imports Ray" contract (one home for the list). lint-imports
    checks our own imports of ray (tests/test_layering.py); this test imports them and looks at
    sys.modules, which also catches ray arriving through a third-party package."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((repo / "pyproject.toml").read_text())
    contract = next(c for c in conf["tool"]["importlinter"]["contracts"] if c.get("forbidden_modules") == ["ray"])
    modules = []
    for name in contract["source_modules"]:
        folder = repo.joinpath(*name.split("."))
        if not folder.is_dir():
            modules.append(name)
            continue
        modules += [name if f.stem == "__init__" else f"{name}.{f.stem}" for f in sorted(folder.glob("*.py"))]
    return modules


CORE = _core()


def _imported_ray(modules: list[str]) -> list[str]:
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_core_stages_never_import_ray():
    assert _imported_ray(CORE) == []


def test_the_check_sees_ray_when_it_is_imported():
    assert "ray" in _imported_ray(["pipeline.data.ray_pipeline"])


def test_serve_import_path_of_users_configs_resolves():
    import importlib

    mod = importlib.import_module("pipeline.serve")
    assert callable(mod.app_builder)
    from pipeline.serve.app import app_builder

    assert mod.app_builder is app_builder

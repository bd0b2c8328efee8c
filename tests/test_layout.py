"""The package layout: the core stages import without Ray; users' Serve import path still resolves."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "pipeline.config", "pipeline.errors", "pipeline.batch", "pipeline.export_format",
    "pipeline.sources.corpus", "pipeline.sources.model_source",
    "pipeline.data.packing", "pipeline.data.noise", "pipeline.data.local",
    "pipeline.model.causal_lm", "pipeline.model.attention", "pipeline.model.losses", "pipeline.model.parallelize",
    "pipeline.train.step", "pipeline.train.optim", "pipeline.train.export", "pipeline.train.checkpoint",
    "pipeline.decode.sampler", "pipeline.decode.decoder", "pipeline.decode.policies", "pipeline.decode.kvcache",
    "pipeline.decode.horizon_head", "pipeline.decode.horizon_fit", "pipeline.decode.load",
    "pipeline.serve.openai_api",
    "pipeline.sources.eval_data", "pipeline.eval.horizon_ce", "pipeline.eval.metrics", "pipeline.eval.report",
    "pipeline.eval.ablate",
]


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

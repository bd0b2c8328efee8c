"""`fluid fit-horizon` / `python -m jobs.fit_horizon --export DIR`: Stage II horizon head on Ray Train.

Freezes the adapted model of an export folder, runs it over held-out (validation) sequences with
full-length draft spans at random cursors, computes the oracle horizon K* of every span (τ =
`horizon.tau`), trains the two-layer K-head with KL to a Gaussian soft target around K*
(pipeline/decode/horizon_fit.py), and saves it as `horizon_head.safetensors` in the export folder (the
`khead` policy of the sampler loads it), recording τ, σ and the fit metrics in `fluid.json`.
Workers split the sequences; the pairs are gathered and every worker fits the same head (seeded).

`--export` may be a local or shared folder or an `s3://` / `gs://` URL. On a multi-node cluster the
export is staged content-addressed under `train.storage_path` and each node reads its own cached copy;
rank 0 hands the fitted head back as a Ray Train checkpoint and the driver writes it into the export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common import parse_job_args, run_job
from pipeline.errors import FluidError
from pipeline.export_format import HORIZON_HEAD_FILE as HEAD_FILE
from pipeline.export_format import read_fluid_meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid fit-horizon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True,
                        help="export folder written by `fluid adapt`: a local or shared path, or s3://… / gs://…")
    args, cfg = parse_job_args(parser, argv)
    import tempfile

    from pipeline.export_format import copy_folder
    from pipeline.sources.staging import is_remote

    with tempfile.TemporaryDirectory(prefix="fluid-export-") as tmp:
        export = copy_folder(args.export, Path(tmp) / "export") if is_remote(args.export) else Path(args.export)
        return _main(cfg, args.export, export, read_fluid_meta(export).to_dict())


def _main(cfg, target: str, export: Path, meta: dict) -> int:
    h = cfg.horizon
    if h.tau <= 0 or h.sigma <= 0 or h.examples < 1 or h.spans_per_example < 1 or h.workers < 1:
        raise FluidError("horizon.tau, horizon.sigma must be > 0 and horizon.examples, spans_per_example, "
                         "workers ≥ 1")
    if int(meta["k_max"]) < 2:
        raise FluidError(f"{export} was trained with k_max={meta['k_max']}: no drafts to fit a horizon on")
    import dataclasses

    from pipeline.sources.staging import is_remote
    from pipeline.train.horizon import fit
    from pipeline.train.tracking import tracked

    folder = None if is_remote(target) else Path(target).resolve().parent  # the adapt run's folder, by default
    params = {"export": target, "horizon": dataclasses.asdict(h)}
    with tracked(cfg.train.tracking, folder, "fit-horizon", params) as tracker:
        metrics = fit(cfg, export, meta, target=target)
        if tracker:
            tracker.log_metrics(metrics)
    print(f"[fluid] horizon head → {target.rstrip('/')}/{HEAD_FILE}: " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))

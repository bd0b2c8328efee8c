"""Stage II on Ray Train (`fluid fit-horizon`): fit the horizon head (K-head) of an export, frozen.

In:  a `FluidConfig` (`horizon.*`), a local export folder and its `fluid.json`. Out: `fit(cfg, export,
     meta, target)` → the fit's metrics, with the head written next to the export (`save_head`:
     `horizon_head.pt` and the `horizon_head` entry of `fluid.json`, each atomically) and to `target`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from pipeline.errors import FluidError
from pipeline.export_format import FLUID_META_FILE, read_fluid_meta, write_fluid_meta
from pipeline.export_format import HORIZON_HEAD_FILE as HEAD_FILE

INFO_FILE = "info.json"  # rank 0's fit metrics, next to the head in its Ray Train checkpoint


def fit(cfg, export: Path, meta: dict, target: str | None = None) -> dict:
    """Fit the head for the local export folder `export` and write it there and to `target` (default:
    `export`; a URL gets the two changed files uploaded)."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.batch import COLUMNS
    from pipeline.data.ray_pipeline import build_dataset, collect_rows, init_ray
    from pipeline.logs import one_copy_of_prints, train_log_level
    from pipeline.sources.staging import stage_folder
    from pipeline.train.cluster import stage_root
    from pipeline.train.preflight import check_storage

    init_ray()
    storage = check_storage(cfg.train.storage_path)
    root = stage_root(storage)  # multi-node: the export goes to storage, each node fetches its copy
    export_ref = stage_folder(export, root) if root else str(export.resolve())
    noise = dataclasses.replace(cfg.noise, k_max=int(meta["k_max"]), span_distribution="fixed", rho=0.0,
                                spans=cfg.horizon.spans_per_example, mode="causal")
    data = dataclasses.replace(cfg.data, shuffle=True, seed=cfg.horizon.seed)
    ds = build_dataset(data, noise, tokenizer_path=str(export), mask_token_id=int(meta["mask_token_id"]),
                       split="validation", epoch=0, cache_dir=cfg.model.cache_dir, stage_root=root)
    rows = collect_rows(ds.select_columns(list(COLUMNS)), cfg.horizon.examples)
    if rows is None:
        raise FluidError("the validation split has no sequences to fit the horizon head on")
    one_copy_of_prints()
    trainer = TorchTrainer(  # the examples go to every worker whole, by reference (pipeline/data/rows.py)
        _loop, train_loop_config={"fluid": cfg.to_dict(), "export": export_ref, "k_max": noise.k_max,
                                  "examples": ray.put(rows)},
        scaling_config=ScalingConfig(num_workers=cfg.horizon.workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="fit-horizon", storage_path=storage,
                             logging_config=LoggingConfig(log_level=train_log_level(cfg.train.verbose))),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise FluidError("the horizon-head fit reported no result")
    from pipeline.decode.horizon_head import HorizonHead

    with result.checkpoint.as_directory() as d:  # rank 0's head and metrics, from the run's storage
        info = json.loads((Path(d) / INFO_FILE).read_text())
        save_head(HorizonHead.load(Path(d) / HEAD_FILE), export, info)
    if target is not None and target != str(export):
        from pipeline.sources.staging import _fs, is_remote, join

        if is_remote(target):
            for name in (HEAD_FILE, FLUID_META_FILE):
                fs, path = _fs(join(target, name))
                fs.put_file(str(export / name), path)
    return info


def _loop(config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.config import from_dict
    from pipeline.decode.horizon_fit import collect_pairs, fit_head, oracle_horizon
    from pipeline.decode.load import load_export
    from pipeline.logs import quiet_ray_train
    from pipeline.sources.staging import local_folder

    cfg = from_dict(config["fluid"])
    quiet_ray_train(cfg.train.verbose)
    k_max = int(config["k_max"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, _, _ = load_export(local_folder(config["export"], cfg.model.cache_dir))  # this node's copy
    model.requires_grad_(False)
    feats, ces = [], []
    for i, batch in enumerate(ray.get(config["examples"]).iter_torch_batches(batch_size=4)):
        if i % world != rank:
            continue
        f, c = collect_pairs(model, {k: v.long() for k, v in batch.items()}, k_max=k_max)
        feats.append(f)
        ces.append(c)
    local = (torch.cat(feats), torch.cat(ces)) if feats else (torch.zeros(0, 1), torch.zeros(0, k_max - 1))
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    features = torch.cat([p[0] for p in parts if p[0].shape[0]])
    ce = torch.cat([p[1] for p in parts if p[1].shape[0]])
    k_star = oracle_horizon(ce, cfg.horizon.tau)
    head, metrics = fit_head(features, k_star, k_max=k_max, sigma=cfg.horizon.sigma, epochs=cfg.horizon.epochs,
                             lr=cfg.horizon.lr, seed=cfg.horizon.seed)
    metrics["mean_ce_k2"] = float(ce[:, 0].mean())
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fluid-head-") as d:
        if rank == 0:  # the driver writes it into the export: this node's copy may be a cached one
            head.save(Path(d) / HEAD_FILE)
            (Path(d) / INFO_FILE).write_text(json.dumps({"tau": cfg.horizon.tau, "sigma": cfg.horizon.sigma,
                                                           **metrics}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def save_head(head, export: Path, info: dict) -> None:
    """Write the head and record it in fluid.json, each atomically (temp file, then rename)."""
    tmp = export / f".{HEAD_FILE}.tmp"
    head.save(tmp)
    os.replace(tmp, export / HEAD_FILE)
    meta = read_fluid_meta(export)
    write_fluid_meta(export, dataclasses.replace(meta, horizon_head={"file": HEAD_FILE, **info}))


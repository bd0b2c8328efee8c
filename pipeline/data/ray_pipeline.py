"""Ray Data pipeline: corpora → tokenized, packed, noised two-stream examples (docs/method.md §2–§3, docs/architecture.md).

In:  a `DataConfig` + `NoiseConfig`, a resolved tokenizer folder (pipeline/sources/model_source.py: a fast
     tokenizer with `[M]`) and the `[M]` id; a split and an epoch.
Out: `build_dataset` → `ray.data.Dataset`, one row per example: the batch-format columns of
     pipeline/data/noise.py (fixed length T = seq_len + draft tokens; + `weight` for the bidirectional
     baseline) and `seq_index` (int64 global sequence index, pipeline/data/packing.py).
     `iter_examples_local` → the same rows in the same order from one plain process (data_local.py).
     `PipelineStats.summary()` → documents read/kept/skipped per reason, tokens, sequences, dropped
     remainder, spans, draft targets, tokens/s (`format_summary` prints it).
     `write_parquet` / `read_preprocessed` store and reload the rows (any fsspec URL);
     `iter_train_batches` yields fixed-shape torch batches and skips consumed ones on resume.

Stages: list files (driver) → read + cut into packing units (Ray tasks; Ray fuses them into the
tokenizer actors, so texts never cross the object store) → tokenize (actor pool, one fast tokenizer
per actor, batch API) → pack + noise per unit (Ray tasks; seed `rng_for(seed, epoch, seq_index)`) →
optional seeded shuffle (sort by `shuffle_keys(seq_index)`). Every stage handles whole units and the
dataset preserves order, so rows and their order depend only on the config — never on blocks,
tasks or actors. Counters flow out of the tasks into a small actor, keyed by file / unit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import uuid
import weakref
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray

from pipeline import logs
from pipeline.config import DataConfig, NoiseConfig
from pipeline.data import local as data_local
from pipeline.data.local import (  # noqa: F401  (re-exported: the data API lives here)
    KEY,
    PROCESS_LOCAL_PROTOCOLS,
    UNIT_CHARS,
    Counters,
    Params,
    format_summary,
    load_fast_tokenizer,
    make_params,
    pack_and_noise,
    plan_sources,
    tokenize_units,
)
from pipeline.errors import FluidError
from pipeline.sources.corpus import RecordStats

SUMMARY_FILE = "fluid_summary.json"

class _CounterStore:
    """Counters of every `PipelineStats` of this driver, by run id: one small actor for all runs, so a
    run does not wait for a counting process to start."""

    def __init__(self) -> None:
        self.runs: dict[str, Counters] = {}

    def report(self, run: str, kind: str, key: int, values: dict) -> None:
        self.runs.setdefault(run, Counters()).report(kind, key, values)

    def snapshot(self, run: str) -> dict:
        return self.runs[run].snapshot() if run in self.runs else Counters().snapshot()

    def drop(self, run: str) -> None:
        self.runs.pop(run, None)


_store: tuple[str, object] | None = None  # (Ray job id, actor handle)


def _counter_store():
    global _store
    job = ray.get_runtime_context().get_job_id()
    if _store is None or _store[0] != job:
        _store = (job, ray.remote(num_cpus=0)(_CounterStore).remote())
    return _store[1]


def _drop_run(handle, run: str) -> None:
    try:
        if ray.is_initialized():
            handle.drop.remote(run)
    except Exception:  # interpreter or Ray shutting down: nothing left to free
        pass


class PipelineStats:
    """The run's counters. Pass it to `build_dataset` / `iter_examples_local`, consume the rows, then
    call `summary(seconds)` (a dict; `format_summary` makes the table). One instance per execution."""

    def __init__(self) -> None:
        self.local = Counters()
        self._sink = None

    def sink(self) -> tuple:
        """(counting actor, run id): where the Ray tasks report (bound on first use)."""
        if self._sink is None:
            self._sink = (_counter_store(), uuid.uuid4().hex)
            weakref.finalize(self, _drop_run, *self._sink)
        return self._sink

    def summary(self, seconds: float | None = None) -> dict:
        snaps = [self.local.snapshot()]
        if self._sink is not None:
            snaps.append(ray.get(self._sink[0].snapshot.remote(self._sink[1])))
        return data_local.summarize(snaps, seconds)


def _report(sink, kind: str, key: int, values: dict) -> None:
    if sink is not None:
        ray.get(sink[0].report.remote(sink[1], kind, key, values))


def iter_examples_local(data_cfg: DataConfig, noise_cfg: NoiseConfig, *, stats: PipelineStats | None = None,
                        **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """`data_local.iter_examples_local`, counting into `stats`: the rows of `build_dataset`, in order."""
    counters = stats.local if stats is not None else None
    return data_local.iter_examples_local(data_cfg, noise_cfg, counters=counters, **kwargs)


# --- the Ray stages ---------------------------------------------------------------------------------


def _read_stage(batch: pa.Table, *, split, data_cfg, unit_chars, sink) -> Iterator[pa.Table]:
    for item in batch.to_pylist():
        stats = RecordStats()
        units = data_local.file_units(item, split=split, data_cfg=data_cfg, unit_chars=unit_chars, stats=stats)
        for uid, texts in units:
            yield pa.table({"unit_id": pa.array([uid], pa.int64()),
                            "texts": pa.array([texts], pa.large_list(pa.large_string()))})
        _report(sink, "files", item["file_index"], stats.as_dict())


class _TokenizeStage:
    """One fast tokenizer per actor; one batch-API call per batch of units."""

    def __init__(self, tokenizer_path: str, eos_id: int, parallelism: bool | None) -> None:
        if parallelism is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallelism else "false"
        from pipeline.sources.staging import local_folder

        self.tokenizer = load_fast_tokenizer(local_folder(tokenizer_path))  # a staged URL: this node's copy
        self.eos_id = eos_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Units in plan order (unit ids ascend with (file, unit)): the actor pool may hand over a bundle
        # of read blocks in the order they finished, and the rows' order decides the training batches.
        batch = batch.sort_by("unit_id")
        done = tokenize_units(self.tokenizer, batch.column("texts").to_pylist(), self.eos_id)
        lengths = np.array([len(s) for s, _ in done], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int64())
        values = pa.array(np.concatenate([s for s, _ in done]) if done else np.zeros(0, np.int32), pa.int32())
        return pa.table({"unit_id": batch.column("unit_id"),
                         "tokens": pa.LargeListArray.from_arrays(offsets, values),
                         "documents": pa.array([d for _, d in done], pa.int64())})


def _pack_noise_stage(batch: pa.Table, *, params: Params, sink) -> dict[str, np.ndarray]:
    parts = [cols for _, cols in _packed_units(batch, params, sink)]
    if not parts:
        return {}
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def _pack_write_stage(batch: pa.Table, *, params: Params, sink, root: str, row_group_rows: int) -> pa.Table:
    """`_pack_noise_stage` that writes each unit's rows to its own shard (`write_unit`) and returns only
    (unit_id, rows): the rows never travel back through the object store."""
    fs, base, _ = _fs(root)
    done = [(uid, write_unit(fs, base, uid, cols, row_group_rows)) for uid, cols in _packed_units(batch, params, sink)]
    return pa.table({"unit_id": pa.array([u for u, _ in done], pa.int64()),
                     "rows": pa.array([n for _, n in done], pa.int64())})


def _packed_units(batch: pa.Table, params: Params, sink) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    tokens = batch.column("tokens").combine_chunks()
    values = tokens.values.to_numpy()
    offsets = tokens.offsets.to_numpy()
    for i, (uid, docs) in enumerate(zip(batch.column("unit_id").to_pylist(), batch.column("documents").to_pylist(),
                                        strict=True)):
        cols, counts = pack_and_noise(uid, values[offsets[i]:offsets[i + 1]], docs, params)
        _report(sink, "units", uid, counts)
        yield uid, cols


def init_ray(**kwargs) -> None:
    """Connect to the cluster (RAY_ADDRESS, `ray job submit`) or start a local instance sized for a
    small machine: more logical CPUs than cores (docs/architecture.md, "Small machines"). Ray's own logs
    follow `train.verbose` (pipeline/logs.py)."""
    quiet_ray_data()
    if ray.is_initialized():
        return
    ours = logs.ray_init_options()
    if os.environ.get("RAY_ADDRESS") or kwargs.get("address"):
        for key in ("num_cpus", "num_gpus", "object_store_memory", "include_dashboard"):
            kwargs.pop(key, None)  # not allowed when joining an existing cluster
    else:
        kwargs.setdefault("num_cpus", max(4, os.cpu_count() or 1))
        # The dashboard also serves the State API, which Ray Train's placement-group cleaner asks whether the
        # run's controller lives. Its workers are told this instance's address: left to find one, they take the
        # cluster started last on the machine (another test session, another job), do not find the controller
        # there and remove the live run's placement group, or fail with a traceback when several run. Without
        # the dashboard every query fails and the cleaner keeps monitoring (its warnings quiet: logs.py).
        kwargs.setdefault("include_dashboard", True)
        port = kwargs.setdefault("dashboard_port", _free_port())
        ours = {**ours, "runtime_env": {**ours.get("runtime_env", {}),
                                        "env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}
    kwargs.update({k: v for k, v in ours.items() if k not in ("runtime_env", *kwargs)})
    if "runtime_env" in ours:
        kwargs["runtime_env"] = _merged_env(ours["runtime_env"], kwargs.get("runtime_env"))
    ray.init(**kwargs)


def _merged_env(ours: dict, theirs: dict | None) -> dict:
    """A runtime env: the caller's keys win, environment variables are merged."""
    if not theirs:
        return ours
    env = {**ours.get("env_vars", {}), **theirs.get("env_vars", {})}
    return {**ours, **theirs, **({"env_vars": env} if env else {})}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_ray_data() -> None:
    """Ray Data's progress dumps and execution-plan lines off in this process unless `train.verbose`
    (pipeline/logs.py): our own `[fluid] data: …` line reports progress."""
    if logs.verbose():
        return
    ctx = ray.data.DataContext.get_current()
    for key, value in logs.DATA_CONTEXT_QUIET.items():
        setattr(ctx, key, value)
    logs.quiet_driver()


def build_dataset(data_cfg: DataConfig, noise_cfg: NoiseConfig, *, tokenizer_path, mask_token_id: int,
                  split: str | None = "train", epoch: int = 0, stats: PipelineStats | None = None,
                  cache_dir=None, unit_chars: int = UNIT_CHARS, override_num_blocks: int | None = None,
                  tokenizers_parallelism: bool | None = None, stage_root: str | None = None,
                  write_to: str | None = None, row_group_rows: int = 0) -> ray.data.Dataset:
    """The lazy Ray Data pipeline (module docstring). `split=None` keeps every split; `stats` collects
    the summary; `override_num_blocks` only changes the layout, never the rows. `stage_root` (multi-node
    clusters, pipeline/train/cluster.py): local corpus files and the tokenizer are staged there first, so
    the read and tokenize tasks open them from any node. `write_to` (a folder every node sees, or a
    URL; unshuffled data only): each unit's rows are written there as one shard (`write_unit`) and the
    dataset holds only (unit_id, rows) — use `write_shards`."""
    params = make_params(data_cfg, noise_cfg, tokenizer_path=tokenizer_path, mask_token_id=mask_token_id,
                         epoch=epoch)
    if data_cfg.tokenizer_actors < 1:
        raise FluidError(f"data.tokenizer_actors must be ≥ 1, got {data_cfg.tokenizer_actors}")
    items = plan_sources(data_cfg, split, cache_dir=cache_dir, ship_local=True)
    init_ray()
    if stage_root:
        from pipeline.sources.staging import stage_items

        items, tokenizer_path = stage_items(items, tokenizer_path, stage_root)
    sink = stats.sink() if stats is not None else None
    # Few, large blocks: a block is a read + tokenize call; the sort's cost grows with blocks².
    blocks = override_num_blocks or min(len(items), 4 * data_cfg.tokenizer_actors)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds.context.execution_options.preserve_order = True  # rows in (file, unit, sequence) order
    # The default SHUFFLE_V2 sort starts aggregator actors: ~10 s on a 2-core machine vs ~0.4 s here.
    ds.context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = ds.map_batches(_read_stage, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                        fn_kwargs=dict(split=split, data_cfg=data_cfg, unit_chars=unit_chars, sink=sink))
    ds = ds.map_batches(_TokenizeStage, batch_size=None, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=data_cfg.tokenizer_actors),
                        fn_constructor_kwargs=dict(tokenizer_path=str(tokenizer_path), eos_id=params.eos_id,
                                                   parallelism=tokenizers_parallelism))
    if write_to is not None:
        if params.shuffle:
            raise FluidError("write_to writes units in storage order: build the dataset with data.shuffle=false")
        return ds.map_batches(_pack_write_stage, batch_size=1, batch_format="pyarrow",
                              fn_kwargs=dict(params=params, sink=sink, root=write_to, row_group_rows=row_group_rows))
    ds = ds.map_batches(_pack_noise_stage, batch_size=1, batch_format="pyarrow",
                        fn_kwargs=dict(params=params, sink=sink))
    if params.shuffle:
        ds = ds.sort(KEY).drop_columns([KEY])
    return ds


# --- storage and training iteration -----------------------------------------------------------------


def _fs(path: str):
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(path))
    except (ValueError, ImportError) as e:
        raise FluidError(f"cannot open {path} ({type(e).__name__}: {e})") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, root.rstrip("/"), protocol


def _arrow_fs(fs):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def parquet_files(path: str) -> list[str]:
    """The shards under `path` in write order (natural sort: Ray names them …_000001-10 after …-9)."""
    fs, root, _ = _fs(path)
    if not fs.isdir(root):
        return []
    from pipeline.data.streaming import natural_order

    return sorted((f for f in fs.find(root) if f.endswith(".parquet")), key=natural_order)


def remove_files(path: str, files: list[str]) -> None:
    fs, _, _ = _fs(path)
    for f in files:
        fs.rm(f)


UNIT_SHARD = "unit-{:016d}.parquet"  # one shard per packing unit: names sort in storage (seq_index) order


def arrow_table(cols: dict[str, np.ndarray]) -> pa.Table:
    """Column arrays → an Arrow table: (n, T) as fixed-size lists (what the training reader reads), (n,) plain."""
    def column(values: np.ndarray):
        if values.ndim == 1:
            return pa.array(values)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])

    return pa.table({c: column(np.ascontiguousarray(v)) for c, v in cols.items()})


def write_unit(fs, root: str, uid: int, cols: dict[str, np.ndarray], row_group_rows: int) -> int:
    """Write one packing unit's rows (in order) to `<root>/unit-<uid>.parquet`; returns the row count.

    Why one file per unit, written here: the layout (files, row groups, row order) is then a function of
    the data alone. Ray Data's own `write_parquet` names files by write-task index and writes each task's
    blocks through pyarrow's threaded dataset writer, which does not keep row order — two preprocessings
    of one corpus could store the same rows in a different order, and so train on different batches."""
    import pyarrow.parquet as pq

    n = len(cols["seq_index"])
    if n:
        pq.write_table(arrow_table(cols), f"{root}/{UNIT_SHARD.format(uid)}", filesystem=_arrow_fs(fs),
                       row_group_size=row_group_rows or None)
    return n


def write_shards(data_cfg: DataConfig, noise_cfg: NoiseConfig, path: str, *, row_group_rows: int,
                 **build_kwargs) -> int:
    """The unshuffled rows of `build_dataset(...)` as one Parquet shard per packing unit under `path`
    (`write_unit`), written by the pipeline's tasks; returns the number of rows. Process-local file
    systems (memory://) are written from this process, unit by unit, with the same layout."""
    fs, root, protocol = _fs(path)
    fs.makedirs(root, exist_ok=True)
    data_cfg = dataclasses.replace(data_cfg, shuffle=False)
    if protocol in PROCESS_LOCAL_PROTOCOLS:  # Ray workers cannot see this process's file system
        ds = build_dataset(data_cfg, noise_cfg, **build_kwargs)
        return _write_units_here(ds, fs, root, row_group_rows)
    ds = build_dataset(data_cfg, noise_cfg, write_to=path, row_group_rows=row_group_rows, **build_kwargs)
    progress, units, rows = logs.Progress("data"), 0, 0  # one line every 10 s, in place of Ray Data's dumps
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        units, rows = units + len(b["rows"]), rows + int(b["rows"].sum())
        progress.update(units=units, rows=rows)
    progress.done(units=units, rows=rows)
    return rows


def _write_units_here(ds: ray.data.Dataset, fs, root: str, row_group_rows: int) -> int:
    from pipeline.data.packing import SEQ_BITS

    pending: list[dict[str, np.ndarray]] = []
    total = 0

    def flush() -> None:
        nonlocal total
        if pending:
            cols = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
            total += write_unit(fs, root, int(cols["seq_index"][0]) >> SEQ_BITS, cols, row_group_rows)
            pending.clear()

    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        units = batch["seq_index"] >> SEQ_BITS
        for u in np.unique(units):  # rows arrive in seq_index order: a unit's rows are contiguous
            if pending and int(pending[0]["seq_index"][0]) >> SEQ_BITS != u:
                flush()
            pending.append({c: v[units == u] for c, v in batch.items()})
    flush()
    return total


def write_parquet(ds: ray.data.Dataset, path: str, *, row_group_rows: int | None = None) -> None:
    """Write the rows of any dataset as Parquet shards under `path` (local folder or fsspec URL), in
    dataset order, from this process (`part-000000.parquet`, …; `row_group_rows` caps the rows per row
    group). Exact order at the price of one writer; unshuffled pipeline output: `write_shards`."""
    import pyarrow.parquet as pq

    fs, root, _ = _fs(path)
    fs.makedirs(root, exist_ok=True)
    extra = {"row_group_size": row_group_rows} if row_group_rows else {}
    for i, table in enumerate(ds.iter_batches(batch_size=4096, batch_format="pyarrow")):
        pq.write_table(table, f"{root}/part-{i:06d}.parquet", filesystem=_arrow_fs(fs), **extra)


def read_preprocessed(path: str) -> ray.data.Dataset:
    """The rows written by `write_parquet` (or `fluid preprocess`), in the order they were written."""
    fs, root, protocol = _fs(path)
    files = parquet_files(path)
    if not files:
        raise FluidError(f"no Parquet shards under {path}; run `fluid preprocess --output {path}` first")
    init_ray()
    if protocol in PROCESS_LOCAL_PROTOCOLS:
        import pyarrow.parquet as pq

        ds = ray.data.from_arrow([pq.read_table(f, filesystem=_arrow_fs(fs)) for f in files])
    elif protocol in ("file", "local"):
        ds = ray.data.read_parquet(files)
    else:
        ds = ray.data.read_parquet(files, filesystem=_arrow_fs(fs))
    ds.context.execution_options.preserve_order = True
    return ds


def collect_rows(ds: ray.data.Dataset, max_rows: int):
    """The first `max_rows` rows of `ds` (in its deterministic order) as `Rows` — numpy columns on the
    driver, for held-out sets small enough to send every worker whole — or None when it has none."""
    from pipeline.data.rows import Rows

    if max_rows < 1:
        return None
    parts = list(ds.limit(max_rows).iter_batches(batch_size=None, batch_format="numpy"))
    parts = [p for p in parts if p and len(next(iter(p.values())))]
    if not parts:
        return None
    return Rows({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def iter_train_batches(ds: ray.data.Dataset, batch_size: int, *, skip_batches: int = 0, dtypes=None,
                       device: str = "cpu", prefetch_batches: int = 1) -> Iterator[dict]:
    """Fixed-shape torch batches (drop_last) in the dataset's deterministic order. On resume, pass
    `skip_batches` = batches already consumed: they are read but not returned, so the next batch is
    exactly the one that would have followed (same examples, same order)."""
    it = ds.iter_torch_batches(batch_size=batch_size, dtypes=dtypes, device=device, drop_last=True,
                               prefetch_batches=prefetch_batches)
    return itertools.islice(it, skip_batches, None)


def write_summary(summary: dict, path: str) -> str:
    """Write the summary as JSON next to the shards; returns its path."""
    fs, root, protocol = _fs(path)
    target = f"{root}/{SUMMARY_FILE}"
    with fs.open(target, "w") as fh:
        json.dump(summary, fh, indent=2)
    return target if protocol in ("file", "local") else f"{protocol}://{target}"


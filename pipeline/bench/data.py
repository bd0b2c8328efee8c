"""The data benchmark (`fluid bench data`, `python -m jobs.bench_data`): the Ray Data pipeline vs a
plain single-process loop doing the same work.

In:  a `FluidConfig` (corpus, tokenizer of its model, data and noise settings) and the job's options
     (`--max-docs` / `--max-tokens` / `--repeat-corpus` bounds, `--repeats`, `--actors`,
     `--parallelism`, `--max-overhead`, `--json`).
Out: the printed table (per variant the medians of wall time, tokens/s, time to the first batch,
     tokens/s after it, overhead over the best loop), draft/supervised targets per token, the goals;
     rows, goals and settings as JSON with `--json`; `run` returns the exit status (0 every goal met,
     1 one not). `checksum` is the order-sensitive digest proving both sides made the same examples.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def bounded_corpus(cfg, folder: Path, max_docs: int | None, max_tokens: int | None, tokenizer) -> tuple[int, int]:
    """Copy the first train documents (at most max_docs / about max_tokens) as .txt files into folder."""
    from pipeline.sources.corpus import iter_documents, list_sources

    d = cfg.data
    sources = list_sources(d.corpus, cache_dir=cfg.model.cache_dir, val_fraction=d.val_fraction,
                           test_fraction=d.test_fraction, split_seed=d.split_seed)
    n_docs = n_tokens = 0
    for doc in iter_documents(sources, split="train", text_field=d.text_field, text_column=d.text_column,
                              max_doc_chars=d.max_doc_chars, val_fraction=d.val_fraction,
                              test_fraction=d.test_fraction, split_seed=d.split_seed):
        if (max_docs is not None and n_docs >= max_docs) or (max_tokens is not None and n_tokens >= max_tokens):
            break
        (folder / f"doc{n_docs:05d}.txt").write_text(doc.text, encoding="utf-8")
        n_docs += 1
        n_tokens += len(tokenizer.encode(doc.text, add_special_tokens=False).ids) + 1
    return n_docs, n_tokens


CHECKSUM_COLUMNS = ("seq_index", "input_ids", "position_ids", "span_id", "anchor", "labels", "k")


class Checksum:
    """Order-sensitive digest of examples, whether they come as rows (dict of 1-D arrays) or batches
    (dict of [B, …] arrays): one blake2b stream per column of CHECKSUM_COLUMNS, fed the column's values
    as little-endian int64 in row-major order — the same bytes for a batch as for its rows one by one,
    so batching does not change the digest, and the same rows in another order give another one."""

    def __init__(self):
        import hashlib

        self._h = {c: hashlib.blake2b(digest_size=8) for c in CHECKSUM_COLUMNS}

    def update(self, item: dict) -> None:
        import numpy as np

        for c, h in self._h.items():
            if c in item:
                h.update(np.ascontiguousarray(np.asarray(item[c]), dtype="<i8").tobytes())

    def hexdigest(self) -> str:
        import hashlib

        return hashlib.blake2b(b"".join(h.digest() for h in self._h.values()), digest_size=8).hexdigest()


def checksum(items) -> str:
    """The order-sensitive digest (16 hex characters) of examples given as rows or batches."""
    c = Checksum()
    for item in items:
        c.update(item)
    return c.hexdigest()


def consume(rows, seq_len: int) -> dict:
    """Consume batches (dict of arrays) or rows; time to the first item, and the order-sensitive
    checksum of the examples (Checksum: the same rows in another order give another one)."""
    import numpy as np

    t0 = time.perf_counter()
    first, n_first, n, digest = None, 0, 0, Checksum()
    for item in rows:
        ids = np.asarray(item["input_ids"])
        k = 1 if ids.ndim == 1 else ids.shape[0]
        n += k
        digest.update(item)
        if first is None:
            first, n_first = time.perf_counter() - t0, k
    wall = time.perf_counter() - t0
    return {"wall": wall, "first": first or wall, "rows": n, "rows_first": n_first, "checksum": digest.hexdigest()}


@dataclass
class Corpus:
    """What the benchmark reads: `spec` as configured; with a bound, `n_docs` copies in one folder and
    `cold` the folder of one copy (for the cold Ray run, when the corpus repeats)."""

    spec: str
    bounded: bool
    n_docs: int | None = None
    cold: list[str] | None = None


def prepare_corpus(args, cfg, tmp: Path, tokenizer) -> Corpus:
    """With a bound, copy the first train documents (one .txt file each, all in the train split),
    --repeat-corpus times under new names, and point cfg.data at the copies."""
    corpus = Corpus(", ".join(cfg.data.corpus),
                    args.max_docs is not None or args.max_tokens is not None or args.repeat_corpus > 1)
    if corpus.bounded:
        base, every = tmp / "once", tmp / "all"
        base.mkdir()
        every.mkdir()
        n_docs, _ = bounded_corpus(cfg, base, args.max_docs, args.max_tokens, tokenizer)
        for r in range(args.repeat_corpus):  # copies under new names: more documents, same text
            for i in range(n_docs):
                os.link(base / f"doc{i:05d}.txt", every / f"rep{r:03d}-doc{i:05d}.txt")
        corpus.n_docs = n_docs * args.repeat_corpus
        cfg.data.corpus, cfg.data.val_fraction, cfg.data.test_fraction = [str(every)], 0.0, 0.0
        corpus.cold = [str(base)] if args.repeat_corpus > 1 else None  # the cold run only starts the workers
    return corpus


def run_local(cfg, kw: dict, par: bool):
    """One pass of the single-process loop: (consume's result, the pipeline's stats summary)."""
    from pipeline.data import ray_pipeline as data

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if par else "false"
    stats = data.PipelineStats()
    out = consume(data.iter_examples_local(cfg.data, cfg.noise, stats=stats, **kw), cfg.data.seq_len)
    return out, stats.summary()


def run_ray(cfg, kw: dict, actors: int, par: bool, corpus: list[str] | None = None):
    """One pass of the Ray Data pipeline (numpy batches of 256): (consume's result, stats summary)."""
    from pipeline.data import ray_pipeline as data

    cfg.data.tokenizer_actors = actors
    stats = data.PipelineStats()
    dc = dataclasses.replace(cfg.data, corpus=corpus) if corpus else cfg.data
    ds = data.build_dataset(dc, cfg.noise, stats=stats, tokenizers_parallelism=par, **kw)
    out = consume(ds.iter_batches(batch_size=256, batch_format="numpy"), cfg.data.seq_len)
    return out, stats.summary()


def variants(args, cfg, kw: dict) -> dict:
    """(pipeline name, TOKENIZERS_PARALLELISM) → a function running it once."""
    pars = {"both": (False, True), "false": (False,), "true": (True,)}[args.parallelism]
    out = {("single-process loop", str(par).lower()): functools.partial(run_local, cfg, kw, par) for par in pars}
    for a in (int(x) for x in args.actors.split(",")):
        for par in pars if a == 1 else (False,):
            name = f"Ray Data, {a} tokenizer actor{'s' if a > 1 else ''}"
            out[(name, str(par).lower())] = functools.partial(run_ray, cfg, kw, a, par)
    return out


def measure(args, cfg, kw: dict, cold_corpus: list[str] | None) -> dict:
    """Start Ray, run the cold Ray pass, then --repeats interleaved passes of every variant."""
    from pipeline.data import ray_pipeline as data

    fns = variants(args, cfg, kw)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    data.init_ray(log_to_driver=False)
    t_init = time.perf_counter() - t0
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    cold, _ = run_ray(cfg, kw, 1, False, cold_corpus)
    results: dict = {key: [] for key in fns}
    for _ in range(args.repeats):
        for key, fn in fns.items():
            results[key].append(fn())
    return {"results": results, "cold": cold, "t_init": t_init, "load0": load0, "load1": os.getloadavg()}


def run(args, cfg) -> int:
    """The whole benchmark: exit status 0 when every goal is met, 1 when one is not."""
    from pipeline.data import ray_pipeline as data
    from pipeline.sources.model_source import resolve_model

    resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    tokenizer = data.load_fast_tokenizer(resolved.path)
    with tempfile.TemporaryDirectory(prefix="fluid-bench-") as tmp:
        corpus = prepare_corpus(args, cfg, Path(tmp), tokenizer)
        kw = dict(tokenizer_path=resolved.path, mask_token_id=resolved.mask_token_id)
        m = measure(args, cfg, kw, corpus.cold)
    return report(args, cfg, corpus, m)


def report(args, cfg, corpus: Corpus, m: dict) -> int:
    """Print the table, the targets per token and the goals; write --json; the exit status."""
    import ray

    results, cold, L = m["results"], m["cold"], cfg.data.seq_len
    checksums = {r[0]["checksum"] for runs in results.values() for r in runs}
    if corpus.cold is None:
        checksums.add(cold["checksum"])
    summary = next(runs[0][1] for key, runs in results.items() if key[0].startswith("Ray"))
    docs = corpus.n_docs if corpus.bounded else summary["packed_documents"]
    ray_cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"corpus: {docs} train documents of {corpus.spec}{' (bounded copy)' if corpus.bounded else ''} "
          f"({summary['tokens']:,} tokens incl. EOS; {summary['sequences']:,} sequences of {L}, shuffle "
          f"{'on' if cfg.data.shuffle else 'off'}); tokenizer of {cfg.model.spec}; {os.cpu_count()} CPU cores; "
          f"load average {m['load0'][0]:.1f} → {m['load1'][0]:.1f}")
    print(f"ray.init: {m['t_init']:.1f} s ({ray_cpus} Ray CPUs on {os.cpu_count()} cores); first (cold) Ray run"
          f"{' (one copy of the corpus)' if corpus.cold else ''}: {cold['wall']:.1f} s — both excluded from the medians")
    print(f"medians of {args.repeats} interleaved runs; tokens/s = corpus tokens / wall time\n")
    rows = table_rows(medians(results, L), summary["tokens"], ray_cpus)
    print_table(rows, steady=not cfg.data.shuffle)  # with the shuffle every row waits for the sort
    print(f"\ndraft targets per processed token: {summary['draft_targets_per_token']:.3f} (goal ≥ 0.5); "
          f"supervised targets per input token: {summary['supervised_targets_per_token']:.3f}; "
          f"restoration rate {summary['restoration_rate']:.3f}")
    goals = check_goals(rows, summary, checksums, args.max_overhead)
    if args.json:
        settings = {"documents": docs, "tokens": summary["tokens"], "sequences": summary["sequences"], "seq_len": L,
                    "shuffle": cfg.data.shuffle, "repeats": args.repeats, "ray_init_s": m["t_init"],
                    "cold_ray_run_s": cold["wall"], "repeat_corpus": args.repeat_corpus, "ray_cpus": ray_cpus,
                    "checksums": sorted(checksums)}
        Path(args.json).write_text(json.dumps({"rows": rows, "goals": goals, "settings": settings}, indent=1))
    return 0 if all(g["met"] for g in goals) else 1


def medians(results: dict, seq_len: int) -> dict:
    """Per variant, the medians over its runs of wall time, time to the first batch, and tokens/s
    after the first batch (steady state)."""
    med = {key: {m: statistics.median(r[0][m] for r in runs) for m in ("wall", "first")}
           for key, runs in results.items()}
    for key, runs in results.items():
        med[key]["steady"] = statistics.median(
            (r[0]["rows"] - r[0]["rows_first"]) * seq_len / max(r[0]["wall"] - r[0]["first"], 1e-9) for r in runs)
    return med


def cores_used(name: str, par: str, ray_cpus: int) -> str:
    """What each side of the comparison runs on: the loop is one process (its tokenizer on every core
    with TOKENIZERS_PARALLELISM=true); Ray Data spreads its actors and tasks over all cores."""
    n = os.cpu_count() or 1
    if name.startswith("single"):
        return f"1 process, tokenizer on {n} threads" if par == "true" else "1 process, 1 core"
    return f"{n} cores ({ray_cpus} Ray CPUs)"


def table_rows(med: dict, tokens: int, ray_cpus: int) -> list[dict]:
    """The table's rows (also the JSON record's): per variant its cores, medians and overhead over the
    best single-process loop, in percent (negative: faster than the loop)."""
    best_local = min(v["wall"] for k, v in med.items() if k[0].startswith("single"))
    return [{"pipeline": name, "TOKENIZERS_PARALLELISM": par, "cores": cores_used(name, par, ray_cpus),
             "wall s": m["wall"], "tokens/s": tokens / m["wall"], "1st batch s": m["first"],
             "tokens/s after 1st": m["steady"], "vs best loop %": 100 * (m["wall"] / best_local - 1)}
            for (name, par), m in med.items()]


def print_table(rows: list[dict], *, steady: bool) -> None:
    head = f"{'pipeline':<32}{'TOKENIZERS_PARALLELISM':>24}{'cores':>34}{'wall s':>9}{'tokens/s':>11}" \
           f"{'1st batch s':>13}{'tokens/s after 1st' if steady else '':>20}{'vs best loop':>14}"
    print(head)
    print("-" * len(head))
    for r in rows:
        after = f"{r['tokens/s after 1st']:,.0f}" if steady else ""
        print(f"{r['pipeline']:<32}{r['TOKENIZERS_PARALLELISM']:>24}{r['cores']:>34}{r['wall s']:>9.2f}"
              f"{r['tokens/s']:>11,.0f}{r['1st batch s']:>13.2f}{after:>20}{r['vs best loop %']:>+13.0f}%")


def check_goals(rows: list[dict], summary: dict, checksums: set, max_overhead: float) -> list[dict]:
    """Print and return the goals: Ray Data at most `max_overhead` (a fraction) over the best loop, ≥ 0.5
    draft targets per processed token, the same examples in the same order on every run. The job exits
    non-zero unless every goal is met."""
    over = min(r["vs best loop %"] for r in rows if r["pipeline"].startswith("Ray")) / 100
    same = len(checksums) == 1
    goals = [{"goal": f"Ray Data ≤ {max_overhead:.0%} over the best single-process loop",
              "value": round(100 * over, 1), "met": over <= max_overhead},
             {"goal": "draft targets per processed token ≥ 0.5", "value": summary["draft_targets_per_token"],
              "met": summary["draft_targets_per_token"] >= 0.5},
             {"goal": "same examples in the same order on every run (checksum)", "value": same, "met": same}]
    print(f"goal '{goals[0]['goal']}': {'met' if goals[0]['met'] else 'NOT met'} (best Ray variant {over:+.0%}); "
          f"draft targets ≥ 0.5: {'met' if goals[1]['met'] else 'NOT met'}; "
          f"same examples in the same order on every run: {'yes' if same else 'NO'}")
    return goals

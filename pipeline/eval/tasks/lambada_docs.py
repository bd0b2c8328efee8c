"""The docs of the local LAMBADA tasks (lambada_openai.yaml, lambada_openai_gen.yaml): our cached LAMBADA
test file (pipeline/sources/eval_data.py, fetched once) as a `datasets.DatasetDict` {"test": rows of
{"text": context + " " + target}}, in the file's order — no dataset hub. lm_eval calls `lambada_test`
with the task's metadata; `fluid_cache_dir` (set by pipeline/eval/harness.py) picks the cache.
"""

from __future__ import annotations


def lambada_test(fluid_cache_dir: str | None = None, **_):
    import datasets

    from pipeline.sources.eval_data import lambada_items

    rows = [{"text": f"{it.context} {it.target}"} for it in lambada_items(None, fluid_cache_dir)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

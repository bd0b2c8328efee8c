"""`make demo` / `fluid demo` (jobs/demo.py is its entrypoint): the whole product on one machine.

* `runner.py`   the stages (data → drafts → adapt → horizon → evaluate → serve) with their cache and the
                time budget (`Demo`), the embedded defaults, the streamed completion and the summary table;
* `recipes.py`  the draft-target recipes of `demo.drafts` (`RECIPES`).

The demo runs train, eval and serve, so it is a layer above them (pyproject.toml, [tool.importlinter]);
the jobs its stages call (preprocess, adapt, fit-horizon) come from jobs/demo.py as `entrypoints`.
"""

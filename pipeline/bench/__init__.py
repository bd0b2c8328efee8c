"""The benchmarks' logic, behind the thin entrypoints in jobs/ (`fluid bench data|sampler|serve`,
`python -m jobs.bench_gpu_cost`, `python -m jobs.bench_load`): measuring, goals, rows and tables.

In: parsed options (and a `FluidConfig` where the job takes one). Out: printed tables, goals, JSON
results, and the exit status (0 every goal met, 1 one not met); records in the schema of
pipeline/records.py (`report`). Benchmarks are not tests; they sit above eval and serve.
"""

"""`fluid serve`: host a FLUID export behind an OpenAI-compatible endpoint on Ray Serve.

    python -m jobs.serve --serve.model=EXPORT_DIR            # or an fsspec URL (s3://…, gs://…)
    fluid serve --serve.model=EXPORT_DIR --serve.port=8000 --serve.max_batch_size=16

In:  the `serve` section of the config (pipeline/config.py: model, host, port, replicas, limits, API key).
Out: a running Serve app at http://HOST:PORT<route_prefix>/v1 (completions, chat/completions, models)
     and /healthz; the URL is printed; Ctrl-C deletes the app and stops Serve.
Connects to a running Ray cluster when RAY_ADDRESS (or --address) is set, else starts a local one.
For clusters, `serve deploy cluster/serve_config.yaml` deploys the same app from a config file.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.common import parse_job_args, run_job
from pipeline.errors import FluidError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new "
                        "local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a new local Ray instance")
    args, cfg = parse_job_args(parser, argv)
    sc = cfg.serve
    if not sc.model:
        raise FluidError("set --serve.model=EXPORT_DIR (a FLUID export folder or an fsspec URL)")

    import ray
    from ray import serve

    from pipeline.serve.app import build_app
    from pipeline.serve.openai_api import load_api_key

    app = build_app(sc)  # checks a local model path before anything starts
    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": sc.host, "port": sc.port})
    serve.run(app, name=sc.app_name, route_prefix=sc.route_prefix)
    prefix = sc.route_prefix.rstrip("/")
    auth = "on" if load_api_key(sc.api_key_env, sc.api_key_file) else "off"
    print(f"serving {sc.model} at http://{sc.host}:{sc.port}{prefix}/v1 (auth {auth}; "
          f"health: {prefix}/healthz) — Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping …", file=sys.stderr, flush=True)
    finally:
        serve.delete(sc.app_name)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))

"""`fluid serve`: host a FLUID export behind an OpenAI-compatible endpoint on Ray Serve.

    fluid serve --serve.model=EXPORT_DIR                    # or an fsspec URL (s3://…, gs://…)
    FLUID_API_KEY_FILE=/etc/fluid/api-key fluid serve --serve.model=EXPORT_DIR --serve.host=0.0.0.0
    fluid serve --address=HEAD:6379 --serve.model=… --serve.app_name=fluid-b --serve.route_prefix=/b

In:  the `serve` section of the config (pipeline/config.py: model, host, port, replicas, limits, key).
     The API key: a file every replica can read (`FLUID_API_KEY_FILE` or --serve.api_key_file: a
     mounted secret on a cluster), or the raw key in `FLUID_API_KEY` (this process only: replicas get
     a salted HMAC-SHA256 digest, never the key, since Ray shows app args and runtime envs in its
     dashboard; the variable is removed from this process's environment before Ray starts, so a local
     Ray instance and its workers never inherit it).
Out: a running Serve app at http://HOST:PORT<route_prefix>/v1 (completions, chat/completions, models),
     /healthz and /docs; the URL is printed. Before printing it, the replicas are asked which key
     they enforce: a configured key that is not enforced stops the start. The default bind host is
     loopback (127.0.0.1, as in cluster/serve_config.yaml); any other prints one line saying so, with
     the auth state. Ctrl-C deletes this app only; Serve itself is stopped only on a
     Ray instance this command started.
Connects to a running Ray cluster when RAY_ADDRESS (or --address) is set, else starts a local one.
For clusters, `serve deploy cluster/serve_config.yaml` deploys the same app from a config file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jobs.common import parse_job_args, run_job
from pipeline.config import LOOPBACK_HOSTS
from pipeline.errors import FluidError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new "
                        "local instance; 'local': always a new local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a new local Ray instance")
    args, cfg = parse_job_args(parser, argv)
    if not cfg.serve.model:
        raise FluidError("set --serve.model=EXPORT_DIR (a FLUID export folder or an fsspec URL; "
                         "`fluid export --from-model DIR --output EXPORT_DIR` makes one from a plain model)")

    import ray
    from ray import serve

    from pipeline.serve.app import build_app, replica_config, verify_auth

    sc = replica_config(cfg.serve)  # the raw key (if any) becomes its salted digest here …
    os.environ.pop(sc.api_key_env, None)  # … and leaves this environment: a local Ray would inherit it
    app = build_app(sc)  # checks a local model path before anything starts
    auth = sc.api_key_file or sc.api_key_sha256
    if sc.host not in LOOPBACK_HOSTS:
        print(f"note: binding {sc.host}, not loopback: other hosts can reach port {sc.port}; auth "
              + ("on" if auth else "OFF: anyone who reaches it can generate (set FLUID_API_KEY_FILE or FLUID_API_KEY)"),
              file=sys.stderr, flush=True)
    joined = bool(args.address or os.environ.get("RAY_ADDRESS")) and args.address != "local"
    ray.init(address=args.address, num_cpus=None if joined else args.num_cpus, include_dashboard=False,
             configure_logging=False)
    if joined and sc.app_name in serve.status().applications:
        raise FluidError(f"an application named {sc.app_name!r} already runs on this cluster; pick another "
                         "--serve.app_name (and --serve.route_prefix), or delete it with `serve shutdown`")
    serve.start(http_options={"host": sc.host, "port": sc.port})
    handle = serve.run(app, name=sc.app_name, route_prefix=sc.route_prefix)
    try:
        verify_auth(handle, sc)
        prefix = sc.route_prefix.rstrip("/")
        docs = (f"{prefix}/docs" + (", with the key" if auth else "")) if sc.api_docs else "off"
        print(f"serving {sc.model} at http://{sc.host}:{sc.port}{prefix}/v1 (auth {'on' if auth else 'off'}; "
              f"health: {prefix}/healthz, API docs: {docs}) — Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping …", file=sys.stderr, flush=True)
    finally:
        serve.delete(sc.app_name)  # this app only: others on a shared cluster keep running
        if not joined:
            serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))

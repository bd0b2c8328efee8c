"""The serving load test (`fluid bench serve`, `python -m jobs.load_test`): N concurrent clients against
the OpenAI-compatible endpoint, a fixed number of requests.

In:  a running endpoint on this machine (127.0.0.1 / localhost only), or a config whose `serve.model`
     (or `--tiny`: a tiny random export) starts a local Ray + Serve server, stopped at the end; the
     job's options (clients, requests, --compare rounds, --levels, max tokens, policy, stream, timeouts).
Out: per run a row of COLUMNS (`run_load`: requests, errors, wall time, requests/s, tokens/s, latency
     percentiles, time to first chunk, tokens per forward), printed as a table; with --compare the
     median 16-vs-1 throughput ratio and its goal, with --levels the serving goals (`sweep_goals`);
     `--out` JSONL records; `run` returns the exit status (0 every goal met, 1 one not).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import LOOPBACK_HOST, LOOPBACK_HOSTS
from pipeline.errors import FluidError

COLUMNS = ("round", "clients", "requests", "errors", "wall_s", "req/s", "tok/s", "p50_ms", "p95_ms", "p99_ms",
           "ttft_p50_ms", "tok/fwd")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def one_request(opener, url: str, body: dict, headers: dict, timeout: float) -> dict:
    """POST one completion; returns latency, tokens, forwards, time to first chunk, the text and, when
    streaming, the per-token latencies (`itl`: the time between two chunks shared among the tokens the
    later one carries, from the server's `fluid.committed`), or an error."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    t0 = time.perf_counter()
    ttft, tokens, forwards, text, itl = None, 0, 0, [], []
    try:
        with opener.open(req, timeout=timeout) as r:
            if body.get("stream"):
                last = None
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev, now = json.loads(line[6:]), time.perf_counter()
                    if ev.get("choices"):
                        ttft = now - t0 if ttft is None else ttft
                        text.append(ev["choices"][0].get("text") or "")
                        n = int(ev.get("fluid", {}).get("committed", 0))
                        if last is not None and n:
                            itl += [(now - last) / n] * n
                        last = now
                    forwards = ev.get("fluid", {}).get("forwards", forwards)
                    tokens = (ev.get("usage") or {}).get("completion_tokens", tokens)
            else:
                out = json.loads(r.read())
                tokens, forwards = out["usage"]["completion_tokens"], out["fluid"]["forwards"]
                text.append(((out.get("choices") or [{}])[0]).get("text") or "")
    except urllib.error.HTTPError as e:
        return {"error": f"HTTP {e.code}", "latency": time.perf_counter() - t0}
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        return {"error": type(e).__name__, "latency": time.perf_counter() - t0}
    return {"latency": time.perf_counter() - t0, "tokens": tokens, "forwards": forwards, "ttft": ttft,
            "text": "".join(text), "itl": itl}


def run_load(url: str, clients: int, total: int, body: dict | list[dict], headers: dict, *, timeout: float,
             deadline_s: float, outputs: dict | None = None) -> dict:
    """`clients` threads issue `total` requests in all (back to back; request i sends body i modulo the
    bodies given); returns the run's summary. `outputs` receives each answered request's text by body index."""
    bodies = body if isinstance(body, list) else [body]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    lock, results, issued = threading.Lock(), [], [0]
    stop_at = time.perf_counter() + deadline_s

    def client():
        while True:
            with lock:
                if issued[0] >= total or time.perf_counter() > stop_at:
                    return
                i = issued[0] % len(bodies)
                issued[0] += 1
            res = one_request(opener, url, bodies[i], headers, timeout)
            with lock:
                results.append(res)
                if outputs is not None and "error" not in res:
                    outputs.setdefault(i, []).append(res["text"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, stop_at - time.perf_counter()) + timeout + 5)
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    lat = [r["latency"] * 1e3 for r in ok]
    ttft = [r["ttft"] * 1e3 for r in ok if r.get("ttft") is not None]
    itl = [x * 1e3 for r in ok for x in r["itl"]]
    tokens, forwards = sum(r["tokens"] for r in ok), sum(r["forwards"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": sum(errors.values()), "error_kinds": errors,
            "wall_s": wall, "req/s": len(ok) / wall if wall else 0.0, "tok/s": tokens / wall if wall else 0.0,
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
            "ttft_p50_ms": percentile(ttft, 50), "tok_p50_ms": percentile(itl, 50), "tok_p99_ms": percentile(itl, 99),
            "tok/fwd": tokens / forwards if forwards else 0.0, "unfinished": total - len(results)}


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{c:>11}" for c in COLUMNS)]
    for r in rows:
        cells = [f"{'-':>11}" if c == "ttft_p50_ms" and not r[c] else f"{r[c]:>11d}" if isinstance(r[c], int)
                 else f"{r[c]:>11.2f}" for c in COLUMNS]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def export_tiny(out_dir: Path) -> Path:
    """A tiny random Llama export (byte-level BPE, untrained mask: drafts are noise) for smoke loads."""
    from pipeline.model.tiny import build_tiny
    from pipeline.train.export import export_hf

    model, tok, mask_id = build_tiny()
    meta = {"mask_token": "[M]", "mask_token_id": mask_id, "k_max": 8,
            "policy_defaults": {"policy": "ar", "gamma": None, "max_horizon": 8},
            "base_model": {"spec": "tiny-random", "sha256": None}, "data_config": {}, "train_config": {}}
    return export_hf(model, tok, out_dir, fluid_meta=meta)


def start_local_server(cfg, clients: int) -> str:
    """Start local Ray + Serve with `cfg.serve` on 127.0.0.1; returns the base URL."""
    import ray
    from ray import serve

    from pipeline.logs import serve_logging_config
    from pipeline.serve.app import build_app, replica_config
    from pipeline.serve.auth import key_env_hidden

    sc = cfg.serve
    sc.host = LOOPBACK_HOST
    if sc.max_batch_size < clients:
        print(f"note: serve.max_batch_size {sc.max_batch_size} → {clients} (one row per client)", file=sys.stderr)
        sc.max_batch_size = clients
    app = build_app(replica_config(sc))  # a key in $FLUID_API_KEY reaches the replicas as a salted digest
    with key_env_hidden(sc.api_key_env):  # the raw key stays in this process: no Ray process inherits it
        if not ray.is_initialized():  # else: this process's Ray (a test session's)
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
    serve.start(http_options={"host": sc.host, "port": sc.port}, logging_config=serve_logging_config())
    serve.run(app, name=sc.app_name, route_prefix=sc.route_prefix)
    return f"http://{LOOPBACK_HOST}:{sc.port}{sc.route_prefix.rstrip('/')}"


def sweep_goals(rows: list[dict]) -> bool:
    """Print and check the serving goals of a --levels sweep (see the module docstring)."""
    by = {r["clients"]: r for r in rows}
    top, checks = max(by), []
    if len(by) > 1:
        second = sorted(by)[-2]
        checks.append((f"tok/s at {top} >= at {second}", by[top]["tok/s"] >= by[second]["tok/s"],
                       f"{by[top]['tok/s']:.1f} vs {by[second]['tok/s']:.1f}"))
    if 1 in by and 16 in by:
        ratio = by[16]["tok/s"] / by[1]["tok/s"] if by[1]["tok/s"] else 0.0
        checks.append(("16 vs 1 clients >= 4x", ratio >= 4.0, f"{ratio:.2f}x"))
    checks.append((f"p99 <= 2x p50 at {top}", by[top]["p99_ms"] <= 2 * by[top]["p50_ms"],
                   f"{by[top]['p99_ms']:.0f} vs {by[top]['p50_ms']:.0f} ms"))
    errors = sum(r["errors"] + r["unfinished"] for r in rows)
    checks.append(("0 errors", errors == 0, str(errors)))
    for name, ok, value in checks:
        print(f"  goal {name}: {value} — {'met' if ok else 'NOT met'}")
    return all(ok for _, ok, _ in checks)


def auth_headers(cfg) -> dict:
    """The Authorization header of the server's API key (serve.api_key_env / api_key_file), if any."""
    from pipeline.serve.auth import driver_key, read_key_file

    key_file, key = driver_key(cfg.serve.api_key_env, cfg.serve.api_key_file)
    key = read_key_file(key_file) if key_file else key
    return {"Authorization": f"Bearer {key}"} if key else {}


def request_body(args, model: str) -> dict:
    """The completion every request sends: greedy, ignore_eos (every request makes max_tokens)."""
    body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True}
    if args.policy:
        body["policy"] = args.policy
    if args.stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def plan(args) -> list[tuple[int, int, int]]:
    """(round, clients, requests) per run: a --levels sweep, --compare's interleaved pairs, or one run."""
    per_client = max(1, (args.requests or 16 * args.clients) // args.clients)
    if args.levels:
        return [(1, c, args.requests or 64) for c in (int(x) for x in args.levels.split(","))]
    if args.compare:  # interleaved, order alternating per round
        pair = [(1, per_client), (args.clients, per_client * args.clients)]
        return [(r + 1, *x) for r in range(max(1, args.rounds)) for x in (pair if r % 2 == 0 else pair[::-1])]
    return [(1, args.clients, args.requests or 16 * args.clients)]


def server_model(args, cfg, base: str) -> tuple[str, dict, str]:
    """(`base` without a trailing slash, the auth headers, the served model's name); loopback only."""
    if (urlsplit(base).hostname or "") not in LOOPBACK_HOSTS:
        raise FluidError(f"--url {base}: this load test only targets 127.0.0.1/localhost")
    base = base.rstrip("/")
    headers = auth_headers(cfg)
    models = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        urllib.request.Request(f"{base}/v1/models", headers=headers), timeout=args.timeout).read())
    return base, headers, models["data"][0]["id"]


def measure(args, cfg, base: str) -> tuple[str, list[dict]]:
    """Against the server at `base`: its model's name and a row per run of the plan (after a warm-up)."""
    base, headers, model = server_model(args, cfg, base)
    body = request_body(args, model)
    url = f"{base}/v1/completions"
    run_load(url, 2, 4, body, headers, timeout=args.timeout, deadline_s=args.max_seconds)  # warm-up
    runs = plan(args)
    return model, [{"round": r, **run_load(url, c, n, body, headers, timeout=args.timeout,
                                           deadline_s=args.max_seconds)} for r, c, n in runs]


def compare_goal(rows: list[dict], clients: int) -> bool:
    """Print and check --compare's goal: the median per-round tokens/s ratio ≥ 4, zero errors."""
    ratios = []
    for rnd in sorted({r["round"] for r in rows}):
        one, many = ([r for r in rows if r["round"] == rnd and r["clients"] == c][0] for c in (1, clients))
        ratios.append(many["tok/s"] / one["tok/s"] if one["tok/s"] else 0.0)
    ratio = statistics.median(ratios)
    errors = sum(r["errors"] + r["unfinished"] for r in rows)
    met = ratio >= 4.0 and errors == 0
    print(f"aggregate throughput {clients} vs 1 clients: {ratio:.2f}x tokens/s (median of rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}), errors {errors} "
          f"(goal >= 4x and 0 errors: {'met' if met else 'NOT met'})")
    return met


def report(args, model: str, base: str, rows: list[dict]) -> int:
    """Print the table and errors, append --out records, check the goals; the exit status."""
    print(f"model {model} at {base}: max_tokens {args.max_tokens}, policy {args.policy or 'server default'}, "
          f"{'streaming' if args.stream else 'non-streaming'}, greedy")
    print(format_table(rows))
    for r in rows:
        if r["errors"] or r["unfinished"]:
            print(f"  {r['clients']} clients: errors {r['error_kinds']}, not issued {r['unfinished']}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({"time": time.time(), "model": model, "max_tokens": args.max_tokens, **r}) + "\n")
    if args.levels:
        return 0 if sweep_goals(rows) else 1
    if args.compare:
        return 0 if compare_goal(rows, args.clients) else 1
    return 0 if rows[0]["errors"] == 0 else 1


def run(args, cfg) -> int:
    """The load test: a local server when one is asked for (stopped at the end), the runs, the report;
    with --policies the policy sweep of serve_sweep.py."""
    from pipeline.bench import serve_sweep

    tmp, rc = None, None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="fluid-load-")
        cfg.serve.model = str(export_tiny(Path(tmp.name) / "tiny"))
        cfg.serve.model_name = cfg.serve.model_name or "tiny"
    local = bool(cfg.serve.model) and not args.url
    clients = args.clients
    if args.policies:
        clients = max(int(x) for x in (args.levels or serve_sweep.DEFAULT_LEVELS).split(","))
        if local and cfg.serve.dtype == "auto":  # greedy outputs are compared with float32 decoding
            cfg.serve.dtype = "float32"
    try:
        base = start_local_server(cfg, clients) if local else (args.url or f"http://{LOOPBACK_HOST}:{cfg.serve.port}")
        if args.policies:
            base, headers, model = server_model(args, cfg, base)
            rc = serve_sweep.run_sweep(args, cfg, base, headers, model, tiny=args.tiny)
        else:
            model, rows = measure(args, cfg, base)
    finally:
        if local:
            from ray import serve

            serve.shutdown()
        if tmp is not None:
            tmp.cleanup()
    return rc if rc is not None else report(args, model, base.rstrip("/"), rows)

"""lm-evaluation-harness on a FLUID export: the `fluid` model type and `run_tasks` (`fluid evaluate --tasks`).

In:  an export folder, loaded as `fluid generate` loads it (pipeline/decode/load.py), or a ready `Sampler`;
     harness task names; the LAMBADA cache (the local tasks in pipeline/eval/tasks/ read it, no hub).
Out: `FluidLM`, registered with lm_eval as model type `fluid` (model_args e.g.
     `export=PATH,policy=verify,gamma=0.9,dtype=float32`):
     * `loglikelihood`, `loglikelihood_rolling`: the AR path — a plain causal forward of the model (no
       masks), batched (right-padded: causal attention never sees the padding), log-probabilities of the
       text vocabulary (the ids the sampler never emits, `[M]` and a pad that is not EOS, are excluded);
     * `generate_until`: the Sampler with the chosen policy, honouring `until` and `max_gen_toks`; every
       request's forwards and tokens are kept (`parallelism()`: the aggregate tokens per forward);
     `run_tasks(...)` → {task: {metric: value}, "parallelism": …} through `lm_eval.simple_evaluate`.

Only this module imports lm_eval (the `harness` extra); pipeline/eval/evaluate.py imports it when asked to.
Local tasks (LOCAL_TASKS) run offline: the hub is switched off while they run; a task that is not local
needs the dataset hub, and runs only where it is reachable (a FluidError says so otherwise).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from pipeline.errors import FluidError

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@register_model("fluid")
class FluidLM(TemplateLM):
    """An export (or a ready `sampler`) as an lm_eval model; `policy`/`gamma`/`max_horizon` are those of
    `generate_until` (loglikelihoods are the AR path whatever the policy)."""

    def __init__(self, export: str | None = None, *, sampler=None, policy: str = "ar", gamma: float | None = None,
                 threshold: float | None = None, max_horizon: int | None = None, dtype: str = "float32",
                 batch_size: int | str = 8, cache_dir: str | None = None, matmul: str = "auto", device: str | None = None,
                 max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:
            raise FluidError(f"model type fluid: unknown model_args {sorted(unknown)} (known: export, policy, gamma "
                             "or threshold, max_horizon, dtype, batch_size, cache_dir, matmul, device)")
        if sampler is None:
            if not export:
                raise FluidError("the fluid model type needs export=PATH (a fluid adapt export)")
            from pipeline.decode.dtype import inference_dtype
            from pipeline.decode.load import load_sampler

            sampler = load_sampler(str(export), cache_dir=cache_dir, device=device, matmul=str(matmul),
                                   dtype=inference_dtype(str(dtype), device or "cpu", export))
        self.sampler, self.tokenizer = sampler, sampler.tokenizer
        self.policy = str(policy)
        gamma = threshold if gamma is None else gamma
        self.gamma = None if gamma is None else float(gamma)
        self.max_horizon = None if max_horizon is None else int(max_horizon)
        self.batch_size = max(1, int(batch_size)) if str(batch_size).isdigit() else 8  # lm_eval's "auto": 8
        self.generations: list[dict] = []  # per generate_until request: forwards, tokens, tokens per forward

    # --- what TemplateLM needs ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else next(iter(self.sampler.eos_ids), 0))

    @property
    def max_length(self) -> int:
        return int(self.sampler.context or 2048)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        if add_special_tokens is None:
            return self.sampler.encode(string)  # as our LAMBADA loop and `fluid generate` encode a prompt
        with self.sampler.tokenizer_lock:
            return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    def tok_decode(self, ids: list[int]) -> str:
        return self.sampler.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation tokens, whether each is the argmax) per (key, context ids,
        continuation ids); the last max_length + 1 tokens of context + continuation are fed."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, answer in zip(idx, self._score([(requests[i][1], requests[i][2]) for i in idx]), strict=True):
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in pairs]
        x = torch.full((len(rows), max(map(len, rows))), self.eot_token_id, dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, :len(r)] = torch.tensor(r)
        width = x.shape[1]
        keep = max(width - len(r) + min(len(c), len(r)) for r, (_, c) in zip(rows, pairs, strict=True))
        logp = token_logprobs(self.sampler, x.to(self.sampler.device), keep=keep)  # the last `keep` positions
        answers = []
        for j, (_, cont) in enumerate(pairs):
            n = min(len(cont), len(rows[j]))
            end = keep - (width - len(rows[j]))
            lp = logp[j, end - n:end]
            target = torch.tensor(cont[-n:], device=lp.device)
            answers.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings: disjoint windows of max_length tokens, each after the last
        token of the one before (the first after EOT), as lm_eval's HF model scores them."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (string,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) decoded by the sampler with this model's policy: greedy unless
        gen_kwargs give a temperature (do_sample), cut before the first `until` string, at most
        `max_gen_toks` tokens; the request's forwards and tokens are appended to `generations`."""
        from pipeline.decode.sampler import GenerationRequest

        reqs = []
        for context, kw in (r.args for r in requests):
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kw.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_tokens - self.sampler.step_masks):]
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            reqs.append(GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, policy=self.policy, gamma=self.gamma,
                                          max_horizon=self.max_horizon, temperature=temperature,
                                          stop=[u for u in until if u], stop_on_eos=True))
        texts = []
        for start in range(0, len(reqs), self.batch_size):
            for req, res in zip(reqs[start:start + self.batch_size],
                                self.sampler.generate(reqs[start:start + self.batch_size]), strict=True):
                texts.append(res.text)
                self.generations.append({"forwards": res.stats.forwards, "tokens": res.stats.tokens,
                                         "tokens_per_forward": res.stats.tokens / max(1, res.stats.forwards)})
                self.cache_hook.add_partial("generate_until", (req.prompt_ids, req.stop), res.text)
        return texts

    def parallelism(self) -> dict:
        """The generations so far: requests, tokens, forwards, tokens per forward (all tokens / all forwards)
        and the mean of the per-request tokens per forward."""
        g = self.generations
        tokens, forwards = sum(x["tokens"] for x in g), sum(x["forwards"] for x in g)
        return {"requests": len(g), "tokens": tokens, "forwards": forwards,
                "tokens_per_forward": tokens / max(1, forwards),
                "mean_request_tokens_per_forward": sum(x["tokens_per_forward"] for x in g) / max(1, len(g))}


@torch.no_grad()
def token_logprobs(sampler, ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """log p(next token) [B, T, V] of the sampler's model under a plain causal forward of `ids` [B, T] (only
    the last `keep` positions when keep > 0: the LM head over every position costs as much as the layers of a
    small model), the ids the sampler never emits (`banned_ids`) excluded from the distribution."""
    kw = {"logits_to_keep": keep} if keep > 0 and _keeps_logits(sampler.model) else {}
    logits = sampler.model(input_ids=ids, use_cache=False, **kw).logits.float()
    if keep > 0:
        logits = logits[:, -keep:]
    if sampler.banned_ids.numel():
        logits[..., sampler.banned_ids] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def _keeps_logits(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def task_manager(cache_dir: str | None, *, include_defaults: bool = True):
    """lm_eval's TaskManager with our local tasks (pipeline/eval/tasks/) before its own: `lambada_openai`
    here is ours, over the cached LAMBADA file. `include_defaults=False`: ours only (no index of lm_eval's
    thousands of task files, ~15 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults,
                       metadata={"fluid_cache_dir": str(cache_dir) if cache_dir else None})


@contextlib.contextmanager
def hub_offline(tasks: list[str]):
    """Local tasks only: the dataset hub is switched off while they run (nothing can try the network).
    A task that is not local needs the hub: a FluidError up front where the environment forbids it."""
    remote = [t for t in tasks if t not in LOCAL_TASKS]
    if remote:
        blocked = [v for v in OFFLINE_ENV if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
        if blocked:
            raise FluidError(f"harness task(s) {remote} need the dataset hub and {blocked[0]} is set; the tasks "
                             f"that run offline are {list(LOCAL_TASKS)}")
        yield
        return
    saved = {v: os.environ.get(v) for v in OFFLINE_ENV}
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
    import datasets

    was = datasets.config.HF_DATASETS_OFFLINE  # read at import: set it too
    datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_OFFLINE = was
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm_eval's own warnings at our default verbosity (e.g. that our lambada_openai overrides its own, and
    a hint about --metadata that does not apply here) are dropped; its errors still show."""
    import logging

    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def run_tasks(lm: FluidLM, tasks: list[str], *, limit: int | None, cache_dir=None, per_doc: bool = False) -> dict:
    """`tasks` through `lm_eval.simple_evaluate` on `lm` (first `limit` docs of each; None: all) →
    {"tasks": {task: {metric: value}}, "samples": {task: n}, "parallelism": lm.parallelism() of this run};
    `per_doc`: also "per_doc": {task: {metric: [value of doc 0, 1, …]}}."""
    import lm_eval

    lm.generations = []
    with hub_offline(tasks), _quiet_lm_eval():
        try:
            tm = task_manager(cache_dir, include_defaults=any(t not in LOCAL_TASKS for t in tasks))
            res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=tm,
                                          bootstrap_iters=0, log_samples=per_doc, random_seed=0)
        except (ConnectionError, OSError) as e:
            raise FluidError(f"harness tasks {tasks}: {type(e).__name__}: {e} (tasks other than "
                             f"{list(LOCAL_TASKS)} fetch their data from the dataset hub)") from None
    if res is None:  # only on ranks > 0 of a distributed lm_eval run
        return {}
    metrics = {t: {k.split(",")[0]: float(v) for k, v in m.items() if isinstance(v, (int, float))
                   and "," in k and "_stderr" not in k} for t, m in res["results"].items()}
    samples = {t: int(v.get("effective", v.get("original", 0))) if isinstance(v, dict) else int(v)
               for t, v in res.get("n-samples", {}).items()}
    out = {"tasks": metrics, "samples": samples, "parallelism": lm.parallelism()}
    if per_doc:
        out["per_doc"] = {t: {m: [float(d[m]) for d in sorted(docs, key=lambda d: d["doc_id"])] for m in docs[0]["metrics"]}
                          for t, docs in res.get("samples", {}).items() if docs}
    return out

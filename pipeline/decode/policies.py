"""Decoding policies of the elastic-horizon sampler (docs/method.md §7): requests, gates, horizons, sampling.

Everything here is per row and model-free, so it is unit-testable on made-up distributions.

Policies (`gamma` is the one knob):
* `ar`        K = 1; the exact AR token.
* `fixed`     K = max_horizon; commit draft tokens left to right while p(chosen) ≥ gamma.
* `threshold` K = max_horizon (default k_max); commit while the position's max-prob ≥ gamma.
* `entropy`   K from `ElasticHorizon`; commit while the cumulative entropy (nats) of the committed
              run, the first token included, stays ≤ gamma.
* `khead`     K from the learned horizon head; commit while p(chosen) ≥ gamma.
* `verify`    drafts are committed only once the model's own AR prediction confirms them (lossless).
              Greedy: K from `cost_model.CostAwareHorizon` (forward cost by width × acceptance by
              draft position; timing may drive it since the output is the AR output anyway). With
              temperature > 0: speculative-sampling acceptance and K from `ElasticHorizon`, so that a
              seed reproduces on any machine.
The first token of a step is the exact AR prediction and is always committed. Confidence and entropy
are read from the model's distribution at temperature 1 (after [M]/pad are excluded), whatever the
sampling temperature. gamma > 1 (probability gates) or gamma < 0 (entropy) admits only the first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline.decode.stops import stop_problem
from pipeline.errors import FluidError

POLICIES = ("ar", "fixed", "threshold", "entropy", "khead", "verify")
DEFAULT_GAMMA = {"fixed": 0.9, "threshold": 0.9, "khead": 0.9, "entropy": 0.5, "ar": 0.0, "verify": 0.0}
ELASTIC = ("entropy", "verify")


class InvalidRequest(FluidError, ValueError):
    """A generation argument is out of range (both a FluidError and a ValueError)."""


@dataclass
class GenerationRequest:
    """One generation job. `None` fields take the sampler's defaults (fluid.json `policy_defaults`)."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int = 64
    policy: str | None = None
    gamma: float | None = None
    max_horizon: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True


@dataclass
class Resolved:
    """A request with defaults applied and arguments checked."""

    prompt_ids: list[int]
    max_tokens: int
    policy: str
    gamma: float
    max_horizon: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_on_eos: bool


def resolve(req: GenerationRequest, *, k_max: int, defaults: dict, encode, context: int | None) -> Resolved:
    """Apply defaults, tokenize, validate. Raises InvalidRequest with a message saying what to fix."""
    if not isinstance(req, GenerationRequest):
        raise InvalidRequest(f"expected a GenerationRequest, got {type(req).__name__}")
    policy = req.policy or defaults.get("policy") or "ar"
    if policy not in POLICIES:
        raise InvalidRequest(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if req.prompt is not None and req.prompt_ids is not None:
        raise InvalidRequest("give either prompt or prompt_ids, not both")
    if req.prompt_ids is not None:
        ids = [int(t) for t in req.prompt_ids]
    elif req.prompt is not None:
        if not isinstance(req.prompt, str):
            raise InvalidRequest(f"prompt must be a string, got {type(req.prompt).__name__}")
        ids = encode(req.prompt) if req.prompt else []
    else:
        ids = []
    if not ids:
        raise InvalidRequest("the prompt is empty: give a non-empty prompt or prompt_ids")
    if context is not None and len(ids) >= context:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens but the model context is {context}: no room to generate; "
            "shorten the prompt"
        )
    if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
    max_tokens = req.max_tokens if context is None else min(req.max_tokens, context - len(ids))
    temperature = float(req.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0 (0 = greedy), got {req.temperature!r}")
    top_p = float(req.top_p)
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {req.top_p!r}")
    gamma = req.gamma
    if gamma is None:
        same = defaults.get("policy") in (None, policy)
        gamma = defaults.get("gamma") if same and defaults.get("gamma") is not None else DEFAULT_GAMMA[policy]
    gamma = float(gamma)
    if math.isnan(gamma):
        raise InvalidRequest("gamma must be a number, got NaN")
    horizon = req.max_horizon if req.max_horizon is not None else defaults.get("max_horizon")
    horizon = k_max if horizon is None else int(horizon)
    if horizon < 1:
        raise InvalidRequest(f"max_horizon must be >= 1, got {horizon}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    problem = stop_problem(stop)
    if problem:
        raise InvalidRequest(problem)
    return Resolved(ids, max_tokens, policy, gamma, min(horizon, k_max), temperature, top_p, req.seed,
                    stop, bool(req.stop_on_eos))


class ElasticHorizon:
    """Timing-independent horizon controller of `entropy`, `khead` (as a guard) and sampled `verify`.

    * whole draft accepted (K > 1): K doubles (up to the cap) and the probe back-off resets;
    * otherwise K shrinks halfway towards the accepted length a: K ← ⌊(K + a) / 2⌋, so repeated
      failures reach K = 1: plain AR steps with no masks (a failed probe goes there at once).
      After `interval` AR steps one probe with K = `probe_k` is made; each failed probe doubles the
      interval (up to `max_interval`), so failing drafts cost almost nothing and K never
      oscillates 1 ↔ 2.
    The first horizon (`start`) is a probe too (its masks ride along the prompt). A failed probe
    costs one mask token in one forward (`verify` only observes a probe's drafts, see sampler.py).
    On this project's 2-core CPUs a 2-token forward of SmolLM2-135M costs ~1.6× a 1-token one
    (MKL is slow for 2–3 rows; 4–8 rows cost ~1.4–1.5×), so a probe costs ~0.6 forward there and
    ~0 on a GPU; with exponential back-off that is a few probes per request.
    """

    def __init__(self, cap: int, *, start: int = 4, probe_k: int = 2, base_interval: int = 16,
                 max_interval: int = 256):
        self.cap = max(1, cap)
        self.probe_k = min(probe_k, self.cap)
        self.base_interval = base_interval
        self.max_interval = max_interval
        self.interval = base_interval
        self.k = min(start, self.cap)
        self.probing = True  # the first horizon is a guess: treat it as a probe
        self.wait = 0

    def update(self, k_used: int, accepted: int) -> None:
        """Feed back one step: `k_used` tokens were proposed, the first `accepted` (≥ 1) were kept."""
        if self.cap == 1:
            return
        if k_used <= 1:  # an AR step: count down to the next probe
            self.wait += 1
            if self.k == 1 and self.wait >= self.interval:
                self.k, self.probing, self.wait = self.probe_k, True, 0
            return
        if accepted >= k_used:
            self.k, self.probing, self.interval = min(self.cap, 2 * k_used), False, self.base_interval
            return
        if self.probing and accepted <= 1:  # a failed probe: back to AR, wait twice as long next time
            self.k, self.interval = 1, min(self.max_interval, 2 * self.interval)
        else:  # halfway towards the accepted length
            self.k = max(1, (k_used + accepted) // 2)
            if accepted >= 2:
                self.interval = self.base_interval
        self.probing, self.wait = False, 0


def gated_length(policy: str, gamma: float, probs: torch.Tensor, chosen: torch.Tensor) -> int:
    """How many of the K positions to commit (≥ 1). `probs` [K, V] at temperature 1, `chosen` [K]."""
    k = probs.shape[0]
    if k <= 1 or policy == "ar":
        return 1
    if policy == "threshold":
        ok = probs.max(dim=-1).values >= gamma
    elif policy == "entropy":
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
        ok = ent.cumsum(0) <= gamma
    elif policy in ("fixed", "khead"):
        ok = probs.gather(1, chosen[:, None])[:, 0] >= gamma
    else:
        raise ValueError(f"policy {policy!r} has no confidence gate")
    ok = ok[1:].tolist()
    n = 1
    for good in ok:
        if not good:
            break
        n += 1
    return n


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution tokens are drawn from: softmax(logits / T), restricted to the top-p nucleus.
    Temperatures and top_p too small for float32 (a request may send 1e-300) give the limits they tend to:
    the most likely token(s), never NaN."""
    z = logits.float()
    z = (z - z.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)  # 0 at the max
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        drop[..., 0] = False  # the most likely token stays (top_p may round to 0 in float32)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` [K, V] (CPU generator, so results do not depend on the device)."""
    return torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0]


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int, gen: torch.Generator) -> tuple[bool, int]:
    """Speculative-sampling rule: keep `draft` (drawn from q) with prob min(1, p/q), else resample
    from the residual max(0, p − q). The result is distributed exactly as p. `p`, `q`: [V] on CPU."""
    pd, qd = float(p[draft]), float(q[draft])
    u = float(torch.rand((), generator=gen))
    if qd > 0 and u * qd <= pd:
        return True, draft
    resid = (p - q).clamp_min(0.0)
    if float(resid.sum()) <= 0.0:
        resid = p
    return False, int(torch.multinomial(resid / resid.sum(), 1, generator=gen))

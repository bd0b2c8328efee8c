"""Elastic-horizon sampler with an exact KV cache (docs/method.md §7–§10). Plain torch + transformers, no Ray.

In:  a causal LM whose vocabulary includes the mask token [M] (an export of `fluid adapt`), its
     tokenizer, K_max, an optional horizon head and forward-cost table; `GenerationRequest`s.
Out: `GenerationResult`s (`generate`, batched) or `StreamChunk`s (`stream`); `decoder()` hands the
     continuous-batching loop (pipeline/decode/decoder.py) to the Serve engine.
Threads: every tokenizer call (`encode`, `decode`, `render`, the decoder's detokenizer) holds
`tokenizer_lock`: the Serve engine decodes on its step thread while request handlers encode on others,
and a fast tokenizer used by two threads at once can fail ("Already borrowed").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from pipeline.config import NoiseConfig
from pipeline.decode.candidates import MAX_NODES
from pipeline.decode.cost_model import (
    LAYOUTS,
    SPANS_MAX_K,
    TREE_MAX_WIDTH,
    AcceptanceMemory,
    ForwardCost,
    calibrate,
    check_layouts,
)
from pipeline.decode.decoder import _Decoder
from pipeline.decode.detok import TextDeltas
from pipeline.decode.horizon_head import HorizonHead
from pipeline.decode.matmul import current_matmul
from pipeline.decode.policies import (
    GenerationRequest,
    InvalidRequest,
    Resolved,
    resolve,
)
from pipeline.decode.rows import GenerationResult, GenerationStats, StreamChunk, _Row
from pipeline.decode.scheduler import Scheduler, StepCost, calibrate_steps
from pipeline.errors import FluidError
from pipeline.model.causal_lm import cache_kwarg

__all__ = ["GenerationRequest", "GenerationResult", "GenerationStats", "Sampler", "StreamChunk", "TextDeltas"]


def _input_rows(emb) -> int:
    """Rows of an input embedding, also when peft wraps it (TrainableTokensWrapper has no num_embeddings)."""
    for layer in (emb, getattr(emb, "base_layer", None)):
        rows = getattr(layer, "num_embeddings", None) if layer is not None else None
        if rows is not None:
            return int(rows)
    return int(emb.weight.shape[0])


class Sampler:
    """Elastic-horizon decoding of a causal LM whose vocabulary includes the mask token."""

    def __init__(self, model, tokenizer, *, mask_token_id: int, k_max: int = NoiseConfig.k_max,
                 horizon_head: HorizonHead | None = None, device=None, policy_defaults: dict | None = None,
                 forward_cost: ForwardCost | list[float] | None = None,
                 verify_layouts: tuple[str, ...] = LAYOUTS, step_cost: StepCost | None = None):
        if not isinstance(k_max, int) or k_max < 1:
            raise InvalidRequest(f"k_max must be an integer >= 1, got {k_max!r}")
        # input vocabulary: a frozen-base drafter reads [M] from a vector of its own, outside the base
        # matrix (pipeline/model/drafter.py), and its LM head has no [M] row to ban
        vocab = _input_rows(model.get_input_embeddings())
        out_vocab = model.get_output_embeddings().weight.shape[0]
        if not 0 <= int(mask_token_id) < vocab:
            raise InvalidRequest(f"mask_token_id {mask_token_id} is outside the model vocabulary (size {vocab})")
        if device is not None:
            model = model.to(device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer_lock = threading.RLock()
        self.device = next(model.parameters()).device
        self.mask_token_id, self.k_max = int(mask_token_id), k_max
        self.policy_defaults = dict(policy_defaults or {})
        eos = set()
        for src in (getattr(tokenizer, "eos_token_id", None),
                    getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            eos.update([src] if isinstance(src, int) else list(src or []))
        self.eos_ids = frozenset(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        banned = [self.mask_token_id]
        if pad is not None and pad not in self.eos_ids and pad != self.mask_token_id:
            banned.append(int(pad))
        self.banned_ids = torch.tensor([b for b in banned if b < out_vocab], device=self.device, dtype=torch.long)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.attn_impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
        self.cache_kwarg = cache_kwarg(model)
        self.compact_min = 16  # compact the batch cache when this many (or S/8) columns are holes
        if horizon_head is not None:
            hidden = getattr(model.config, "hidden_size", None)
            if hidden is not None and horizon_head.hidden_size != hidden:
                raise FluidError(f"the horizon head reads hidden size {horizon_head.hidden_size}, "
                                 f"the model has {hidden}")
            horizon_head = horizon_head.to(self.device).eval()
        self.horizon_head = horizon_head
        if forward_cost is not None and not isinstance(forward_cost, ForwardCost):
            forward_cost = ForwardCost(forward_cost)
        self._forward_cost = forward_cost
        self._step_cost, self._scheduler = step_cost, None
        self.verify_layouts = check_layouts(verify_layouts)  # the step layouts greedy verify may use
        # what finished greedy-verify rows learned of the drafter starts the next rows (None: each row
        # starts from the prior); outputs do not depend on it, only where drafting starts
        self.acceptance: AcceptanceMemory | None = AcceptanceMemory()

    @property
    def step_masks(self) -> int:
        """The most mask tokens one row feeds in one step (transient KV entries, cropped after it):
        k_max − 1 for a chain, K·(K − 1) for spans of K = min(k_max, SPANS_MAX_K); with candidate
        trees, whose rejected nodes are transient too, all but one entry of the widest tree step."""
        spans = min(self.k_max, SPANS_MAX_K) if "spans" in self.verify_layouts else 0
        tree = 0
        if self.k_max > 1 and "spans+candidates" in self.verify_layouts:
            tree = TREE_MAX_WIDTH - 1
        elif self.k_max > 1 and "candidates" in self.verify_layouts:
            tree = MAX_NODES + min(self.k_max, SPANS_MAX_K) - 1
        return max(self.k_max - 1, spans * (spans - 1), tree)

    @property
    def forward_cost(self) -> ForwardCost:
        """Relative forward cost by width that greedy `verify` plans with: given at construction, or
        measured on this device the first time it is needed (`cost_model.calibrate`)."""
        if self._forward_cost is None:
            self._forward_cost = calibrate(self.model, token_id=self.clean_probe_id, mask_token_id=self.mask_token_id)
        return self._forward_cost

    @property
    def step_cost(self) -> StepCost:
        """Cost of a step by rows × width that the batch scheduler plans with: given, measured by
        `calibrate_steps`, or else the forward cost of rows × width tokens (`StepCost.from_forward`)."""
        return self._step_cost or StepCost.from_forward(self.forward_cost)

    @step_cost.setter
    def step_cost(self, cost: StepCost | None) -> None:
        self._step_cost, self._scheduler = cost, None

    @property
    def scheduler(self) -> Scheduler:
        """The batch scheduler of greedy verify's cost-aware rows (pipeline/decode/scheduler.py)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self.step_cost)
        return self._scheduler

    def calibrate_steps(self, max_rows: int, cache_dir=None) -> dict:
        """Measure (or read from the cache) the step cost over the batch sizes up to `max_rows` on this
        device and dtype (scheduler.calibrate_steps); returns what it did (cached, seconds, file)."""
        cost, info = calibrate_steps(self.model, max_rows, token_id=self.clean_probe_id,
                                     mask_token_id=self.mask_token_id, cache_dir=cache_dir)
        self.step_cost = cost
        return info

    @property
    def matmul(self) -> str:
        """The operand order of the model's narrow products (pipeline/decode/matmul.py; load_sampler chooses it)."""
        return current_matmul(self.model)

    @property
    def clean_probe_id(self) -> int:
        """A token id other than the mask, for timing forwards of clean tokens."""
        return 0 if self.mask_token_id != 0 else 1

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def render(self, fn, *args):
        """`fn(tokenizer, *args)` under the tokenizer lock (e.g. a chat template)."""
        with self.tokenizer_lock:
            return fn(self.tokenizer, *args)

    def resolve(self, req: GenerationRequest) -> Resolved:
        r = resolve(req, k_max=self.k_max, defaults=self.policy_defaults, encode=self.encode, context=self.context)
        if r.policy == "khead" and self.horizon_head is None:
            raise InvalidRequest("policy 'khead' needs a horizon head (horizon_head.safetensors); none is loaded")
        return r

    def decoder(self, requests: list[GenerationRequest]) -> _Decoder:
        """A step-by-step decoder (for serving loops and tests); `generate` runs one to the end."""
        return _Decoder(self, [self.resolve(q) for q in requests])

    def generate(self, requests: list[GenerationRequest] | GenerationRequest) -> list[GenerationResult]:
        single = isinstance(requests, GenerationRequest)
        reqs = [requests] if single else list(requests)
        if not reqs:
            return []
        dec = self.decoder(reqs)
        while not dec.done:
            dec.step()
        return [self.result(row) for row in dec.rows]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        dec = self.decoder([request])
        row = dec.rows[0]
        deltas = TextDeltas(row.r.stop)
        while not dec.done:
            [(_, toks)] = dec.step()
            if row.finish is None:
                yield StreamChunk(toks, deltas.push(row.new_text), step=row.stats.forwards - 1)
            else:
                res = self.result(row)
                yield StreamChunk(toks, deltas.finish(res.text), row.finish, res, step=row.stats.forwards - 1)

    def result(self, row: _Row) -> GenerationResult:
        """The finished result of a decoder row."""
        return GenerationResult(list(row.generated), row.text, row.finish, len(row.r.prompt_ids), row.stats)

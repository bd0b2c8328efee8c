"""Per-request state of the decoding loop (decoder.py): results, stream chunks, and a row's state.
Plain torch, no Ray."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from pipeline.decode.cost_model import AcceptanceMemory, CostAwareHorizon, ForwardCost
from pipeline.decode.detok import IncrementalText
from pipeline.decode.policies import ELASTIC, ElasticHorizon, Resolved


@dataclass
class GenerationStats:
    policy: str
    forwards: int = 0
    tokens: int = 0
    tokens_per_forward: float = 0.0
    accepted_hist: dict[int, int] = field(default_factory=dict)  # tokens committed by a forward -> count
    step_of_token: list[int] = field(default_factory=list)  # per generated token: the forward (0, 1, …) committing it
    mask_tokens: int = 0  # mask tokens fed in all (the drafting cost)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens; EOS and anything after a stop are not included
    text: str  # decoded, cut before the first stop string
    finish_reason: str  # "stop" | "length" | "eos"
    prompt_tokens: int
    stats: GenerationStats


@dataclass
class StreamChunk:
    token_ids: list[int]  # tokens committed by this step
    text: str  # text delta (never a broken UTF-8 character or the start of a possible stop string)
    finish_reason: str | None = None
    result: GenerationResult | None = None  # on the last chunk
    step: int | None = None  # the forward (0, 1, …) of this request that committed `token_ids`


class _Row:
    """Decoding state of one request."""

    def __init__(self, r: Resolved, tokenizer, costs: ForwardCost | None = None,
                 layouts: tuple[str, ...] = ("chain",), tokenizer_lock=None,
                 memory: AcceptanceMemory | None = None):
        self.r = r
        self.feed: list[int] = list(r.prompt_ids)  # clean tokens not yet in the cache
        self.n_drafts = 0  # trailing tokens of `feed` that are unverified drafts (verify)
        self.parents: list[int] = []  # their tree (candidates.py; a chain unless a candidate tree)
        self.leaf = -1  # the draft node a single span of masks is anchored at (the chain's last draft)
        self.tops: list[list[int]] = []  # the drafter's ranked candidates per draft depth (cost-aware rows)
        self.draft_q: list[torch.Tensor] = []  # their proposal distributions (verify, temperature > 0)
        self.pos = 0  # this row's tokens in the cache = position of feed[0]
        self.generated: list[int] = []
        self.finish: str | None = None
        self.text: str | None = None  # the final text (set when the row finishes)
        self.detok = IncrementalText(tokenizer, r.stop, tokenizer_lock)
        self.new_text = ""  # text added by the last step
        # khead gets the controller too, as a guard: its learned K is used only while drafts pay off
        self.horizon = ElasticHorizon(r.max_horizon) if r.policy in (*ELASTIC, "khead") else None
        if r.policy == "verify" and r.temperature == 0 and costs is not None:
            # greedy verify is lossless: its horizon may follow the machine's timing (cost_model.py);
            # sampling keeps the timing-independent controller, so a seed reproduces on any machine
            self.horizon = CostAwareHorizon(r.max_horizon, costs, layouts=layouts)
            if memory is not None:
                memory.seed(self.horizon)  # start from what the sampler's earlier rows learned
        self.observe: list[int] = []  # verify's probe drafts, compared with the tokens AR then commits
        self.observe_from = 0  # index in `generated` of observe[0]
        self.prev_hidden: torch.Tensor | None = None
        self.gen = torch.Generator()
        if r.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(int(r.seed))
        self.stats = GenerationStats(r.policy)
        self.t0 = time.perf_counter()

"""The decoding loop behind `Sampler` (docs/method.md §7–§10): rows, one step, continuous batching.
Plain torch + transformers, no Ray.

Each step feeds, per row, the tokens not yet in the cache as clean inputs (the tokens committed last
step; for `verify` the pending block b_1 … b_n, b_2… being unverified drafts) plus K − 1 mask tokens
whose positions continue the sequence — for a cost-aware `spans` step (cost_model.py) one such span
anchored at each b_i, seeing b_1 … b_i only (the two-stream rule of training), so the drafts after
any verdict are ready. The output at the last clean token is the exact AR prediction; the masks'
outputs are the drafts. After committing (policies.py), the mask and rejected entries — the tail of
the step — are dropped from the cache; the prefix is never recomputed. Greedy verify's pending drafts
may also be a candidate tree (candidates.py: the `candidates` layouts), verified in one forward under
a tree mask; the accepted path's entries are moved next to the prefix before the tail is dropped.

Batching: rows are left-aligned in the step's [B, W] input and right-padded. One cache holds all rows;
entries a row did not keep become holes, tracked in `valid` [B, S] and hidden by an explicit 4-D mask
(position ids are per row). Holes are compacted away from time to time (kvcache.compact_rows).
When no row is ragged or has holes and every row's step is one causal sequence (one span, no tree), no
mask is passed and the model's own causal mask is used.

Continuous batching (iteration-level scheduling, as Orca and vLLM do): `_Decoder.add` admits new rows
between steps and finished rows leave after the step that finished them. A new row's prompt is fed in
a forward of its own (with the other rows admitted at the same time) on a fresh cache, which is then
joined to the running cache (kvcache.join_rows), so the running rows never pay for a wide prefill
input. Each row keeps its own horizon, positions and cache entries: output equals unbatched decoding. With
several rows, greedy verify's K and layouts come from the batch scheduler (scheduler.py: the cost of the
whole step by rows × width × the cache length against each row's expected acceptance); one row decides alone, as before.
Text is detokenized incrementally (detok.py), stop strings are matched on the newest text only.
"""


from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from pipeline.decode import candidates as cand
from pipeline.decode import kvcache
from pipeline.decode.cost_model import CostAwareHorizon
from pipeline.decode.policies import (
    ELASTIC,
    Resolved,
    gated_length,
    sample,
    sampling_probs,
    speculative_accept,
)
from pipeline.decode.rows import _Row
from pipeline.decode.scheduler import Demand
from pipeline.errors import FluidError
from pipeline.model.attention import to_additive

if TYPE_CHECKING:
    from pipeline.decode.sampler import Sampler


class _Decoder:
    """Batched decoding of several requests; `step()` runs one forward for the rows in the cache and
    one for rows added since the last step. `rows` are the rows it was created with."""

    def __init__(self, sampler: Sampler, resolved: list[Resolved]):
        self.s = sampler
        self.active: list[_Row] = []  # rows in the cache (in cache order), then rows not yet fed
        self.cache = None
        self.valid = torch.zeros((0, 0), dtype=torch.bool, device=sampler.device)
        self.rows = self.add(resolved)

    @property
    def done(self) -> bool:
        return not self.active

    def add(self, resolved: list[Resolved]) -> list[_Row]:
        """Admit rows (continuous batching): their prompts are fed by the next `step()`."""
        greedy_verify = any(r.policy == "verify" and r.temperature == 0 for r in resolved)
        costs = self.s.forward_cost if greedy_verify else None
        memory = getattr(self.s, "acceptance", None)
        rows = [_Row(r, self.s.tokenizer, costs, self.s.verify_layouts,
                     getattr(self.s, "tokenizer_lock", None), memory) for r in resolved]
        self.active.extend(rows)
        return rows

    def kv_entries(self) -> int:
        """Cache entries held (rows × cache length, holes included): the decoder's KV use."""
        return int(self.valid.numel())

    def _horizon(self, row: _Row) -> int:
        """K of the row's next step, as the row alone decides it."""
        r = row.r
        if r.policy == "ar":
            k = 1
        elif isinstance(row.horizon, CostAwareHorizon):
            k = 1 if row.observe else row.horizon.choose(len(row.feed))
        elif r.policy in ELASTIC:
            k = row.horizon.k
            if r.policy == "verify" and (row.observe or (row.n_drafts and row.horizon.probing)):
                k = 1  # a probe's verdict is pending: no more drafts until it is known
        elif r.policy == "khead":
            k = 1 if row.prev_hidden is None else int(self.s.horizon_head.predict(row.prev_hidden))
            if row.horizon.k == 1:
                k = 1  # the head's horizons keep failing: plain AR until the controller's next probe
        else:
            k = r.max_horizon
        return self._clamp(row, k)

    def _clamp(self, row: _Row, k: int) -> int:
        """K within the row's cap and what it may still commit."""
        r = row.r
        remaining = r.max_tokens - len(row.generated)
        if r.policy == "verify":
            remaining -= max(cand.depths(row.parents), default=0) + 1  # what the pending drafts may commit first
        return max(1, min(k, r.max_horizon, remaining))

    @torch.inference_mode()
    def step(self) -> list[tuple[_Row, list[int]]]:
        """One decoding step for all active rows; returns (row, tokens committed) per row. A caller may end
        a row between steps by setting `row.finish` (e.g. "cancelled"): it is dropped before the forward."""
        self._drop_finished()
        n_cached = self.valid.shape[0]
        cached, fresh = self.active[:n_cached], self.active[n_cached:]
        events = []
        if cached:
            events += self._forward(cached, self.cache)
        if fresh:
            cache = DynamicCache(config=self.s.model.config)
            kvcache.check_supported(cache)
            valid = self.valid
            self.valid = torch.zeros((len(fresh), 0), dtype=torch.bool, device=self.s.device)
            events += self._forward(fresh, cache)
            if cached:
                self.valid = kvcache.join_rows(self.cache, valid, cache, self.valid)
            else:
                self.cache = cache
        self._drop_finished()
        self._compact()
        return events

    def _anchors(self, row: _Row, k: int) -> list[int]:
        """Indices in `row.feed` that the step's mask spans (k − 1 masks each) are anchored at: one per
        pending token for a cost-aware `spans` step (cost_model.py), otherwise one: the pending chain's
        last draft, or the candidate tree's most likely leaf (or the last token when none is pending)."""
        root = len(row.feed) - 1 - row.n_drafts
        if k > 1 and isinstance(row.horizon, CostAwareHorizon) and row.horizon.spans:
            return list(range(root, len(row.feed)))
        return [root + 1 + row.leaf] if row.n_drafts else [root]

    def _forward(self, rows: list[_Row], cache) -> list[tuple[_Row, list[int]]]:
        """One forward of `rows` against `cache`, whose entries `self.valid` describes.

        A row's step input is its clean `feed` (its pending drafts a chain or a candidate tree) followed
        by its mask spans; each token sees the cache and its ancestors only (candidates.step_layout:
        the span anchored at feed index a sees feed[0..a] along the drafts' tree and its own earlier
        masks — the training layout's two-stream rule), so one step may verify a tree of drafts and
        draft for every possible verdict at once."""
        s = self.s
        past = kvcache.cache_len(cache)
        ks, anchors = self._plan(rows, past)
        ids, local, parent, lens = cand.step_layout(
            [(row.feed, row.parents, a, k - 1) for row, k, a in zip(rows, ks, anchors, strict=True)],
            s.mask_token_id)
        width = ids.shape[1]
        pos = torch.tensor([row.pos for row in rows])[:, None] + local
        mask = None
        if bool((lens != width).any()) or not bool(self.valid.all()) or not cand.is_sequential(parent, lens):
            mask = self._mask(self.valid, parent, past)
        first = [len(row.feed) - 1 - row.n_drafts for row in rows]  # first output each row reads
        keep = width - min(first)
        want_hidden = any(row.r.policy == "khead" for row in rows)
        out = s.model(input_ids=ids.to(s.device), position_ids=pos.to(s.device), attention_mask=mask,
                      use_cache=True, logits_to_keep=keep, output_hidden_states=want_hidden,
                      **{s.cache_kwarg: cache})
        logits = out.logits.float()
        logits[..., s.banned_ids] = float("-inf")
        hidden = out.hidden_states[-1] if want_hidden else None
        keeps, events = [], []
        for b, (row, k, anc) in enumerate(zip(rows, ks, anchors, strict=True)):
            lg = logits[b, first[b] - (width - keep): int(lens[b]) - (width - keep)]
            kept, tokens = self._read_row(row, lg, k, [a - first[b] for a in anc],
                                          hidden[b] if hidden is not None else None)
            keeps.append(kept)
            row.stats.mask_tokens += len(anc) * (k - 1)
            events.append((row, self._commit(row, tokens)))
            if row.observe:
                self._judge_probe(row)
        self._keep_in_cache(cache, keeps, width)
        return events

    def _plan(self, rows: list[_Row], past: int) -> tuple[list[int], list[list[int]]]:
        """Each row's horizon k and span anchors; with several rows and cost-aware horizons among them,
        the batch scheduler (scheduler.py) prices the whole step after the `past` cache entries the rows
        share and sets their k and layouts."""
        if len(rows) > 1 and any(isinstance(row.horizon, CostAwareHorizon) for row in rows):
            ks = self._schedule(rows, past)
        else:
            ks = [self._horizon(row) for row in rows]
        return ks, [self._anchors(row, k) for row, k in zip(rows, ks, strict=True)]

    def _schedule(self, rows: list[_Row], past: int) -> list[int]:
        """The scheduler's k per row; a row whose policy sets its own k (or a probe's verdict is pending)
        keeps it and counts as a fixed width."""
        demands, fixed = [], {}
        for i, row in enumerate(rows):
            if isinstance(row.horizon, CostAwareHorizon) and not row.observe:
                demands.append(Demand(len(row.feed), row.horizon))
            else:
                fixed[i] = self._horizon(row)
                demands.append(Demand(len(row.feed), width=len(row.feed) + fixed[i] - 1))
        plan = self.s.scheduler.plan(demands, context=past)
        return [fixed[i] if i in fixed else self._clamp(row, row.horizon.assign(c.k, c.layout, c.nodes, c.probing))
                for i, (row, c) in enumerate(zip(rows, plan, strict=True))]

    def _read_row(self, row: _Row, logits: torch.Tensor, k: int, anchors: list[int], hidden) -> tuple[list[int], list[int]]:
        """(the row's step slots whose cache entries stay, tokens it commits) from its logits; advances
        its position."""
        if row.r.policy == "verify":
            tokens, kept = self._verify(row, logits, anchors, k - 1)
        else:
            tokens, kept = self._draft(row, logits, k), list(range(len(row.feed)))
            if hidden is not None:
                row.prev_hidden = hidden[len(kept) - 1].detach()
            row.feed, row.n_drafts = list(tokens), 0
        row.pos += len(kept)
        return kept, tokens

    def _keep_in_cache(self, cache, keeps: list[list[int]], width: int) -> None:
        """Keep each row's entries `keeps[b]` (increasing slots of the step) and drop the rest of the step:
        crop the trailing entries no row keeps (masks come after every clean token, so kept entries
        lead) — or, after a candidate tree, move the accepted path next to the prefix first — and record
        which of the rest each row holds."""
        counts = [len(k) for k in keeps]
        kmax = max(counts)
        dev = self.s.device
        if any(k and k[-1] != len(k) - 1 for k in keeps):  # a tree's path: not a prefix of the step
            index = torch.zeros((len(keeps), kmax), dtype=torch.long)
            for b, k in enumerate(keeps):
                index[b, : len(k)] = torch.tensor(k, dtype=torch.long)
            kvcache.keep_step_entries(cache, index.to(dev), width)
        else:
            kvcache.drop_last(cache, width - kmax)
        new_valid = torch.arange(kmax, device=dev)[None, :] < torch.tensor(counts, device=dev)[:, None]
        self.valid = torch.cat([self.valid, new_valid], dim=1)

    def _mask(self, valid: torch.Tensor, parent: torch.Tensor, past: int) -> torch.Tensor:
        """[B, 1, W, past + W]: the cache entries a row holds, then the step input's ancestors
        (candidates.ancestor_mask; padding queries see only themselves: no empty rows, no NaN)."""
        dev = self.s.device
        m = cand.ancestor_mask(parent.to(dev))[:, None]
        if past:
            m = torch.cat([valid[:, None, None, :].expand(-1, 1, m.shape[2], -1), m], dim=-1)
        if self.s.attn_impl == "sdpa":
            return m
        if self.s.attn_impl.startswith("flash"):
            raise FluidError("batched rows of different lengths need a 4-D mask; load the model with "
                             "attn_implementation='sdpa' or 'eager'")
        return to_additive(m, self.s.model.dtype)

    def _draft(self, row: _Row, lg: torch.Tensor, k: int) -> list[int]:
        """Non-verify policies: lg [K, V] = the AR output then the K − 1 mask outputs."""
        r = row.r
        if r.temperature == 0:
            chosen = lg.argmax(dim=-1)
        else:
            chosen = sample(sampling_probs(lg, r.temperature, r.top_p), row.gen).to(lg.device)
        n = gated_length(r.policy, r.gamma, torch.softmax(lg, dim=-1), chosen) if k > 1 else 1
        if row.horizon is not None:
            row.horizon.update(k, n)
        return chosen[:n].tolist()

    def _verify(self, row: _Row, lg: torch.Tensor, anchors: list[int], span_len: int) -> tuple[list[int], list[int]]:
        """lg = AR outputs at the root b_1 and at the pending draft nodes, then the mask spans (`span_len`
        each) anchored at outputs `anchors` (0: the root, 1 + i: node i). Returns (committed, the step
        slots whose cache entries stay: the clean prefix and the accepted path)."""
        nd = row.n_drafts
        f0 = len(row.feed) - nd
        drafts = row.feed[f0:]
        path, nxt = self._walk(row, lg[: nd + 1], drafts)
        tokens = [*(drafts[v] for v in path), nxt]
        self._judge(row, tokens)
        end = path[-1] + 1 if path else 0  # the output of the last committed token before nxt
        new, qs, parents, leaf, tops = [], [], [], -1, []
        if span_len and end in anchors:  # the span anchored there holds the next drafts
            lo = nd + 1 + anchors.index(end) * span_len
            masks = lg[lo : lo + span_len]
            if row.r.temperature == 0:
                new, parents, leaf, tops = self._greedy_drafts(row, masks, len(row.generated) + len(tokens))
            else:
                q = sampling_probs(masks, row.r.temperature, row.r.top_p).cpu()
                new, qs = sample(q, row.gen).tolist(), list(q)
                parents, leaf = cand.chain_parents(len(new)), len(new) - 1
        row.feed, row.n_drafts, row.draft_q = [nxt, *new], len(new), qs
        row.parents, row.leaf, row.tops = parents, leaf, tops
        return tokens, [*range(f0), *(f0 + v for v in path)]

    def _walk(self, row: _Row, ar: torch.Tensor, drafts: list[int]) -> tuple[list[int], int]:
        """(accepted draft nodes, the next token) from the AR outputs `ar` at the root and the nodes:
        greedy — the tree walk (candidates.accept_path); sampled — the speculative rule along a chain."""
        r, nd = row.r, len(drafts)
        if r.temperature == 0:
            pred = ar.argmax(dim=-1).tolist()
            path = cand.accept_path(row.parents, drafts, pred)
            return path, pred[path[-1] + 1 if path else 0]
        p = sampling_probs(ar, r.temperature, r.top_p).cpu()
        m, nxt = 0, None
        while m < nd and nxt is None:
            ok, tok = speculative_accept(p[m], row.draft_q[m], drafts[m], row.gen)
            m, nxt = (m + 1, None) if ok else (m, tok)
        if nxt is None:
            nxt = int(sample(p[nd : nd + 1], row.gen)[0])
        return list(range(m)), nxt

    def _judge(self, row: _Row, tokens: list[int]) -> None:
        """Give the horizon controller a verify step's verdict (`tokens`: accepted drafts, then the next
        token). A cost-aware row also learns the drafter's rank of each AR token (candidates.ranks); after
        a candidate tree its chain statistics count the leading rank-1 drafts, as a chain would have."""
        h = row.horizon
        if h is None:
            return
        k_used, accepted = row.n_drafts + 1, len(tokens)
        if isinstance(h, CostAwareHorizon) and row.tops:
            ranks = cand.ranks(tokens, row.tops)
            h.update_ranks(ranks)
            if not cand.is_chain(row.parents):
                good = next((j for j, rank in enumerate(ranks) if rank != 1), len(ranks))
                k_used, accepted = len(ranks) + 1, good + 1
        h.update(k_used, accepted)

    def _greedy_drafts(self, row: _Row, masks: torch.Tensor, start: int):
        """The next greedy drafts from a span's mask outputs: (tokens, parents, anchor leaf, the ranked
        candidates per depth). A candidate tree when the row's plan says so, else a chain of argmaxes;
        a probe's chain is only observed (no drafts)."""
        h = row.horizon
        if h is not None and h.probing:
            # A probe is only observed: its drafts are compared with the tokens the next
            # AR steps commit, so a failing probe costs one mask token, not a wider forward.
            row.observe, row.observe_from = self._propose(row, masks, start), start
            return [], [], -1, []
        tops, probs = self._candidates(row, masks, start) if isinstance(h, CostAwareHorizon) else ([], [])
        if isinstance(h, CostAwareHorizon) and h.candidates:
            tree = cand.build_tree(tops, probs, h.nodes)
            return tree.tokens, tree.parents, tree.leaf, tops
        new = self._propose(row, masks, start)
        return new, cand.chain_parents(len(new)), len(new) - 1, tops

    def _judge_probe(self, row: _Row) -> None:
        """Give the horizon controller the verdict on an observed probe once it is known."""
        obs, start, gen = row.observe, row.observe_from, row.generated
        seen = min(len(obs), len(gen) - start)
        hits = next((j for j in range(seen) if gen[start + j] != obs[j]), seen)
        if hits < seen or seen == len(obs):
            row.horizon.update(len(obs) + 1, hits + 1)
            row.observe = []

    def _propose(self, row: _Row, masks: torch.Tensor, start: int) -> list[int]:
        """Greedy drafts for `verify` (the argmax of each mask output) of the tokens from index `start`
        of `row.generated` on; tests swap in oracle drafts."""
        return masks.argmax(dim=-1).tolist()

    def _candidates(self, row: _Row, masks: torch.Tensor, start: int) -> tuple[list[list[int]], list[list[float]]]:
        """The drafter's ranked top tokens and probabilities per mask output (candidates.top_candidates),
        for a candidate tree and the rank statistics; tests swap in other drafters."""
        return cand.top_candidates(masks)

    def _commit(self, row: _Row, tokens: list[int]) -> list[int]:
        """Append tokens, trimming exactly at EOS, max_tokens or a stop string (as AR would stop).
        Text is decoded incrementally; a stop string is searched for in the newest text only."""
        r, s = row.r, self.s
        out, reason, parts = [], None, []
        for t in tokens:
            if r.stop_on_eos and t in s.eos_ids:
                reason = "eos"
                break
            out.append(t)
            parts.append(row.detok.push(t))
            if row.detok.stop_at is not None:
                reason = "stop"
                row.text = row.detok.text[: row.detok.stop_at]
                break
            if len(row.generated) + len(out) >= r.max_tokens:
                reason = "length"
                break
        row.generated.extend(out)
        row.new_text = "".join(parts)
        st = row.stats
        st.forwards += 1
        st.tokens = len(row.generated)
        st.step_of_token += [st.forwards - 1] * len(out)
        st.accepted_hist[len(out)] = st.accepted_hist.get(len(out), 0) + 1
        if reason is not None:
            row.finish = reason
            if row.text is None:
                row.text = s.decode(row.generated)  # once per request: the exact full decode
            st.tokens_per_forward = st.tokens / st.forwards
            st.wall_time_s = time.perf_counter() - row.t0
            memory = getattr(s, "acceptance", None)
            if memory is not None and isinstance(row.horizon, CostAwareHorizon):
                memory.learn(row.horizon)
        return out

    def _compact(self) -> None:
        if not self.active or self.cache is None:
            return
        size = self.valid.shape[1]
        holes = size - int(self.valid.sum(dim=1).max())
        if holes and (len(self.active) == 1 or holes >= max(self.s.compact_min, size // 8)):
            self.valid = kvcache.compact_rows(self.cache, self.valid)

    def _drop_finished(self) -> None:
        """Remove finished rows; those in the cache leave it (their entries are freed)."""
        n_cached = self.valid.shape[0]
        alive = [i for i, row in enumerate(self.active) if row.finish is None]
        if len(alive) == len(self.active):
            return
        keep = [i for i in alive if i < n_cached]
        if len(keep) < n_cached:
            if keep:
                kvcache.select_rows(self.cache, torch.tensor(keep, device=self.s.device))
                self.valid = self.valid[keep]
            else:
                self.cache = None
                self.valid = torch.zeros((0, 0), dtype=torch.bool, device=self.s.device)
        self.active = [self.active[i] for i in alive]

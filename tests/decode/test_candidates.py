"""Candidate-tree verification (pipeline/decode/candidates.py): the tree, its mask and walk, the exact KV
cache, and the cost model's tree rates. Decoding runs on the tiny random Llama of test_sampler.py."""

import random

import pytest
import torch

from pipeline.batch import CLEAN, PAD
from pipeline.decode import candidates as cand
from pipeline.decode.cost_model import LAYOUTS, TREE_LAYOUTS, CostAwareHorizon, ForwardCost
from pipeline.decode.sampler import Sampler, _Decoder
from pipeline.model.attention import two_stream_mask
from tests.decode.test_sampler import PROMPTS, _check_cache, req

FLAT = ForwardCost.flat()
CPU = ForwardCost({1: 1.0, 2: 1.6, 4: 1.45, 8: 1.6, 16: 1.93, 32: 2.5})
PROBS = [0.4, 0.3, 0.2, 0.1]  # the drafter's probabilities of its ranks 1…4 (tests' drafters)
CLOSE = [0.45, 0.44, 0.06, 0.05]  # a drafter torn between its first two choices


# --- the tree, its layout and the walk (pure functions) ---

def test_build_tree_is_best_first_with_ties_broken_by_token_id():
    ids, probs = zip(*[cand.ranked([9, 7, 3], [0.25, 0.5, 0.25]), cand.ranked([6, 4, 5], [0.25, 0.5, 0.25])],
                     strict=True)
    assert ids[0] == [7, 3, 9] and probs[0] == [0.5, 0.25, 0.25]  # equal probabilities: the smaller id first
    tree = cand.build_tree(list(ids), list(probs), 6)
    # 0.5: (7); 0.25: (3), (7,4), (9) in path order; 0.125: (3,4) before (7,5)
    assert tree.tokens == [7, 3, 4, 9, 4, 5] and tree.parents == [-1, -1, 0, -1, 1, 0]
    assert tree.leaf == 2  # (7, 4): the first childless node, the most likely leaf
    assert cand.depths(tree.parents) == [1, 1, 2, 1, 2, 2]
    assert cand.build_tree(list(ids), list(probs), 1) == cand.Tree([7], [-1], 0)
    assert cand.build_tree([[5], [6], [8]], [[0.9], [0.8], [0.7]], 8) == cand.Tree([5, 6, 8], [-1, 0, 1], 2)
    assert cand.is_chain(cand.chain_parents(4)) and not cand.is_chain(tree.parents)


def test_accept_path_follows_greedy_ar_and_a_tie_goes_where_argmax_goes():
    tokens, parents = [7, 3, 4, 9, 4, 5], [-1, -1, 0, -1, 1, 0]
    logits = torch.full((7, 10), -1.0)
    logits[0, [3, 9]] = 2.0  # after the root, tokens 3 and 9 tie: both are children of the root
    logits[2, 4] = 1.0  # after node 1 (token 3): token 4, node 4
    logits[5, 2] = 1.0  # after node 4: token 2, which no node holds: the bonus token
    pred = logits.argmax(dim=-1).tolist()
    assert pred[0] == 3  # torch.argmax (and so greedy AR) takes the first of tied maxima
    path = cand.accept_path(parents, tokens, pred)
    assert path == [1, 4] and [tokens[v] for v in path] + [pred[path[-1] + 1]] == [3, 4, 2]
    assert cand.accept_path([-1], [9], pred) == []  # only the other tied token drafted: AR takes 3, not 9
    assert cand.ranks([3, 4, 2], [[7, 3, 9], [4, 5, 6]]) == [2, 1]


def test_decoder_verify_commits_the_ar_path_of_a_tree_and_keeps_its_entries(model, tok, mask_id):
    """A forced tie on the decoder's own `_verify`: the path AR takes is committed, its slots are kept,
    and the controller learns the ranks (AR's first token was the drafter's 2nd)."""
    s = Sampler(model, tok, mask_token_id=mask_id, k_max=4, forward_cost=[1.0])
    dec = s.decoder([req(PROMPTS[0], policy="verify")])
    row = dec.rows[0]
    row.feed, row.n_drafts, row.parents = [11, 7, 3, 4, 9, 4, 5], 6, [-1, -1, 0, -1, 1, 0]
    row.tops = [[7, 3, 9], [4, 5, 6]]
    lg = torch.full((7, len(tok)), -1.0)
    lg[0, [9, 3]] = 2.0
    lg[2, 4] = lg[5, 2] = 1.0
    tokens, kept = dec._verify(row, lg, [], 0)
    assert tokens == [3, 4, 2] and kept == [0, 2, 5]  # the root, node 1 (slot 2), node 4 (slot 5)
    assert row.feed == [2] and row.n_drafts == 0
    assert row.horizon.rank_hits[1][0] == 1.0 and row.horizon.rank_tries[2] == 1.0


def _two_stream(local, lens, f, anchors, span):
    """The training layout's span ids and anchors for a step of `f` clean tokens and mask spans."""
    s_id, anc = torch.full_like(local, PAD), local.clone()
    for b in range(local.shape[0]):
        s_id[b, : f[b]] = CLEAN
        for j, a in enumerate(anchors[b]):
            lo = f[b] + j * span[b]
            s_id[b, lo : lo + span[b]] = j
            anc[b, lo : lo + span[b]] = a
    return two_stream_mask(local, s_id, anc)[:, 0]


def test_ancestor_mask_is_the_two_stream_rule_for_chains_and_spans():
    rows = [([5, 6, 7, 8], [-1, 0], [1, 2, 3], 2), ([1, 2, 3], [], [2], 3), ([4], [], [0], 1)]
    ids, local, parent, lens = cand.step_layout(rows, 99)
    assert lens.tolist() == [10, 6, 2] and ids[0].tolist() == [5, 6, 7, 8] + [99] * 6
    assert local[0].tolist() == [0, 1, 2, 3, 2, 3, 3, 4, 4, 5]  # a span continues its anchor's position
    want = _two_stream(local, lens, [4, 3, 1], [r[2] for r in rows], [2, 3, 1])
    assert torch.equal(cand.ancestor_mask(parent), want)
    assert not cand.is_sequential(parent, lens)
    _, _, seq, seq_lens = cand.step_layout([([1, 2, 3], [], [2], 2), ([4], [], [0], 0)], 99)
    assert cand.is_sequential(seq, seq_lens)


def test_tree_nodes_see_the_prefix_and_their_ancestors_at_position_root_plus_depth():
    tree = cand.Tree([7, 3, 4, 9, 4, 5], [-1, -1, 0, -1, 1, 0], 2)
    ids, local, parent, _ = cand.step_layout([([10, 11, *tree.tokens], tree.parents, [4], 2)], 99)
    assert local[0].tolist() == [0, 1, 2, 2, 3, 2, 3, 3, 4, 5]
    m = cand.ancestor_mask(parent)[0]
    sees = {i: [j for j in range(10) if m[i, j]] for i in range(10)}
    assert sees[6] == [0, 1, 3, 6]  # node 4 (3, 4): the prefix, node 1, itself
    assert sees[8] == [0, 1, 2, 4, 8] and sees[9] == [0, 1, 2, 4, 8, 9]  # masks after the leaf (7, 4)


def test_expected_tree_sums_the_reach_of_a_best_first_tree():
    e, leaf = cand.expected_tree([[0.5, 0.25], [0.5, 0.25]], 4)
    assert e == [0.5, 0.75, 1.0, 1.125] and leaf == [0.5, 0.5, 0.25, 0.25]
    chain = [[a] for a in (0.9, 0.5, 0.5)]
    e, leaf = cand.expected_tree(chain, 5)
    assert e[2] == pytest.approx(0.9 + 0.45 + 0.225) and leaf[2] == pytest.approx(0.225) and e[4] == e[2]


# --- the cost model's tree rates ---

def test_without_rank_evidence_trees_are_chains_and_never_chosen():
    for cost in (FLAT, CPU):
        h_all, h_old = CostAwareHorizon(8, cost), CostAwareHorizon(8, cost, layouts=("chain", "spans"))
        for h in (h_all, h_old):
            h.update(5, 3)
        assert h_all.best() == h_old.best() and h_all.trees() is None
    only = CostAwareHorizon(8, FLAT, layouts=("candidates",))  # alone, a tree layout still runs chain-shaped trees
    both = CostAwareHorizon(8, FLAT, layouts=("spans+candidates",))
    assert only.rates(layout="candidates") == pytest.approx(only.rates(layout="chain"))
    assert both.rates(layout="spans+candidates") == pytest.approx(both.rates(layout="spans"))
    assert only.plan > 1 and only.plan_layout == "candidates" and only.plan_nodes == only.plan - 1


def test_rank_evidence_opens_the_candidate_tree():
    """Chain steps whose first draft fails while AR's token is the drafter's 2nd: the chain's acceptance
    falls, the 2nd rank's rises, and the controller plans candidate trees."""
    h = CostAwareHorizon(8, FLAT)
    for _ in range(30):
        h.update_ranks([2])
        h.update(4, 1)
    assert h.acceptance()[0] < 0.1 and h.rank_acceptance()[0][1] > 0.85
    assert h.plan > 1 and h.plan_layout in TREE_LAYOUTS and h.plan_nodes >= h.plan - 1
    k = h.choose()
    assert k == h.plan and h.candidates and h.nodes == h.plan_nodes and h.spans == (h.plan_layout != "candidates")


def test_a_depth_never_observed_has_no_rank_evidence():
    """Ranks 2…TOP_K are counted per depth and never inherited: a probe observes depth 1 only, and a tree
    priced on depth 1's rank-2 evidence at every depth drafted wide trees that a weak drafter then failed."""
    h = CostAwareHorizon(8, FLAT)
    for _ in range(5):
        h.update_ranks([2])
        h.update(2, 1)
    acc = h.rank_acceptance()
    assert acc[0][1] > 0.5  # depth 1: AR's token was the drafter's 2nd every time
    assert all(a == 0.0 for row in acc[1:] for a in row[1:])  # deeper: nothing seen, nothing assumed
    assert acc[1][0] == pytest.approx(acc[0][0])  # rank 1 still inherits (the chain's optimism is separate)
    h.update_ranks([2, 3])
    assert h.rank_acceptance()[1][2] > 0.0


def _best_first(acc, d, n):
    """(depth, rank, parent) of the n best-first nodes (reach = Π acc along the path), and reaches."""
    nodes, reach = [], []
    frontier = [(acc[0][r], (r,), -1) for r in range(len(acc[0]))]
    while frontier and len(nodes) < n:
        frontier.sort(key=lambda x: (-x[0], x[1]))
        p, path, parent = frontier.pop(0)
        nodes.append((len(path), path[-1], parent))
        reach.append(p)
        if len(path) < d:
            frontier += [(p * acc[len(path)][r], (*path, r), len(nodes) - 1) for r in range(len(acc[0]))]
    return nodes, reach


@pytest.mark.parametrize("layout", TREE_LAYOUTS)
def test_tree_rate_model_matches_a_simulated_verify_loop(layout):
    """rate(K) of a tree layout = committed tokens per unit of cost of the verify pipeline with that tree:
    greedy AR's token at depth j is the drafter's rank r with probability a[j][r]; `candidates` has
    drafts ready only when the walk ends at the leaf its masks follow, `spans+candidates` always."""
    acc = [[0.55, 0.21, 0.09, 0.04], [0.5, 0.22, 0.08, 0.05], [0.45, 0.23, 0.11, 0.06], [0.4, 0.24, 0.12, 0.07]]
    cost = ForwardCost({1: 1.0, 4: 1.1, 16: 1.4, 64: 2.5}, masked=1.2)
    h = CostAwareHorizon(5, cost, prior_weight=1e9)
    h.rank_acceptance = lambda: acc
    rng = random.Random(0)
    for k in (2, 3, 5):
        rate, n = h._rates(1, layout)[k - 1]
        d = k - 1
        nodes, reach = _best_first(acc, d, n)
        leaf = max((i for i in range(n) if all(p != i for _, _, p in nodes)), key=lambda i: (reach[i], -i))
        child = {(p, rr): i for i, (_, rr, p) in enumerate(nodes)}
        tokens = spent = 0.0
        ready = False
        for _ in range(20_000):
            if not ready:  # a step that only drafts
                spent, tokens, ready = spent + cost(k), tokens + 1, True
                continue
            node = -1
            for depth in range(1, d + 1):
                u, rank = rng.random(), None
                for r, a in enumerate(acc[depth - 1]):
                    u -= a
                    if u < 0:
                        rank = r
                        break
                if (node, rank) not in child:
                    break
                node = child[node, rank]
            tokens += nodes[node][0] + 1 if node >= 0 else 1
            spans = layout == "spans+candidates"
            spent += cost.masked * cost(1 + n + ((n + 1) * d if spans else d))
            ready = spans or node == leaf
        assert rate == pytest.approx(tokens / spent, rel=0.02), (k, n)


# --- decoding with candidate trees on the tiny model ---

def _ranked_oracle(monkeypatch, refs, rank_of, probs=PROBS):
    """A drafter with AR's next tokens (the reference) at rank `rank_of(i)` (1…4, 0: absent) for
    generated index i, among wrong tokens, with probabilities `probs`; its chain drafts are its rank 1."""
    def candidates(self, row, masks, start):
        ref = refs[tuple(row.r.prompt_ids)]
        ids = []
        for j in range(masks.shape[0]):
            t = ref[start + j] if start + j < len(ref) else 7
            top = [(t + 1 + i) % 250 + 3 for i in range(4)]
            if rank_of(start + j):
                top[rank_of(start + j) - 1] = t
            ids.append(top)
        return ids, [list(probs) for _ in ids]

    monkeypatch.setattr(_Decoder, "_candidates", candidates)
    monkeypatch.setattr(_Decoder, "_propose", lambda self, row, masks, start: [
        top[0] for top in candidates(self, row, masks, start)[0]])


def _hf_greedy(model, tok, mask_id, prompt, n):
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         suppress_tokens=[mask_id, tok.pad_token_id])
    return out[0, ids.shape[1]:].tolist()


def _mixed_ranks(i: int) -> int:
    return random.Random(i).choice([1, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("layout", TREE_LAYOUTS)
def test_candidate_trees_equal_hf_greedy_and_keep_the_cache_exact(model, tok, mask_id, monkeypatch, layout):
    """Forced tree steps (K = 4, 8 nodes) with AR's token at mixed ranks: every row's output is HF greedy's,
    alone, in a batch and with rows arriving and leaving (continuous batching), and after every step each
    row's cache holds exactly the entries AR builds on its committed tokens."""
    n = 30
    refs = {tuple(tok(p)["input_ids"]): _hf_greedy(model, tok, mask_id, p, n) for p in PROMPTS}
    _ranked_oracle(monkeypatch, refs, _mixed_ranks)
    monkeypatch.setattr(CostAwareHorizon, "best", lambda self, floor=1: (4, layout, 8))
    s = Sampler(model, tok, mask_token_id=mask_id, k_max=6, forward_cost=[1.0], verify_layouts=(layout,))
    s.compact_min = 2
    want = list(refs.values())
    dec, branched = s.decoder([req(PROMPTS[0], policy="verify", max_tokens=n)]), 0
    while not dec.done:
        dec.step()
        if not dec.done:
            _check_cache(dec, model)
            branched += not cand.is_chain(dec.rows[0].parents)
    assert dec.rows[0].generated == want[0] and branched > 3
    assert dec.rows[0].stats.tokens_per_forward > 1.5
    assert [r.token_ids for r in s.generate([req(p, policy="verify", max_tokens=n) for p in PROMPTS])] == want
    reqs = [req(PROMPTS[0], policy="verify", max_tokens=n), req(PROMPTS[1], policy="fixed", gamma=0.0, max_horizon=3),
            req(PROMPTS[2], policy="ar", max_tokens=12), req(PROMPTS[3], policy="verify", max_tokens=n),
            req(PROMPTS[1], policy="verify", max_tokens=20)]
    single = [s.generate([r])[0].token_ids for r in reqs]
    arrive, rows, dec, step = {0: [0, 1], 2: [2, 3], 5: [4]}, {}, s.decoder([]), 0
    while step <= max(arrive) or not dec.done:
        for i in arrive.get(step, []):
            [rows[i]] = dec.add([s.resolve(reqs[i])])
        dec.step()
        _check_cache(dec, model)
        step += 1
    assert [rows[i].generated for i in range(len(reqs))] == single
    assert single[3] == want[3] and single[4] == want[1][:20]


def test_a_drafter_right_at_rank_2_pays_with_candidates_not_with_the_chain(model, tok, mask_id, monkeypatch):
    """AR's next token is always the drafter's 2nd choice: every chain draft fails, while the controller
    learns the ranks, plans candidate trees, and commits several tokens per forward (lossless either way)."""
    n = 40
    refs = {tuple(tok(p)["input_ids"]): _hf_greedy(model, tok, mask_id, p, n) for p in PROMPTS[:2]}
    _ranked_oracle(monkeypatch, refs, lambda i: 2, CLOSE)
    tpf, layouts_used = {}, {}
    for layouts in (("chain",), LAYOUTS):
        s = Sampler(model, tok, mask_token_id=mask_id, k_max=8, forward_cost=[1.0], verify_layouts=layouts)
        dec = s.decoder([req(p, policy="verify", max_tokens=n) for p in PROMPTS[:2]])
        used = set()
        while not dec.done:
            used |= {(r.horizon.spans, r.horizon.candidates) for r in dec.active if r.horizon.plan > 1}
            dec.step()
        assert [r.generated for r in dec.rows] == list(refs.values())
        tpf[layouts] = sum(r.stats.tokens for r in dec.rows) / sum(r.stats.forwards for r in dec.rows)
        layouts_used[layouts] = used
    assert tpf[("chain",)] < 1.1 and tpf[LAYOUTS] > 2.0, tpf
    assert any(c for _, c in layouts_used[LAYOUTS]), layouts_used
    print(f"tokens per forward, drafter right at rank 2: chain {tpf[('chain',)]:.2f}, all layouts {tpf[LAYOUTS]:.2f}")

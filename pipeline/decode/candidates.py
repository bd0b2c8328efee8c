"""Candidate trees of greedy `verify` (docs/method.md §8): the tree, its step input and mask, the walk.

Plain torch, no Ray; small pure functions, so each is unit-testable on made-up numbers.

A span of D masks after the last committed token (the *root*) gives, at each depth j = 1…D, a
distribution q_j over the token at that depth (a mask sees the committed prefix only, so q_j does not
depend on the drafts before it). `build_tree` takes the TOP_K most likely tokens of each q_j and keeps
the n prefixes of highest joint probability Π q_j(t_j) (best-first; equal probabilities are ordered by
token ids), a prefix-closed tree listed in best-first order: a parent precedes its children. Its most
likely leaf is where the `candidates` layout anchors the next drafts' masks.

Every step input is described by parent pointers (`step_layout`): each clean token is the parent of
the next, draft node i has its tree parent (the root for depth 1), and in a span of masks the first
mask's parent is the token it is anchored at, each next mask's parent the previous mask. A position is
the parent's + 1 (a node's is the root's + its depth), and a query sees the cache entries its row
holds and its ancestors only (`ancestor_mask`) — for clean tokens and mask spans exactly the
two-stream rule of training (attention.two_stream_mask); for a tree, each node sees the committed
prefix and its own path, so one forward gives the exact AR output at every node. A chain is the tree
whose node i has parent i − 1 (`chain_parents`).

`accept_path` walks from the root: the argmax of a node's logits (greedy AR's token, ties broken as
torch.argmax breaks them) selects the child holding that token, if any (siblings hold distinct
tokens, so at most one does). The argmax at the last accepted node is the bonus token, as in the
chain. Only the accepted path's cache entries stay (decoder: kvcache.keep_step_entries).

`expected_tree` is the cost model's side: the same best-first tree built on the controller's
acceptance estimates a[j][r] (the chance that greedy AR's token at depth j is the drafter's rank-r
token, once depth j − 1 was reached) instead of q, and the expected accepted tokens and chance of
reaching its most likely leaf for each size n.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import torch

TOP_K = 4  # candidates per depth: the drafter's top-4 tokens at each mask
MAX_NODES = 16  # the static cap on a candidate tree's size


class Tree(NamedTuple):
    tokens: list[int]  # node tokens, best-first (a parent before its children)
    parents: list[int]  # each node's parent: a node index, or −1 for the root
    leaf: int  # the most likely leaf (the first leaf in best-first order)


def chain_parents(n: int) -> list[int]:
    """Parent pointers of a chain of n drafts (node i follows node i − 1; node 0 the root)."""
    return list(range(-1, n - 1))


def is_chain(parents: list[int]) -> bool:
    """Whether the drafts form one path (node i the child of node i − 1)."""
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (1 for a child of the root); parents precede their children."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def ranked(ids: list[int], probs: list[float]) -> tuple[list[int], list[float]]:
    """Candidates ordered by probability, equal probabilities by token id (argmax's tie rule)."""
    order = sorted(range(len(ids)), key=lambda i: (-probs[i], ids[i]))
    return [ids[i] for i in order], [probs[i] for i in order]


def top_candidates(masks: torch.Tensor, k: int = TOP_K) -> tuple[list[list[int]], list[list[float]]]:
    """Per mask output (logits [D, V], banned tokens at −inf): its top-k tokens and softmax probabilities,
    each list ranked (`ranked`)."""
    p, i = torch.softmax(masks.float(), dim=-1).topk(min(k, masks.shape[-1]), dim=-1)
    pairs = [ranked(a, b) for a, b in zip(i.tolist(), p.tolist(), strict=True)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def build_tree(ids: list[list[int]], probs: list[list[float]], n: int) -> Tree:
    """The n most likely prefixes (joint probability, best-first) over per-depth candidates `ids`,
    `probs` (ranked: `top_candidates`). Ties: the smaller token ids along the path first."""
    tokens: list[int] = []
    parents: list[int] = []
    heap = [(-p, (t,), -1, 0) for t, p in zip(ids[0], probs[0], strict=True)] if ids else []
    heapq.heapify(heap)
    while heap and len(tokens) < n:
        neg, path, parent, depth = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(path[-1])
        parents.append(parent)
        if depth + 1 < len(ids):
            for t, p in zip(ids[depth + 1], probs[depth + 1], strict=True):
                heapq.heappush(heap, (neg * p, (*path, t), node, depth + 1))
    has_child = set(parents)
    leaf = next((i for i in range(len(tokens)) if i not in has_child), -1)
    return Tree(tokens, parents, leaf)


def accept_path(parents: list[int], tokens: list[int], pred: list[int]) -> list[int]:
    """The nodes greedy AR accepts, root first. `pred[0]`: AR's token after the root, `pred[1 + i]`:
    after node i (the argmax of its logits)."""
    children: dict[int, dict[int, int]] = {}
    for i, (p, t) in enumerate(zip(parents, tokens, strict=True)):
        children.setdefault(p, {})[t] = i
    path, node = [], -1
    while (nxt := children.get(node, {}).get(pred[node + 1])) is not None:
        path.append(nxt)
        node = nxt
    return path


def ranks(tokens: list[int], tops: list[list[int]]) -> list[int]:
    """Rank (1-based; 0 = not among the candidates) of greedy AR's token at each observed depth:
    `tokens` = the committed tokens of a verify step (the accepted drafts, then the bonus token),
    `tops[j]` = the drafter's ranked candidates at depth j + 1."""
    return [top.index(t) + 1 if t in top else 0 for t, top in zip(tokens, tops, strict=False)]


def step_layout(rows: list[tuple[list[int], list[int], list[int], int]], mask_id: int):
    """The step input of rows (feed, parents of its trailing draft nodes, anchors: feed indices, span
    length): (ids, position within the step, parent slot (−1: none) — each [B, W] — and lengths [B]).
    The clean feed comes first, then one span of masks per anchor; the rest of a row is padding."""
    lens = torch.tensor([len(feed) + len(anc) * span for feed, _, anc, span in rows])
    b_sz, width = len(rows), int(lens.max())
    ids = torch.full((b_sz, width), mask_id, dtype=torch.long)
    local = torch.arange(width).repeat(b_sz, 1)
    parent = torch.full((b_sz, width), -1, dtype=torch.long)
    for b, (feed, par, anc, span) in enumerate(rows):
        f, f0 = len(feed), len(feed) - len(par)
        ids[b, :f] = torch.tensor(feed)
        parent[b, 1:f0] = torch.arange(f0 - 1)
        for i, (p, d) in enumerate(zip(par, depths(par), strict=True)):
            parent[b, f0 + i] = f0 - 1 if p < 0 else f0 + p
            local[b, f0 + i] = f0 - 1 + d
        for j, a in enumerate(anc if span else []):
            lo = f + j * span
            parent[b, lo] = a
            parent[b, lo + 1 : lo + span] = torch.arange(lo, lo + span - 1)
            local[b, lo : lo + span] = local[b, a] + torch.arange(1, span + 1)
    return ids, local, parent, lens


def is_sequential(parent: torch.Tensor, lens: torch.Tensor) -> bool:
    """Whether every row's step is one causal sequence (each slot's parent the slot before)."""
    width = parent.shape[1]
    ok = (parent[:, 1:] == torch.arange(width - 1)) | (torch.arange(1, width) >= lens[:, None])
    return bool(ok.all())


def ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """Boolean [B, W, W]: query i may see key j iff j is i or an ancestor of i (pointer doubling:
    log2(W) gathers, on the parent tensor's device)."""
    b_sz, width = parent.shape
    idx = torch.arange(width, device=parent.device)
    jump = torch.where(parent < 0, idx, parent)  # a root points at itself
    seen = (idx[:, None] == idx[None, :]).expand(b_sz, -1, -1).clone()
    for _ in range(math.ceil(math.log2(width)) if width > 1 else 0):
        seen |= seen.gather(1, jump[:, :, None].expand(-1, -1, width))
        jump = jump.gather(1, jump)
    return seen


def expected_tree(accept: list[list[float]], n_max: int = MAX_NODES) -> tuple[list[float], list[float]]:
    """(E, L) for trees of n = 1…n_max nodes built best-first on the estimates `accept[j][r]` (depth
    j + 1, rank r + 1): E[n − 1] = expected accepted drafts (the sum over nodes of the chance to reach
    the node, Π a along its path), L[n − 1] = the chance to reach its most likely leaf. Fewer nodes
    than n_max only when the depths run out (then the last values repeat)."""
    acc = [sorted(row, reverse=True) for row in accept]  # a node's children, likeliest first
    heap = [(-acc[0][0], 0, -1, 0, 0, 1.0)] if acc else []  # (−reach, order, parent, depth, rank, parent's reach)
    pushed, reach, childless = 1, [], []
    first_leaf, total = 0, 0.0
    e_out, l_out = [], []
    while heap and len(reach) < n_max:
        neg, _, parent, depth, rank, above = heapq.heappop(heap)
        node = len(reach)
        reach.append(-neg)
        childless.append(True)
        if parent >= 0:
            childless[parent] = False
        total -= neg
        while not childless[first_leaf]:  # reach never grows along a path: the first leaf is the likeliest
            first_leaf += 1
        e_out.append(total)
        l_out.append(reach[first_leaf])
        if rank + 1 < len(acc[depth]):  # siblings enter one at a time, in order
            heapq.heappush(heap, (-above * acc[depth][rank + 1], pushed, parent, depth, rank + 1, above))
            pushed += 1
        if depth + 1 < len(acc):
            heapq.heappush(heap, (neg * acc[depth + 1][0], pushed, node, depth + 1, 0, -neg))
            pushed += 1
    while e_out and len(e_out) < n_max:
        e_out.append(e_out[-1])
        l_out.append(l_out[-1])
    return e_out, l_out

"""Elastic-horizon sampler on a tiny random Llama (its mask token is untrained: drafts are noise)."""

import json
import random

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from pipeline.decode import kvcache
from pipeline.decode.detok import TextDeltas
from pipeline.decode.horizon_head import HorizonHead
from pipeline.decode.load import load_sampler
from pipeline.decode.policies import ElasticHorizon, speculative_accept
from pipeline.decode.sampler import GenerationRequest, Sampler, _Decoder
from pipeline.errors import FluidError
from tests.decode.conftest import TEXT

PROMPTS = ["The quick brown", "Café", "日本語の", "Zwölf Boxkämpfer jagen Viktor quer über den"]
CPU_COST = {1: 1.0, 2: 1.6, 4: 1.45, 8: 1.6, 16: 1.93, 32: 2.5}  # pinned: verify's horizons do not follow timing


@pytest.fixture
def sampler(model, tok, mask_id):
    torch.manual_seed(1)
    head = HorizonHead(model.config.hidden_size, 8)
    return Sampler(model, tok, mask_token_id=mask_id, k_max=8, horizon_head=head, forward_cost=CPU_COST)


def req(prompt, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("stop_on_eos", False)
    return GenerationRequest(prompt=prompt, **kw)


def ar_tokens(sampler, prompts, n=24):
    return [r.token_ids for r in sampler.generate([req(p, policy="ar", max_tokens=n) for p in prompts])]


def test_ar_equals_hf_generate(sampler, model, tok, mask_id):
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                            suppress_tokens=[mask_id, tok.pad_token_id])
        [res] = sampler.generate([req(prompt, policy="ar")])
        assert res.token_ids == hf[0, ids.shape[1]:].tolist()
        assert res.finish_reason == "length" and res.stats.forwards == 24 and res.stats.tokens == 24
        assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)


def test_verify_equals_ar_with_untrained_mask(sampler):
    ref = ar_tokens(sampler, PROMPTS)
    out = sampler.generate([req(p, policy="verify") for p in PROMPTS])
    assert [r.token_ids for r in out] == ref
    assert all(r.stats.forwards <= 24 for r in out)


def _oracle(monkeypatch, refs, error_rate, seed=0, by_position=False):
    """Make verify's drafts come from the AR reference with random errors (tests acceptance paths).
    `by_position`: whether a draft is wrong depends only on its position, not on the call order.
    The drafter has no other candidates (one token per position), so candidate trees stay closed."""
    rng = random.Random(seed)

    def wrong(pos):
        return random.Random(seed * 100003 + pos).random() < error_rate if by_position else rng.random() < error_rate

    def propose(self, row, masks, start):
        ref = refs[tuple(row.r.prompt_ids)]
        out = []
        for j in range(masks.shape[0]):
            t = ref[start + j] if start + j < len(ref) else 7
            out.append((t + 1) % 250 + 3 if wrong(start + j) else t)
        return out

    def candidates(self, row, masks, start):
        ref = refs[tuple(row.r.prompt_ids)]
        return [[ref[i] if i < len(ref) else 7] for i in range(start, start + masks.shape[0])], [[1.0]] * len(masks)

    monkeypatch.setattr(_Decoder, "_propose", propose)
    monkeypatch.setattr(_Decoder, "_candidates", candidates)


@pytest.mark.parametrize("error_rate", [0.0, 0.25])
def test_verify_accepts_correct_drafts_and_stays_lossless(sampler, tok, monkeypatch, error_rate):
    ref = ar_tokens(sampler, PROMPTS, n=40)
    _oracle(monkeypatch, {tuple(tok(p)["input_ids"]): r for p, r in zip(PROMPTS, ref, strict=True)}, error_rate)
    out = sampler.generate([req(p, policy="verify", max_tokens=40) for p in PROMPTS])
    assert [r.token_ids for r in out] == ref
    tpf = [r.stats.tokens_per_forward for r in out]
    assert min(tpf) > 3.0 if error_rate == 0 else sum(tpf) / len(tpf) > 1.5, tpf
    for r in out:
        assert sum(k * v for k, v in r.stats.accepted_hist.items()) == r.stats.tokens


def test_verify_horizon_opens_with_flat_forward_cost_and_waits_on_cpu(model, tok, mask_id, monkeypatch):
    """Drafts right 30 % of the time pay where widths are free, not at CPU costs; the output is AR's either way.
    The CPU case decodes one row at a time: in a batch the scheduler prices the step as rows × width tokens
    (scheduler.py), and a batch of 4 rows is already past this table's jump at width 2."""
    out = {}
    for name, cost in (("flat", [1.0]), ("cpu", CPU_COST)):
        s = Sampler(model, tok, mask_token_id=mask_id, k_max=8, forward_cost=cost)
        ref = ar_tokens(s, PROMPTS, n=60)
        _oracle(monkeypatch, {tuple(tok(p)["input_ids"]): r for p, r in zip(PROMPTS, ref, strict=True)}, 0.7)
        reqs = [req(p, policy="verify", max_tokens=60) for p in PROMPTS]
        res = s.generate(reqs) if name == "flat" else [s.generate([q])[0] for q in reqs]
        assert [r.token_ids for r in res] == ref, name
        out[name] = sum(r.stats.tokens for r in res) / sum(r.stats.forwards for r in res)
    assert out["flat"] > 1.3 and out["cpu"] < 1.1, out


def test_verify_spans_layout_drafts_after_every_verdict(model, tok, mask_id, monkeypatch):
    """Free widths: a span of masks at every pending token means a rejection costs no drafting step,
    so the same drafts commit more per forward than with the chain; output and cache stay exact."""
    tpf, layouts_seen = {}, {}
    for layouts in (("chain",), ("chain", "spans")):
        s = Sampler(model, tok, mask_token_id=mask_id, k_max=6, forward_cost=[1.0], verify_layouts=layouts)
        ref = ar_tokens(s, PROMPTS, n=50)
        _oracle(monkeypatch, {tuple(tok(p)["input_ids"]): r for p, r in zip(PROMPTS, ref, strict=True)}, 0.4,
                by_position=True)
        dec = s.decoder([req(p, policy="verify", max_tokens=50) for p in PROMPTS[:1]])
        widths = []
        while not dec.done:
            row = dec.active[0]
            k = dec._horizon(row)
            widths.append((len(row.feed), len(dec._anchors(row, k))))
            dec.step()
            if not dec.done:
                _check_cache(dec, model)
        [res] = [s.result(r) for r in dec.rows]
        assert res.token_ids == ref[0], layouts
        tpf[layouts] = res.stats.tokens_per_forward
        layouts_seen[layouts] = max(n for _, n in widths)
        out = s.generate([req(p, policy="verify", max_tokens=50) for p in PROMPTS])
        assert [r.token_ids for r in out] == ref, layouts
    assert layouts_seen[("chain",)] == 1 and layouts_seen[("chain", "spans")] > 2
    assert tpf[("chain", "spans")] > 1.15 * tpf[("chain",)], tpf
    with pytest.raises(FluidError, match="verify layouts must be"):
        Sampler(model, tok, mask_token_id=mask_id, verify_layouts=("star",))
    with pytest.raises(FluidError, match="renamed 'spans'"):
        Sampler(model, tok, mask_token_id=mask_id, verify_layouts=("tree",))


@pytest.mark.parametrize("policy,gamma", [("fixed", 1.5), ("threshold", 1.01), ("khead", 2.0), ("entropy", -1e-6)])
def test_gated_policies_reduce_to_ar(sampler, policy, gamma):
    ref = ar_tokens(sampler, PROMPTS)
    out = sampler.generate([req(p, policy=policy, gamma=gamma) for p in PROMPTS])
    assert [r.token_ids for r in out] == ref
    assert all(r.stats.tokens_per_forward == 1.0 for r in out)


def test_fixed_gamma0_commits_k_draft_argmaxes(sampler, model, tok, mask_id):
    k, n = 4, 16
    [res] = sampler.generate([req(PROMPTS[0], policy="fixed", gamma=0.0, max_horizon=k, max_tokens=n)])
    assert res.stats.forwards == n // k and res.stats.accepted_hist == {k: n // k}
    seq = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        for step in range(n // k):
            x = torch.tensor([seq + [mask_id] * (k - 1)])
            logits = model(input_ids=x).logits[0, -k:]
            logits[:, [mask_id, tok.pad_token_id]] = float("-inf")
            want = logits.argmax(-1).tolist()
            assert res.token_ids[step * k:(step + 1) * k] == want
            seq = seq + want


def _count_compactions(monkeypatch):
    calls = []
    real = kvcache.compact_rows
    monkeypatch.setattr(kvcache, "compact_rows", lambda c, v: calls.append(v.shape) or real(c, v))
    return calls


def test_batched_equals_unbatched(sampler, tok, monkeypatch):
    sampler.compact_min = 1  # compact often, to exercise it
    calls = _count_compactions(monkeypatch)
    policies = ["ar", "fixed", "entropy", "threshold", "verify", "khead", "verify", "fixed"]
    reqs = [req(PROMPTS[i % 4], policy=pol, gamma=0.0 if pol in ("fixed", "threshold") else None,
                max_horizon=2 + i % 3, max_tokens=10 + 3 * i, temperature=0.8 if i == 6 else 0.0, seed=i)
            for i, pol in enumerate(policies)]
    reqs.append(req(PROMPTS[1], policy="entropy", gamma=20.0, max_tokens=17, top_p=0.9, temperature=1.0, seed=3))
    single = [sampler.generate([r])[0] for r in reqs]
    n_single = len(calls)
    batched = sampler.generate(reqs)
    assert len(calls) > n_single
    for r, a, b in zip(reqs, single, batched, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        if not (r.policy == "verify" and r.temperature == 0):  # priced at the batch's width (cost_model.py)
            assert a.stats.forwards == b.stats.forwards


@pytest.mark.parametrize("flat", [False, True], ids=["cpu-cost", "flat-cost-spans"])
def test_staggered_arrivals_equal_unbatched(sampler, model, tok, monkeypatch, flat):
    """Continuous batching: rows join a running decoder between steps (their prompts prefilled apart,
    then joined to the cache) and leave when done; every row gets exactly its unbatched output (with
    free widths greedy verify steps use the spans layout: rows with several mask spans in one batch)."""
    if flat:
        sampler = Sampler(model, tok, mask_token_id=sampler.mask_token_id, k_max=8,
                          horizon_head=sampler.horizon_head, forward_cost=[1.0])
    sampler.compact_min = 2
    ref = ar_tokens(sampler, PROMPTS, n=40)
    _oracle(monkeypatch, {tuple(tok(p)["input_ids"]): r for p, r in zip(PROMPTS, ref, strict=True)}, 0.25,
            by_position=True)
    reqs = [req(PROMPTS[0], policy="verify", max_tokens=30), req(PROMPTS[1], policy="fixed", gamma=0.0, max_horizon=3),
            req(PROMPTS[3], policy="entropy", gamma=9.0, max_tokens=15), req(PROMPTS[2], policy="ar", max_tokens=12),
            req(PROMPTS[1], policy="verify", max_tokens=8), req(PROMPTS[2], policy="verify", max_tokens=40)]
    single = [sampler.generate([r])[0] for r in reqs]
    arrive = {0: [0], 2: [1, 2], 3: [3], 9: [4, 5]}  # step -> requests arriving before it
    dec = sampler.decoder([])
    rows, step, joined, spans = {}, 0, [], []
    while step <= max(arrive) or not dec.done:
        for i in arrive.get(step, []):
            [rows[i]] = dec.add([sampler.resolve(reqs[i])])
        joined.append(len(dec.active))
        spans.append(max(len(dec._anchors(r, dec._horizon(r))) for r in dec.active))
        dec.step()
        _check_cache(dec, model)
        step += 1
    assert max(joined) >= 4  # rows really were decoded together
    assert max(spans) > 1 or not flat  # with free widths, batches held rows with several mask spans
    for i, want in enumerate(single):
        got = sampler.result(rows[i])
        assert (got.token_ids, got.finish_reason, got.text) == (want.token_ids, want.finish_reason, want.text), i
        if reqs[i].policy != "verify":  # greedy verify prices its horizon at the batch's width (cost_model.py)
            assert got.stats.forwards == want.stats.forwards


def _check_cache(dec, model):
    for b, row in enumerate(dec.active):
        seq = (row.r.prompt_ids + row.generated)[: row.pos]
        fresh = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]), cache=fresh, use_cache=True)
        assert int(dec.valid[b].sum()) == row.pos
        for la, lf in zip(dec.cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(la.keys[b][:, dec.valid[b]], lf.keys[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(la.values[b][:, dec.valid[b]], lf.values[0], atol=1e-5, rtol=0)


def test_kv_cache_is_exact(sampler, model, tok, monkeypatch):
    ref = ar_tokens(sampler, PROMPTS, n=30)
    _oracle(monkeypatch, {tuple(tok(p)["input_ids"]): r for p, r in zip(PROMPTS, ref, strict=True)}, 0.3)
    sampler.compact_min = 4
    calls = _count_compactions(monkeypatch)
    reqs = [req(PROMPTS[0], policy="verify", max_tokens=30), req(PROMPTS[1], policy="fixed", gamma=0.0, max_horizon=3),
            req(PROMPTS[3], policy="entropy", gamma=9.0, max_tokens=15), req(PROMPTS[2], policy="ar", max_tokens=12)]
    dec = sampler.decoder(reqs)
    while not dec.done:
        dec.step()
        _check_cache(dec, model)
    assert dec.rows[0].generated == ref[0] and calls


@pytest.mark.parametrize("policy", ["entropy", "verify"])
def test_elastic_policies_fall_back_to_ar(sampler, tok, monkeypatch, policy):
    """Drafts that always fail cost a few probes only (entropy: untrained mask; verify: wrong drafts)."""
    ref = ar_tokens(sampler, PROMPTS[:1], n=150)
    _oracle(monkeypatch, {tuple(tok(PROMPTS[0])["input_ids"]): ref[0]}, error_rate=1.0)
    [res] = sampler.generate([req(PROMPTS[0], policy=policy, max_tokens=150)])
    # entropy's drafts (untrained mask) never pass the gate, verify's are all wrong: every forward
    # commits exactly its one AR token, so both outputs are the greedy AR output
    assert res.token_ids == ref[0]
    assert res.stats.accepted_hist == {1: 150}, res.stats
    # verify: the prior's first (spans) horizon, then a few one-mask probes
    assert res.stats.forwards == 150 and res.stats.mask_tokens <= 16, res.stats


def test_max_tokens_eos_and_stop_trimming(sampler, tok):
    k = 4
    [full] = sampler.generate([req(PROMPTS[0], policy="fixed", gamma=0.0, max_horizon=k, max_tokens=24)])
    [short] = sampler.generate([req(PROMPTS[0], policy="fixed", gamma=0.0, max_horizon=k, max_tokens=10)])
    assert short.token_ids == full.token_ids[:10] and short.finish_reason == "length"
    assert short.stats.forwards == 3  # 4 + 4 + 2: the last horizon is clamped to what is left
    # EOS inside a multi-token commit: pretend a mid-commit token is EOS.
    seq = full.token_ids
    j = next(i for i in range(5, 24) if i % k and seq[i] not in seq[:i])
    sampler.eos_ids = frozenset({seq[j]})
    [eos] = sampler.generate([req(PROMPTS[0], policy="fixed", gamma=0.0, max_horizon=k, stop_on_eos=True)])
    assert eos.token_ids == seq[:j] and eos.finish_reason == "eos"
    # Stop string completed inside a commit: text cut before it, tokens up to the one completing it.
    text = full.text
    a = next(i for i in range(3, len(text) - 3) if text.find(text[i:i + 2]) == i and "\ufffd" not in text[i:i + 2])
    stop = text[a:a + 2]
    [st] = sampler.generate([req(PROMPTS[0], policy="fixed", gamma=0.0, max_horizon=k, stop=["zzzz", stop])])
    n = next(i for i in range(1, 25) if stop in sampler.decode(seq[:i]))
    assert st.finish_reason == "stop" and st.text == text[:a] and st.token_ids == seq[:n]
    # AR (one token per forward) stops the same way, at a stop string taken from its own greedy text
    [ar] = sampler.generate([req(PROMPTS[0], policy="ar", max_tokens=40)])
    a = next(i for i in range(3, len(ar.text) - 3)
             if ar.text.find(ar.text[i:i + 2]) == i and "\ufffd" not in ar.text[i:i + 2])
    stop = ar.text[a:a + 2]
    n = next(i for i in range(1, 41) if stop in sampler.decode(ar.token_ids[:i]))
    [st_ar] = sampler.generate([req(PROMPTS[0], policy="ar", stop=[stop], max_tokens=40)])
    assert (st_ar.finish_reason, st_ar.text, st_ar.token_ids) == ("stop", ar.text[:a], ar.token_ids[:n])
    assert st_ar.stats.forwards == n


@pytest.mark.parametrize("policy", ["ar", "verify", "fixed"])
def test_stream_deltas_concatenate(sampler, policy):
    for prompt in PROMPTS:
        base = dict(policy=policy, gamma=0.0 if policy == "fixed" else None, max_horizon=3, max_tokens=30)
        [full] = sampler.generate([req(prompt, **base)])
        stop = [full.text[len(full.text) // 2:][:2]] if len(full.text) > 6 else []
        for stops in ([], stop):
            [want] = sampler.generate([req(prompt, stop=stops, **base)])
            chunks = list(sampler.stream(req(prompt, stop=stops, **base)))
            assert "".join(c.text for c in chunks) == want.text
            assert sum((c.token_ids for c in chunks), []) == want.token_ids
            assert chunks[-1].finish_reason == want.finish_reason and chunks[-1].result.text == want.text
            assert all(c.finish_reason is None for c in chunks[:-1])


def test_text_deltas_hold_back_partial_stops():
    deltas = TextDeltas(["END", "zz"])
    got = [deltas.push("ab"), deltas.push("cE"), deltas.push("N"), deltas.push("x z"), deltas.push("")]
    assert got == ["ab", "c", "", "ENx ", ""] and deltas.pending == "z"
    assert deltas.finish("abcENx zq") == "zq" and deltas.finish("other") == ""


def test_incremental_text_utf8_stops_and_window_fallback(tok):
    """DecodeStream (fast tokenizer) and the window fallback both rebuild the full decode, hold back a
    broken UTF-8 character, and find a stop string that spans tokens."""
    from pipeline.decode.detok import IncrementalText

    ids = tok(TEXT[:300])["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)

    class Slow:  # no `_tokenizer`: exercises the window fallback
        decode = staticmethod(tok.decode)

    for t in (tok, Slow()):
        inc = IncrementalText(t, ["Boxkämpfer"])
        chunks = [inc.push(i) for i in ids]
        assert "".join(chunks) == inc.text and full.startswith(inc.text)
        assert all("\ufffd" not in c for c in chunks)
        assert inc.stop_at == full.find("Boxkämpfer")
        assert "" in chunks  # a token that ends inside a multi-byte character adds no text yet


def test_streaming_a_long_output_is_linear(sampler, monkeypatch):
    """Streaming with stop strings does O(1) decoding work per token: each committed id goes through the
    incremental detokenizer once, and the full decode runs once, at the end (re-decoding the whole
    output at every step, as before, fed n²/2 ids to the tokenizer)."""
    from pipeline.decode.detok import IncrementalText

    decoded, pushed = [], [0]
    real_decode, real_push = sampler.decode, IncrementalText.push
    monkeypatch.setattr(sampler, "decode", lambda ids: decoded.append(len(ids)) or real_decode(ids))
    monkeypatch.setattr(IncrementalText, "push", lambda self, t: pushed.__setitem__(0, pushed[0] + 1)
                        or real_push(self, t))
    n = 200
    chunks = list(sampler.stream(req(PROMPTS[0], policy="ar", max_tokens=n, stop=["zzqq", "never"])))
    assert len(chunks) == n and chunks[-1].finish_reason == "length"
    assert pushed[0] == n  # one detokenizer step per token
    assert decoded == [n]  # one full decode (the final text)
    assert "".join(c.text for c in chunks) == real_decode(chunks[-1].result.token_ids)


def test_invalid_arguments(sampler, model, tok, mask_id):
    bad = [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(policy="nope"), dict(max_tokens=0),
           dict(max_horizon=0), dict(stop=[""])]
    for kw in bad:
        with pytest.raises(ValueError):
            sampler.generate([req(PROMPTS[0], **kw)])
    for r in (GenerationRequest(prompt=""), GenerationRequest(prompt_ids=[]), GenerationRequest(),
              GenerationRequest(prompt_ids=[5] * 256), GenerationRequest(prompt="a", prompt_ids=[5])):
        with pytest.raises(FluidError):
            sampler.generate([r])
    with pytest.raises(ValueError):
        Sampler(model, tok, mask_token_id=mask_id, k_max=0)
    with pytest.raises(ValueError):
        Sampler(model, tok, mask_token_id=10_000)
    with pytest.raises(FluidError, match="horizon head"):
        Sampler(model, tok, mask_token_id=mask_id).generate([req("x", policy="khead")])


def test_banned_tokens_never_produced(sampler, mask_id, tok):
    out = sampler.generate([req(p, policy=pol, gamma=0.0, temperature=t, seed=5, max_tokens=40)
                            for p in PROMPTS for pol in ("fixed", "verify") for t in (0.0, 2.0)])
    for r in out:
        assert mask_id not in r.token_ids and tok.pad_token_id not in r.token_ids


def _sampled_reference(model, tok, mask_id, prompt, n, temperature, seed):
    """Ancestral sampling in a plain loop: a full forward per token, no cache, [M]/pad banned,
    one draw per token from softmax(logits / T) with a CPU generator seeded `seed`."""
    gen = torch.Generator().manual_seed(seed)
    seq = tok(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            logits[[mask_id, tok.pad_token_id]] = float("-inf")
            probs = torch.softmax(logits / temperature, dim=-1)
            seq = seq + [int(torch.multinomial(probs[None], 1, generator=gen)[0, 0])]
    return seq[len(tok(prompt)["input_ids"]):]


def test_sampling_is_seeded_and_matches_a_plain_sampling_loop(sampler, model, tok, mask_id):
    def run(policy, seed, temperature=0.9, **kw):
        return sampler.generate([req(PROMPTS[0], policy=policy, temperature=temperature, seed=seed,
                                     max_tokens=30, **kw)])[0]

    # sampled AR is the plain sampling loop, token for token (same seed -> same draws)
    want = _sampled_reference(model, tok, mask_id, PROMPTS[0], 30, 0.9, seed=12)
    assert run("ar", 12).token_ids == want
    # verify with no drafts (max_horizon 1) draws exactly as AR does
    assert run("verify", 12, max_horizon=1).token_ids == want
    # sampled verify with drafts: reproducible, seed-dependent, its first token is AR's first draw,
    # and its drafts were really proposed and judged
    a, b, other = run("verify", 11), run("verify", 11), run("verify", 13)
    assert a.token_ids == b.token_ids and a.token_ids != other.token_ids
    assert a.token_ids[0] == _sampled_reference(model, tok, mask_id, PROMPTS[0], 1, 0.9, seed=11)[0]
    assert a.stats.tokens == 30 and sum(k * v for k, v in a.stats.accepted_hist.items()) == 30
    assert a.stats.mask_tokens > 0 and a.stats.forwards == sum(a.stats.accepted_hist.values())
    # near T = 0 the sampling path (drafts from q, speculative acceptance, residual resampling)
    # must reduce to greedy AR: a wrong draft is rejected and replaced by the AR argmax
    cold = run("verify", 11, temperature=1e-4)
    assert cold.token_ids == ar_tokens(sampler, PROMPTS[:1], n=30)[0]
    assert cold.stats.mask_tokens > 0


def test_speculative_accept_is_distributed_as_p():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    counts = torch.zeros(5)
    for d in drafts:
        counts[speculative_accept(p, q, d, gen)[1]] += 1
    assert (counts / n - p).abs().max() < 0.015


def test_elastic_horizon_backs_off_and_grows():
    h = ElasticHorizon(16)
    ks = []
    for _ in range(400):  # drafts always fail
        ks.append(h.k)
        h.update(h.k, 1)
    probes = [i for i, k in enumerate(ks) if k > 1]
    assert len(probes) <= 8
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert all(g >= 8 for g in gaps) and gaps == sorted(gaps)  # exponential back-off, no 1 <-> 2 flip-flop
    h = ElasticHorizon(16)
    for _ in range(5):  # drafts always succeed
        h.update(h.k, h.k)
    assert h.k == 16
    h.update(16, 5)
    assert h.k == 10  # halfway towards the accepted length
    for _ in range(4):
        h.update(h.k, 1)
    assert h.k == 1


def test_from_export_and_head_roundtrip(tmp_path, model, tok, mask_id):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    head = HorizonHead(model.config.hidden_size, 8)
    head.save(tmp_path / "horizon_head.safetensors")
    (tmp_path / "fluid.json").write_text(json.dumps(  # a complete export record (pipeline/train/export.py)
        {"format_version": 1, "mask_token": "[M]", "mask_token_id": mask_id, "k_max": 8,
         "policy_defaults": {"policy": "khead", "gamma": 2.0, "max_horizon": 4},
         "base_model": {"spec": "tiny", "sha256": None}, "data_config": {}, "train_config": {}}))
    s = load_sampler(tmp_path)
    loaded = s.horizon_head
    h = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(loaded(h), head(h))
    [res] = s.generate([GenerationRequest(prompt=PROMPTS[0], max_tokens=12, stop_on_eos=False)])
    assert res.stats.policy == "khead" and res.stats.tokens_per_forward == 1.0
    ref = Sampler(model, tok, mask_token_id=mask_id).generate([req(PROMPTS[0], policy="ar", max_tokens=12)])[0]
    assert res.token_ids == ref.token_ids
    with pytest.raises(FluidError):
        load_sampler(tmp_path / "missing")


def test_eager_attention_batched(model, tok, mask_id):
    """The explicit 4-D mask also works for attention implementations that add it to the scores."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg._attn_implementation = "eager"
    eager = LlamaForCausalLM(cfg).eval()
    eager.load_state_dict(model.state_dict())
    s_eager = Sampler(eager, tok, mask_token_id=mask_id, k_max=4)
    s_sdpa = Sampler(model, tok, mask_token_id=mask_id, k_max=4)
    assert s_eager.attn_impl == "eager"
    reqs = [req(p, policy=pol, gamma=0.0) for p in PROMPTS for pol in ("ar", "fixed")]
    a = [r.token_ids for r in s_eager.generate(reqs)]
    assert a == [s_eager.generate([r])[0].token_ids for r in reqs]
    assert a == [r.token_ids for r in s_sdpa.generate(reqs)]


def test_sliding_window_models_are_refused(tok, mask_id):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    s = Sampler(MistralForCausalLM(cfg).eval(), tok, mask_token_id=mask_id)
    with pytest.raises(FluidError, match="cropped exactly"):
        s.generate([req(PROMPTS[0])])


class _DigitTokenizer:
    """Stand-in tokenizer for a 6-token vocabulary (+ [M] = 6)."""

    eos_token_id = None
    pad_token_id = None

    def __call__(self, text):
        return {"input_ids": [int(c) for c in text]}

    def decode(self, ids, **kw):
        return "".join(str(i) for i in ids)


@pytest.mark.parametrize("temperature,top_p", [(5e-324, 1.0), (1.0, 5e-324), (1e-300, 1e-300), (1e-45, 0.5)])
def test_sampling_probs_at_tiny_temperature_or_top_p_is_the_argmax(temperature, top_p):
    """Values a request may send that underflow in float32 give the limit (the most likely token), not NaN
    (found by tests/serve/test_fuzz.py: a 500 'probability tensor contains either inf, nan or element < 0')."""
    from pipeline.decode.policies import sample, sampling_probs

    logits = torch.tensor([[0.5, 3.0, float("-inf"), -2.0], [1.0, 0.0, 0.2, 4.0]])
    probs = sampling_probs(logits, temperature, top_p)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 4).float())
    assert sample(probs, torch.Generator().manual_seed(0)).tolist() == [1, 3]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_verify_sampling_is_lossless_end_to_end(temperature, top_p):
    """Speculative-sampling verify draws the 2nd and 3rd tokens from the exact AR marginals."""
    from pipeline.decode.policies import sampling_probs

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=7, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    s = Sampler(model, _DigitTokenizer(), mask_token_id=6, k_max=4)
    prompt, n = [1, 2, 3], 1500

    def dist(prefix):
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([prefix])).logits[0, -1]
        lg[6] = float("-inf")
        return sampling_probs(lg[None], temperature, top_p)[0]

    p1 = dist(prompt)
    p12 = torch.stack([p1[a] * dist(prompt + [a]) for a in range(6)])  # [t1, t2]
    p3 = sum(p12[a, b] * dist(prompt + [a, b]) for a in range(6) for b in range(6))
    reqs = [GenerationRequest(prompt_ids=prompt, policy="verify", max_tokens=3, temperature=temperature, top_p=top_p,
                              seed=i, stop_on_eos=False) for i in range(n)]
    out = s.generate(reqs)
    assert sum(r.stats.tokens_per_forward > 1 for r in out) > n // 10  # drafts were accepted
    toks = torch.tensor([r.token_ids for r in out])
    for col, want in ((1, p12.sum(0)), (2, p3[:6])):
        got = torch.bincount(toks[:, col], minlength=6).float() / n
        assert (got - want[:6]).abs().max() < 0.05, (col, got, want)  # ~4 sigma


def test_rows_finished_by_the_caller_are_dropped(sampler):
    """A serving loop may cancel a row between steps; the others continue unchanged."""
    reqs = [req(p, policy="verify", max_tokens=20) for p in PROMPTS[:3]]
    want = [r.token_ids for r in sampler.generate([reqs[0], reqs[2]])]
    dec = sampler.decoder(reqs)
    dec.step()
    dec.rows[1].finish = "cancelled"
    n = len(dec.rows[1].generated)
    while not dec.done:
        dec.step()
    assert [dec.rows[0].generated, dec.rows[2].generated] == want
    assert dec.rows[1].finish == "cancelled" and len(dec.rows[1].generated) == n


def test_khead_falls_back_to_ar_when_its_drafts_keep_failing(model, tok, mask_id):
    head = HorizonHead(model.config.hidden_size, 8)
    with torch.no_grad():
        head.fc2.bias.fill_(-10.0)
        head.fc2.bias[-1] = 10.0  # always proposes K = 8
    s = Sampler(model, tok, mask_token_id=mask_id, k_max=8, horizon_head=head)
    # gamma > 1 rejects every draft: without the guard each forward would carry 7 masks
    [res] = s.generate([req(PROMPTS[0], policy="khead", gamma=2.0, max_tokens=64)])
    assert res.token_ids == ar_tokens(s, PROMPTS[:1], n=64)[0]
    assert res.stats.mask_tokens / res.stats.tokens < 0.5, res.stats
    [ok] = s.generate([req(PROMPTS[0], policy="khead", gamma=0.0, max_tokens=64)])  # drafts pay: K = 8 stays
    assert ok.stats.tokens_per_forward > 4

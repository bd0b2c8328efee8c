"""Which forward committed each token (`GenerationStats.step_of_token`), its picture (pipeline/decode/show.py)
and `fluid generate --show`."""

from collections import Counter

import pytest

from pipeline.decode.show import render, step_chunks, use_colour
from tests.decode import test_sampler as base
from tests.decode.test_sampler import PROMPTS, _oracle, ar_tokens, req

sampler = base.sampler  # its fixture (tok, model and mask_id come from tests/decode/conftest.py)


def check_steps(result) -> None:
    st = result.stats
    steps = st.step_of_token
    assert len(steps) == len(result.token_ids) == st.tokens  # every token has its forward
    assert steps == sorted(steps) and (not steps or 0 <= steps[0] and steps[-1] < st.forwards)
    # the prefill forward commits the first token itself: only forwards that committed nothing (an EOS
    # straight away) are missing
    assert len(set(steps)) == st.forwards - st.accepted_hist.get(0, 0)
    assert Counter(Counter(steps).values()) == Counter({k: v for k, v in st.accepted_hist.items() if k})


@pytest.mark.parametrize("policy", ["ar", "fixed", "verify", "entropy"])
def test_step_of_token_covers_every_token_in_order(sampler, tok, monkeypatch, policy):
    ref = ar_tokens(sampler, PROMPTS, n=30)
    _oracle(monkeypatch, {tuple(tok(p)["input_ids"]): r for p, r in zip(PROMPTS, ref, strict=True)}, 0.25,
            by_position=True)
    kw = dict(policy=policy, max_horizon=4, max_tokens=30, gamma=0.0 if policy == "fixed" else None)
    batched = sampler.generate([req(p, **kw) for p in PROMPTS])
    for p, r in zip(PROMPTS, batched, strict=True):
        check_steps(r)  # a row's own forwards (batching may change its horizons, not this)
        [alone] = sampler.generate([req(p, **kw)])
        check_steps(alone)
        chunks = list(sampler.stream(req(p, **kw)))
        assert [c.step for c in chunks] == list(range(len(chunks)))
        assert sum(([c.step] * len(c.token_ids) for c in chunks), []) == alone.stats.step_of_token
    if policy == "verify":
        assert any(len(set(r.stats.step_of_token)) < r.stats.tokens for r in batched)  # some forwards took several


def test_a_forward_that_commits_nothing_has_no_step(sampler):
    [full] = sampler.generate([req(PROMPTS[0], policy="ar", max_tokens=12)])
    sampler.eos_ids = frozenset({full.token_ids[5]})
    [eos] = sampler.generate([req(PROMPTS[0], policy="ar", max_tokens=12, stop_on_eos=True)])
    n = full.token_ids.index(full.token_ids[5])
    assert eos.finish_reason == "eos" and eos.stats.accepted_hist.get(0) == 1
    assert eos.stats.step_of_token == list(range(n)) and eos.stats.forwards == n + 1
    check_steps(eos)


def test_step_chunks_concatenate_to_the_text(sampler):
    for policy in ("fixed", "verify"):
        for p in PROMPTS:  # UTF-8 characters split across forwards, and a stop string
            [full] = sampler.generate([req(p, policy=policy, gamma=0.0, max_horizon=4)])
            chunks = step_chunks(sampler.decode, full.token_ids, full.stats.step_of_token, full.text)
            assert "".join(t for _, t in chunks) == full.text
            assert [s for s, _ in chunks] == sorted({s for s, _ in chunks})
            stop = full.text[len(full.text) // 2:][:2]
            [cut] = sampler.generate([req(p, policy=policy, gamma=0.0, max_horizon=4, stop=[stop])])
            chunks = step_chunks(sampler.decode, cut.token_ids, cut.stats.step_of_token, cut.text)
            assert "".join(t for _, t in chunks) == cut.text


def test_render_and_colour_choice(monkeypatch):
    chunks = [(0, "Hello"), (1, " wor"), (3, "ld")]
    assert render(chunks, colour=False) == "Hello| wor|ld"
    coloured = render(chunks, colour=True)
    assert coloured.count("\033[0m") == 3 and coloured.replace("\033[0m", "").count("\033[") == 3
    assert "Hello" in coloured and "|" not in coloured

    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Tty()) and not use_colour(object())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Tty())


def test_generate_show_without_a_terminal(tmp_path, capsys):
    from jobs.generate import main
    from tests.serve.test_openai_api import export_tiny

    export = export_tiny(tmp_path / "tiny")
    args = ["--model", str(export), "--prompt", "the quick brown", "--max-tokens", "16", "--policy", "fixed",
            "--gamma", "0", "--max-horizon", "3"]
    assert main(args) == 0
    plain = capsys.readouterr().out.splitlines()[1]
    assert main([*args, "--show"]) == 0  # capsys: stdout is no terminal
    shown = capsys.readouterr().out.splitlines()[1]
    assert "|" not in plain and "\033[" not in shown
    assert shown.count("|") >= 2 and shown.replace("|", "") == plain

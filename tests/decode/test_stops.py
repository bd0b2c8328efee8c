"""Stop strings: the incremental matcher does linear work, finds stops across chunk boundaries exactly as
the former window matcher did, and the limits (4 strings, 256 characters each) are enforced."""

import random

import pytest

from pipeline.decode.detok import IncrementalText, TextDeltas
from pipeline.decode.policies import GenerationRequest, InvalidRequest, resolve
from pipeline.decode.stops import MAX_STOP_CHARS, MAX_STOPS, StopScanner
from pipeline.errors import FluidError


class ChunkTokenizer:
    """Token id i decodes to VOCAB[i] (exercises IncrementalText's window fallback)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids, **_):
        return "".join(self.vocab[i] for i in ids)


def old_stop_at(stops, chunks):
    """The former matcher: search the last (longest stop − 1) characters + each new chunk, every step."""
    keep = max(len(s) for s in stops) - 1
    tail, length = "", 0
    for chunk in chunks:
        if not chunk:
            continue
        window = tail + chunk
        hits = [i for i in (window.find(s) for s in stops) if i >= 0]
        if hits:
            return length - len(tail) + min(hits)
        tail = window[-keep:] if keep else ""
        length += len(chunk)
    return None


def old_deltas(stops, chunks):
    pending, out = "", []
    for chunk in chunks:
        text = pending + chunk
        hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        out.append(text[: len(text) - hold])
        pending = text[len(text) - hold:]
    return out, pending


def random_case(rng):
    alphabet = "ab c"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(12)]
    ids = [rng.randrange(len(vocab)) for _ in range(rng.randint(1, 40))]
    return stops, vocab, ids


def test_same_stops_as_the_window_matcher_on_random_chunkings():
    rng = random.Random(0)
    found = 0
    for _ in range(3000):
        stops, vocab, ids = random_case(rng)
        inc = IncrementalText(ChunkTokenizer(vocab), stops)
        chunks = []
        for i in ids:
            chunks.append(inc.push(i))
            if inc.stop_at is not None:
                break
        want = old_stop_at(stops, [vocab[i] for i in ids])
        assert inc.stop_at == want, (stops, [vocab[i] for i in ids])
        found += want is not None
        text = [vocab[i] for i in ids]
        deltas = TextDeltas(stops)
        got = [deltas.push(c) for c in text]
        assert (got, deltas.pending) == old_deltas(stops, text), (stops, text)
    assert 500 < found < 2500  # both outcomes are well covered


def test_matching_work_is_linear_in_the_text():
    """Four stops at the maximum length that almost match everywhere (a worst case for a window search:
    (255 + chunk) characters per step): the automaton takes ≤ 2 steps per character."""
    stops = ["a" * (MAX_STOP_CHARS - 1) + x for x in "bcde"]
    text = ("a" * (MAX_STOP_CHARS - 2) + "x") * 100  # never a match
    inc = IncrementalText(ChunkTokenizer(list(text)), stops)
    for i in range(len(text)):  # one character per token: the window matcher scanned 256 per step
        inc.push(i)
    assert inc.stop_at is None and inc.scanner.steps <= 2 * len(text)
    scanner = StopScanner(stops)
    at = scanner.feed("a" * 1000 + stops[2] + "x" * 1000)
    assert at == 1000 and scanner.steps <= 2 * (2000 + MAX_STOP_CHARS)
    deltas = TextDeltas(stops)
    sent = "".join(deltas.push(text[i:i + 7]) for i in range(0, len(text), 7))
    assert sent + deltas.pending == text and len(deltas.pending) < MAX_STOP_CHARS
    assert deltas.scanner.steps <= 2 * len(text)


def test_stop_limits_at_the_sampler_level():
    def check(stop):
        resolve(GenerationRequest(prompt_ids=[1, 2], stop=stop), k_max=4, defaults={}, encode=None, context=None)

    check(["x"] * MAX_STOPS)
    check(["y" * MAX_STOP_CHARS])
    with pytest.raises(FluidError, match=f"at most {MAX_STOPS} stop strings"):
        check(["x"] * (MAX_STOPS + 1))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_STOP_CHARS} characters"):
        check(["y" * (MAX_STOP_CHARS + 1)])
    with pytest.raises(InvalidRequest, match="non-empty"):
        check([""])

"""Stop strings: their limits and an incremental matcher whose work is linear in the text (Aho–Corasick).

In:  a request's stop strings (at most `MAX_STOPS`, each at most `MAX_STOP_CHARS` characters), then the
     generated text in chunks of any size.
Out: `StopScanner.feed(chunk)` → where the earliest stop occurrence that ends inside `chunk` starts
     (relative to the chunk; negative when it began in earlier chunks), or None; `StopScanner.hold` →
     how many of the last characters could still begin a stop (the part a stream must hold back).

The limits are OpenAI's number (4) and a length bound of ours: 256 characters covers any delimiter
or closing tag, keeps the automaton of one request at ≤ 1024 states, and bounds how much text a stream
holds back (at most 255 characters). Every character moves the automaton by one goto transition and
on average at most one failure transition, so a generation of n characters costs ≤ 2n steps whatever
the stops are (`steps` counts them). Automata are shared between requests with the same stops.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

MAX_STOPS = 4
MAX_STOP_CHARS = 256


def stop_problem(stops) -> str | None:
    """What is wrong with `stops` (a list of strings), or None."""
    if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
        return "stop must be a non-empty string or a list of non-empty strings"
    if len(stops) > MAX_STOPS:
        return f"at most {MAX_STOPS} stop strings are supported, got {len(stops)}"
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        return f"each stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}"
    return None


class _Automaton:
    """The Aho–Corasick automaton of a set of stop strings (immutable once built)."""

    def __init__(self, stops: tuple[str, ...]):
        self.goto: list[dict[str, int]] = [{}]
        depth = [0]
        self.out = [0]  # length of the longest stop that ends at this state (0: none)
        for s in stops:
            st = 0
            for ch in s:
                if ch not in self.goto[st]:
                    self.goto.append({})
                    depth.append(depth[st] + 1)
                    self.out.append(0)
                    self.goto[st][ch] = len(self.goto) - 1
                st = self.goto[st][ch]
            self.out[st] = len(s)
        self.fail = [0] * len(self.goto)
        self.hold = [0] * len(self.goto)  # the longest proper stop prefix that is a suffix of this state
        queue = deque(self.goto[0].values())
        for st in queue:
            self.hold[st] = 1 if self.goto[st] else 0
        while queue:
            st = queue.popleft()
            for ch, nxt in self.goto[st].items():
                f = self.fail[st]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[nxt] = self.goto[f].get(ch, 0)
                self.out[nxt] = max(self.out[nxt], self.out[self.fail[nxt]])
                self.hold[nxt] = depth[nxt] if self.goto[nxt] else self.hold[self.fail[nxt]]
                queue.append(nxt)


@lru_cache(maxsize=256)
def _automaton(stops: tuple[str, ...]) -> _Automaton:
    return _Automaton(stops)


class StopScanner:
    """Feeds text through the automaton of `stops`, keeping its state between chunks."""

    def __init__(self, stops):
        self.auto = _automaton(tuple(stops))
        self.state = 0
        self.steps = 0  # transitions taken (goto + failure): ≤ 2 × characters fed

    def feed(self, chunk: str) -> int | None:
        a, st, steps, best = self.auto, self.state, self.steps, None
        goto, fail, out = a.goto, a.fail, a.out
        for i, ch in enumerate(chunk):
            while st and ch not in goto[st]:
                st = fail[st]
                steps += 1
            st = goto[st].get(ch, 0)
            steps += 1
            if out[st] and (best is None or i + 1 - out[st] < best):
                best = i + 1 - out[st]
        self.state, self.steps = st, steps
        return best

    @property
    def hold(self) -> int:
        return self.auto.hold[self.state]

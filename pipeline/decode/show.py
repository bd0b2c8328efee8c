"""A picture of the horizon: generated text cut into the chunks each forward committed. No Ray.

In:  a `GenerationResult` (its `stats.step_of_token`: per generated token, the forward that committed it)
     and the tokenizer's decode. Out: `step_chunks` → [(step, text)], the text each forward added;
     `render` → the chunks in alternating ANSI colours (a terminal) or separated by `|` (plain).
     `fluid generate --show` prints it; `fluid evaluate` draws it (pipeline/eval/report.py).
"""

from __future__ import annotations

from collections.abc import Callable

# foreground colours that read on dark and light terminals, alternated by step
COLOURS = ("\033[34m", "\033[33m", "\033[32m", "\033[35m", "\033[36m", "\033[31m")
RESET = "\033[0m"
SEPARATOR = "|"


def step_chunks(decode: Callable[[list[int]], str], token_ids: list[int], step_of_token: list[int],
                text: str | None = None) -> list[tuple[int, str]]:
    """(step, text added) per forward that committed tokens, from decoding each prefix. A character split
    across forwards goes with the later one; `text` (the result's text: a stop string cut off) bounds
    the chunks, which then concatenate to it."""
    if len(step_of_token) != len(token_ids):
        raise ValueError(f"{len(step_of_token)} step indices for {len(token_ids)} tokens")
    n = len(token_ids)
    ends = [j for j in range(1, n) if step_of_token[j] != step_of_token[j - 1]] + ([n] if n else [])
    out, prev, start = [], "", 0
    for end in ends:
        t = decode(token_ids[:end])
        if end < n and t.endswith("\ufffd"):
            continue  # an unfinished character: this forward's text is shown with the next one's
        if text is not None:
            t = text if end == n else t[: len(text)]
        if len(t) > len(prev):
            out.append((step_of_token[start], t[len(prev):]))
        prev, start = t, end
    return out


def render(chunks: list[tuple[int, str]], *, colour: bool) -> str:
    """Colour each forward's chunk (alternating by step), or separate the chunks with `|`."""
    if not colour:
        return SEPARATOR.join(t for _, t in chunks)
    return "".join(f"{COLOURS[i % len(COLOURS)]}{t}{RESET}" for i, (_, t) in enumerate(chunks))


def use_colour(stream) -> bool:
    """ANSI colours only on a terminal and when NO_COLOR (no-color.org) is unset or empty."""
    import os

    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")

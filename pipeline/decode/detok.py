"""Incremental detokenization and stop-string matching, O(1) amortized work per new token.

In:  token ids as a decoding row commits them (one at a time), the request's stop strings.
Out: `IncrementalText.push(id)` → the new text chunk (append-only; "" while a UTF-8 character is still
     incomplete) and whether a stop string now appears (`stop_at`, a character index in the text);
     `TextDeltas.push(chunk)` → the part of the stream that is safe to send (never the start of a
     possible stop string), `TextDeltas.finish(text)` → the rest of the final text.
     An optional `lock` is held around every tokenizer call (the serving engine shares the tokenizer
     with request handlers that encode on other threads; a fast tokenizer must not be used by two at once).

Fast tokenizers use the `tokenizers` library's `DecodeStream`; any other tokenizer re-decodes only a
short window of recent ids (prefix/read offsets, as vLLM does). Nothing re-decodes the whole output.
Stop strings are matched by an Aho–Corasick automaton fed each new chunk once (stops.py): linear in
the text, however long the generation or the stop strings.
"""

from __future__ import annotations

from contextlib import nullcontext

from pipeline.decode.stops import StopScanner

try:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers is a dependency of transformers
    Tokenizer = DecodeStream = None


class IncrementalText:
    """The decoded text of a growing id sequence, plus stop-string detection on its newest part."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = (), lock=None):
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast = backend if Tokenizer is not None and isinstance(backend, Tokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._fast is not None else None
        self._tok = tokenizer
        self._ids: list[int] = []  # window fallback only
        self._prefix = self._read = 0
        self._lock = lock if lock is not None else nullcontext()
        self.stops = list(stops)
        self.scanner = StopScanner(self.stops) if self.stops else None
        self._parts: list[str] = []
        self.length = 0
        self.stop_at: int | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        """Add one id; returns the new text (possibly ""). Sets `stop_at` when a stop string appears."""
        with self._lock:
            chunk = self._step(int(token_id))
        if not chunk:
            return ""
        if self.scanner is not None and self.stop_at is None:
            at = self.scanner.feed(chunk)
            if at is not None:
                self.stop_at = self.length + at
        self._parts.append(chunk)
        self.length += len(chunk)
        return chunk

    def _step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._fast, token_id) or ""
        ids = self._ids
        ids.append(token_id)
        prev = self._decode(ids[self._prefix : self._read])
        new = self._decode(ids[self._prefix :])
        if len(new) > len(prev) and not new.endswith("\ufffd"):  # U+FFFD: an incomplete character
            self._prefix, self._read = self._read, len(ids)
            return new[len(prev) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextDeltas:
    """Stream text: hold back any suffix that could be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.scanner = StopScanner(stops) if stops else None
        self.pending = ""  # received, not yet sent (at most the longest stop − 1 characters)
        self.sent: list[str] = []
        self.sent_len = 0

    def push(self, chunk: str) -> str:
        text = self.pending + chunk
        if self.scanner is None:
            return self._send(text)
        self.scanner.feed(chunk)
        hold = min(self.scanner.hold, len(text))
        out, self.pending = text[: len(text) - hold], text[len(text) - hold :]
        return self._send(out)

    def finish(self, final: str) -> str:
        """The rest of the final text (cut at a stop). If the streamed text was not a prefix of it
        (a tokenizer whose incremental and full decodes differ), nothing more is sent."""
        if len(final) <= self.sent_len or final[: self.sent_len] != "".join(self.sent):
            return ""
        return self._send(final[self.sent_len :])

    def _send(self, out: str) -> str:
        if out:
            self.sent.append(out)
            self.sent_len += len(out)
        return out

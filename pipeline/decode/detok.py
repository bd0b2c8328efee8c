"""Incremental detokenization and stop-string matching, O(1) amortized work per new token.

In:  token ids as a decoding row commits them (one at a time), the request's stop strings.
Out: `IncrementalText.push(id)` → the new text chunk (append-only; "" while a UTF-8 character is still
     incomplete) and whether a stop string now appears (`stop_at`, a character index in the text);
     `TextDeltas.push(chunk)` → the part of the stream that is safe to send (never the start of a
     possible stop string), `TextDeltas.finish(text)` → the rest of the final text.

Fast tokenizers use the `tokenizers` library's `DecodeStream`; any other tokenizer re-decodes only a
short window of recent ids (prefix/read offsets, as vLLM does). Nothing re-decodes the whole output.
"""

from __future__ import annotations

try:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers is a dependency of transformers
    Tokenizer = DecodeStream = None


class IncrementalText:
    """The decoded text of a growing id sequence, plus stop-string detection on its newest part."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = ()):
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast = backend if Tokenizer is not None and isinstance(backend, Tokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._fast is not None else None
        self._tok = tokenizer
        self._ids: list[int] = []  # window fallback only
        self._prefix = self._read = 0
        self.stops = list(stops)
        self._keep = max((len(s) for s in self.stops), default=1) - 1  # chars a stop may reach back
        self._parts: list[str] = []
        self._tail = ""  # the last `_keep` characters (where a new stop can begin)
        self.length = 0
        self.stop_at: int | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        """Add one id; returns the new text (possibly ""). Sets `stop_at` when a stop string appears."""
        chunk = self._step(int(token_id))
        if not chunk:
            return ""
        if self.stops and self.stop_at is None:
            window = self._tail + chunk
            hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stop_at = self.length - len(self._tail) + min(hits)
            self._tail = window[-self._keep :] if self._keep else ""
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
        self.stops = list(stops)
        self.pending = ""  # received, not yet sent (at most the longest stop − 1 characters)
        self.sent: list[str] = []
        self.sent_len = 0

    def push(self, chunk: str) -> str:
        text = self.pending + chunk
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
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

"""Incremental detokenization and stop conditions for one sequence.

`Detokenizer.push(token)` returns the newly final text (held back while it could still be
the start of a stop string or an incomplete UTF-8 character) and whether a stop string was
hit; on a hit the text is cut before the stop string. Special tokens are not rendered.

Each push decodes a short window, not the whole output (the cost of a token stays flat as
outputs grow): the window starts `prefix_offset` tokens in, and the text of its first part
(ids[prefix_offset:read_offset], already rendered) is subtracted, so decoders that treat the
start of a string specially (a leading space) do so on both sides. Text is appended only when
the window no longer ends in an incomplete character; the offsets then move on.
"""

from __future__ import annotations


def _decoder(tokenizer):
    """ids -> text without special tokens. A fast tokenizer that does no clean-up of spaces and
    does not override decoding (Llama-family tokenizers; not Whisper, Marian, ...) is decoded by
    its Rust backend directly: the same text, without transformers' per-call Python checks over
    every id (they cost more than the decode once outputs grow)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cls = type(tokenizer)
    owner = next((c for c in cls.__mro__ if "backend_tokenizer" in vars(c)), None)
    plain = owner is not None and all(getattr(cls, f, None) is getattr(owner, f, None) for f in ("decode", "_decode"))
    if backend is not None and plain and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self._decode = _decoder(tokenizer)
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (cut at a stop string once hit)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False
        self.prefix_offset = 0  # window start: tokens before it are rendered and left behind
        self.read_offset = 0  # tokens before it are rendered into self.text
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])

    def push(self, token: int) -> str:
        self.ids.append(token)
        self._render(final=False)
        return self._take(final=self.stopped)

    def flush(self) -> str:
        """All text not yet emitted (at the end of the sequence), an incomplete character included."""
        if not self.stopped:
            self._render(final=True)
        return self._take(final=True)

    def _render(self, final: bool) -> None:
        window = self._decode(self.ids[self.prefix_offset:])
        if len(window) > len(self._prefix_text) and (final or not window.endswith("\ufffd")):
            before = len(self.text)
            self.text += window[len(self._prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self._find_stop(before)

    def _find_stop(self, new_from: int) -> None:
        for s in self.stop:
            at = self.text.find(s, max(0, min(self.emitted, new_from) - len(s)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text[end - k:end] == s[:k]:
                        end -= k
                        break
        end = max(end, self.emitted)
        chunk = self.text[self.emitted:end]
        self.emitted = end
        return chunk

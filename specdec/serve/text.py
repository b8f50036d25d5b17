"""Generated tokens to the text a client sees: incremental, with OpenAI's stop-string rule.

The engine stops on the token that completes a stop string (tokens stay whole, as in HF); OpenAI returns the text
*before* the stop string. So the text is cut at the first occurrence, and while streaming, text that could still
become the start of a stop string (or an incomplete UTF-8 character, decoded as U+FFFD) is held back until the next
tokens settle it. The streamed deltas always join to exactly the final text.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.tokens: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped_by_string = False

    def add(self, tokens: list[int]) -> str:
        """Append tokens; the new text that is settled now ("" when nothing is)."""
        self.tokens.extend(tokens)
        text, held = self._text()
        return self._advance(text[:len(text) - held] if held else text)

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        text, _ = self._text()
        return self._advance(text)

    @property
    def text(self) -> str:
        return self._text()[0]

    def _text(self) -> tuple[str, int]:
        """(text cut at the first stop string, how many trailing characters are not settled yet)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped_by_string = True
            return text[:min(cuts)], 0
        held = len(text) - len(text.rstrip("\ufffd"))  # an incomplete multi-byte character
        for s in self.stop:  # the longest tail that a stop string starts with
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return text, held

    def _advance(self, settled: str) -> str:
        delta = settled[len(self.sent):]  # prefix-stable decoding (every HF tokenizer here): only the new tail
        self.sent += delta
        return delta

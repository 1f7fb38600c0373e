"""Turn text and token ids, built the way LiveCC's reference loop builds them.

Turn 1 is the full chat template (system prompt + user message + generation prompt). Every
later turn cuts the system prompt off and starts with ``<|im_end|>\\n``: that closes the previous
assistant answer, whose last generated token (EOS or the capped token) never enters the context.
A user message is ``Time=a-b s`` + the video + the query, the query only when it changed.

Text from outside (the query, a viewer's question) is always plain text: a caller who writes
``<|im_end|>`` or ``<|video_pad|>`` gets those characters tokenized as ordinary text, never as the
model's control tokens (which would let them forge chat turns or break the video-token count).
"""

from __future__ import annotations

from dataclasses import dataclass

VIDEO_PAD = "<|video_pad|>"
IM_END = "<|im_end|>"
CALLER = "\ue000"  # a private-use character standing for caller text while the template is rendered


@dataclass(frozen=True)
class TurnTokens:
    ids: list[int]
    text: str  # with one <|video_pad|> per video item (before expansion)


class PromptBuilder:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.video_pad_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        probe = self._render([{"type": "text", "text": "livecc"}], generation_prompt=False)
        self.system_offset = probe.index("<|im_start|>user")
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.specials = sorted({str(getattr(t, "content", t)) for t in added.values()}
                               | set(getattr(tokenizer, "all_special_tokens", [])), key=len, reverse=True)
        self._plain: list[str] = []  # caller texts of the turn being built that contain control-token strings

    @staticmethod
    def check_text(text: str) -> str:
        """``text`` if it is valid Unicode (encodable as UTF-8), else ValueError (e.g. a lone surrogate)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode at character {e.start}") from None
        return text

    def plain(self, text: str) -> str:
        """Caller text as it goes into the template: as is, unless it contains a control-token string; then a
        placeholder that ``encode`` replaces with the text tokenized as plain text."""
        if any(s in text for s in self.specials) or CALLER in text:
            self._plain.append(text)
            return CALLER
        return text

    def _render(self, content: list[dict], generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def user_text(self, content: list[dict], first: bool) -> str:
        text = self._render(content)
        return text if first else IM_END + "\n" + text[self.system_offset:]

    def video_turn(self, start: float, stop: float, query: str | None, first: bool) -> str:
        content = [{"type": "text", "text": f"Time={start:.1f}-{stop:.1f}s"}, {"type": "video"}]
        if query:
            content.append({"type": "text", "text": self.plain(query)})
        return self.user_text(content, first)

    def question_turn(self, question: str, first: bool) -> str:
        return self.user_text([{"type": "text", "text": self.plain(question)}], first)

    def encode(self, text: str, video_tokens: list[int]) -> TurnTokens:
        """Token ids of ``text`` with its k-th ``<|video_pad|>`` expanded to ``video_tokens[k]`` pads."""
        parts = text.split(VIDEO_PAD)
        if len(parts) - 1 != len(video_tokens):
            raise ValueError(f"text has {len(parts) - 1} video items, {len(video_tokens)} clips given")
        plain, self._plain = self._plain, []
        ids: list[int] = []
        for k, part in enumerate(parts):
            pieces = part.split(CALLER)
            for j, piece in enumerate(pieces):
                if piece:
                    ids.extend(self.tok.encode(piece, add_special_tokens=False))
                if j < len(pieces) - 1:
                    ids.extend(self.tok(plain.pop(0), add_special_tokens=False, split_special_tokens=True).input_ids)
            if k < len(video_tokens):
                ids.extend([self.video_pad_id] * video_tokens[k])
        for caller in plain:  # (none left: each placeholder took its text)
            raise ValueError(f"caller text {caller[:40]!r} has no place in the turn")
        return TurnTokens(ids, text)

"""Turn text and token ids, built the way LiveCC's reference loop builds them.

Turn 1 is the full chat template (system prompt + user message + generation prompt). Every
later turn cuts the system prompt off and starts with ``<|im_end|>\\n``: that closes the previous
assistant answer, whose last generated token (EOS or the capped token) never enters the context.
A user message is ``Time=a-b s`` + the video + the query, the query only when it changed.
"""

from __future__ import annotations

from dataclasses import dataclass

VIDEO_PAD = "<|video_pad|>"
IM_END = "<|im_end|>"


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
        self._pad_ids: dict[int, list[int]] = {}

    def _render(self, content: list[dict], generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def user_text(self, content: list[dict], first: bool) -> str:
        text = self._render(content)
        return text if first else IM_END + "\n" + text[self.system_offset:]

    def video_turn(self, start: float, stop: float, query: str | None, first: bool) -> str:
        content = [{"type": "text", "text": f"Time={start:.1f}-{stop:.1f}s"}, {"type": "video"}]
        if query:
            content.append({"type": "text", "text": query})
        return self.user_text(content, first)

    def question_turn(self, question: str, first: bool) -> str:
        return self.user_text([{"type": "text", "text": question}], first)

    def encode(self, text: str, video_tokens: list[int]) -> TurnTokens:
        """Token ids of ``text`` with its k-th ``<|video_pad|>`` expanded to ``video_tokens[k]`` pads."""
        parts = text.split(VIDEO_PAD)
        if len(parts) - 1 != len(video_tokens):
            raise ValueError(f"text has {len(parts) - 1} video items, {len(video_tokens)} clips given")
        ids: list[int] = []
        for k, part in enumerate(parts):
            if part:
                ids.extend(self.tok.encode(part, add_special_tokens=False))
            if k < len(video_tokens):
                ids.extend([self.video_pad_id] * video_tokens[k])
        return TurnTokens(ids, text)

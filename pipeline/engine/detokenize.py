"""Caption text from generated token ids, never ending in half a character.

Qwen2's byte-level BPE can split one UTF-8 character (CJK, emoji) over two tokens. A caption cut by the
token cap between them would end in U+FFFD; streaming detokenizers hold such an incomplete tail back.
A LiveCC turn's tokens never continue in the next turn (the next prompt comes between), so the
incomplete tail is dropped, and so is any other byte sequence that is not valid UTF-8.
"""

from __future__ import annotations

from functools import lru_cache


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE (Qwen2's tokenizer among them)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def caption_text(tokenizer, ids: list[int]) -> str:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, without any replacement character (U+FFFD) that
    decoding an incomplete or invalid UTF-8 byte sequence produces."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        return text
    special = set(tokenizer.all_special_ids)
    table = _byte_decoder()
    data = bytearray()
    for tok in tokenizer.convert_ids_to_tokens([i for i in ids if i not in special]):
        if tok is None:
            continue
        if all(ch in table for ch in tok):
            data.extend(table[ch] for ch in tok)
        else:  # an added (non byte-level) token: its text as is
            data.extend(tok.encode("utf-8"))
    return data.decode("utf-8", errors="ignore")

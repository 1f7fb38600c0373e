"""CEA-608 closed captions carried in H.264 SEI (ATSC A/53 Part 4 "GA94" user data).

Three parts:

- ``encode_text``: caption text -> rows of 608 byte pairs (at most 32 columns a row). The code
  tables (basic, special and extended characters, preamble address codes, control codes) are
  pycaption's SCC tables (``pycaption.scc.constants``), whose hex words already carry the odd
  parity bit. A character outside the 608 set is mapped (``LATIN_FALLBACK`` for Latin letters
  and punctuation Unicode does not decompose, else its compatibility decomposition without
  accents) or dropped; an extended character is preceded by
  its basic substitute, as CEA-608 requires (a decoder that knows it backspaces over it).
- ``Cea608Track``: the caption channel CC1 (field 1) as a stream of byte pairs, one video frame at a
  time, at the 608 rate (about 30 pairs a second: ``30 / fps`` a frame, carried over). Roll-up
  (RU2-RU4, the default; the mode is sent when the track starts) begins each new caption with a
  carriage return on the frame it is due and writes its rows on the bottom row as they arrive
  (older rows scroll up; a caption with nothing 608 can write erases the screen instead); pop-on loads
  the next caption into the hidden buffer ahead of time and shows it with End Of Caption on the
  exact frame it becomes due. A new caption supersedes what is still unsent of the previous one
  (it starts on its frame instead of queueing behind it). Control codes are sent twice (the 608 redundancy rule); an expired
  caption is erased (EDM).
- ``sei_nal`` / ``insert_sei``: a cc_data() block in an SEI user_data_registered_itu_t_t35 message
  (country 0xB5, provider 0x0031, "GA94", type 0x03, per ATSC A/53 Part 4 Table 6.9 and CTA-708
  section 4.4), with emulation prevention, put into an H.264 access unit before its first slice.
  Annex B (start codes) and 4-byte length-prefixed access units are both handled.
"""

from __future__ import annotations

import collections
import unicodedata

from pycaption.scc import constants as scc

ROW_COLUMNS = 32  # CEA-608: 32 characters a caption row
BOTTOM_ROW = 15

RCL, EOC, EDM, ENM, CR = 0x9420, 0x942F, 0x942C, 0x94AE, 0x94AD
ROLL_UP = {2: 0x9425, 3: 0x9426, 4: 0x94A7}
PAIRS_PER_SECOND = 30.0  # field 1 carries one byte pair a frame at 29.97 Hz
PADDING = 0x8080  # two null characters with odd parity


def _pac(row: int) -> int:
    return int(scc.WRITER_PAC_CODES[(row, 0, "plain")], 16)


def _char_codes(ch: str) -> list[str] | None:
    """Hex codes for one character: ['61'] basic, ['91b0'] special, ['2a', '92a8'] extended
    after its basic substitute; None when 608 has no equivalent."""
    if ch in scc.CHARACTER_TO_CODE and ch not in ("", "\x00"):
        return [scc.CHARACTER_TO_CODE[ch]]
    code = scc.SPECIAL_OR_EXTENDED_CHAR_TO_CODE.get(ch)
    if code is not None:
        if code.startswith(("92", "13", "93", "12")):  # extended: overwrites the previous column
            sub = next((s for s in scc.SUBSTITUTE_CHARACTERS.get(ch, []) if s in scc.CHARACTER_TO_CODE), " ")
            return [scc.CHARACTER_TO_CODE[sub], code]
        return [code]
    return None


# Latin letters and punctuation that have no Unicode decomposition to a 608 character, with
# their usual ASCII spelling (the fallback for characters outside CEA-608's basic, special and
# extended sets; Cyrillic, Greek, CJK and emoji have none and are dropped).
LATIN_FALLBACK = {
    "Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Ð": "D", "ð": "d", "Þ": "Th", "þ": "th",
    "Œ": "OE", "œ": "oe", "Æ": "AE", "æ": "ae", "ı": "i", "Ħ": "H", "ħ": "h", "Ŧ": "T", "ŧ": "t",
    "Ŋ": "N", "ŋ": "n", "ĸ": "k", "ƒ": "f",
    "–": "-", "‐": "-", "‑": "-", "‒": "-", "−": "-", "―": "-", "„": '"', "‟": '"', "‚": "'",
    "‛": "'", "‹": "<", "›": ">", "′": "'", "″": '"', "×": "x", "·": ".", "€": "EUR",
}


def map_char(ch: str) -> list[list[str]]:
    """The 608 columns ``ch`` is written as, each its hex codes: itself (one column), else its
    ``LATIN_FALLBACK`` spelling or its accent-stripped compatibility decomposition (one column a
    character: '…' is three), else [] (dropped)."""
    codes = _char_codes(ch)
    if codes is not None:
        return [codes]
    if ch.isspace():
        return [[scc.CHARACTER_TO_CODE[" "]]]
    out: list[list[str]] = []
    for c in LATIN_FALLBACK.get(ch) or unicodedata.normalize("NFKD", ch):
        if unicodedata.combining(c):
            continue
        codes = _char_codes(c)
        if codes is None:
            return []
        out.append(codes)
    return out


def _layout(text: str) -> tuple[list[list[list[str]]], int]:
    """Caption text -> (its rows of columns, each column its list of hex codes; characters dropped). Words wrap at
    32 columns of what is written (longer words are cut)."""
    # composed first (NFC): 'e' + U+0301 is 'é', which 608 has; a combining mark alone is dropped
    text = unicodedata.normalize("NFC", text)
    dropped = 0
    rows: list[list[list[str]]] = []  # rows of columns; a column is its list of hex codes
    cur: list[list[str]] = []
    for word in text.split():
        cols = []
        for ch in word:
            columns = map_char(ch)
            if columns:
                cols += columns  # a row is 32 of what is written, not of the caption's characters
            else:
                dropped += 1
        if not cols:
            continue
        while len(cols) > ROW_COLUMNS:  # a word longer than a row
            if cur:
                rows.append(cur)
                cur = []
            rows.append(cols[:ROW_COLUMNS])
            cols = cols[ROW_COLUMNS:]
        need = len(cols) + (1 if cur else 0)
        if len(cur) + need > ROW_COLUMNS:
            rows.append(cur)
            cur = []
        if cur:
            cur.append([scc.CHARACTER_TO_CODE[" "]])
        cur += cols
    if cur:
        rows.append(cur)
    return rows, dropped


def encode_text(text: str, max_rows: int | None) -> tuple[list[list[int]], int]:
    """Caption text -> (the last ``max_rows`` rows (None: all) of byte pairs, characters dropped).

    Words wrap at 32 columns (longer words are cut). Each row is a list of 16-bit pairs:
    basic characters two to a pair (padded with 0x80), special/extended ones a pair each."""
    rows, dropped = _layout(text)
    return [_pairs(r) for r in (rows if max_rows is None else rows[-max_rows:])], dropped


def cut_columns(text: str, max_rows: int) -> int:
    """Columns (written characters and spaces) of ``text`` in the rows before its last ``max_rows``: what a pop-on
    caption of at most ``max_rows`` rows does not show."""
    rows, _ = _layout(text)
    return sum(len(r) for r in rows[:-max_rows]) if len(rows) > max_rows else 0


DER = 0x94A4  # Delete to End of Row (CEA-608 miscellaneous control code 0x14 0x24, CC1)
# Between two identical two-byte character codes. CEA-608 decoders ignore the second of two
# identical codes in a row (the control-code redundancy rule; FFmpeg's ccaption_dec, libcaption,
# iOS and VLC apply it to the special characters too), so "♪♪" showed one note. Delete to End of
# Row at the write position erases nothing (the rest of the row is empty: pop-on loads a cleared
# buffer, roll-up writes a fresh bottom row) and moves no cursor; it is a different code, so the
# repeat that follows is written. (Backspace would do, but FFmpeg's decoder ignores it.)
_SEPARATE = [DER, DER]


def _pairs(columns: list[list[str]]) -> list[int]:
    """One row's columns as byte pairs: basic characters two to a pair (padded with a null,
    0x80), special and extended characters (CEA-608 Special North American / Extended Western
    European sets, two-byte codes) a pair each; an identical two-byte code right after another
    gets a Delete to End of Row between them so the decoder does not drop it as a repeat."""
    pairs: list[int] = []
    pending: str | None = None  # a basic character waiting for its partner
    for codes in columns:
        for code in codes:
            if len(code) == 2:
                if pending is None:
                    pending = code
                else:
                    pairs.append(int(pending + code, 16))
                    pending = None
            else:
                if pending is not None:
                    pairs.append(int(pending + "80", 16))
                    pending = None
                if pairs and pairs[-1] == int(code, 16):
                    pairs += _SEPARATE
                pairs.append(int(code, 16))
    if pending is not None:
        pairs.append(int(pending + "80", 16))
    return pairs


def _control(code: int) -> list[int]:
    return [code, code]  # CEA-608: control codes are sent twice; decoders drop the repeat


class Cea608Track:
    """CC1 byte pairs for one output, frame by frame.

    ``mode``: "rollup" or "popon"; ``rows``: roll-up depth (2-4) or the most pop-on rows;
    ``fps``: output frame rate (pairs a frame = 30 / fps, the remainder carried over).
    Call ``prepare(text)`` when a caption is known ahead of its time (pop-on preloads it), then
    ``frame(active_text)`` once per output frame with the caption that should be on screen (None:
    nothing); it returns the byte pairs to carry in that frame (at least one: padding)."""

    def __init__(self, mode: str = "rollup", rows: int = 2, fps: float = 30.0) -> None:
        if mode not in ("rollup", "popon"):
            raise ValueError(f"cc mode must be rollup or popon, not {mode!r}")
        if not 2 <= rows <= 4:
            raise ValueError("cc rows must be 2, 3 or 4")
        self.mode, self.rows = mode, rows
        self.per_frame = PAIRS_PER_SECOND / fps
        self.slots = max(1, -(-int(PAIRS_PER_SECOND) // max(1, int(fps))))  # cc_count a frame
        self._credit = 0.0
        self._out: collections.deque[int] = collections.deque()  # ordered, sent first
        self._preload: collections.deque[int] = collections.deque()  # pop-on: hidden-buffer load
        self._prepared: collections.deque[str] = collections.deque()  # pop-on: texts known ahead
        self._loading: str | None = None  # pop-on: text in (or going into) the hidden buffer
        self.shown: str | None = None
        self.dropped = 0  # characters without a 608 equivalent
        if mode == "rollup":  # the mode first, so the first caption's CR lands on its frame
            self._out.extend(_control(ROLL_UP[rows]))

    def _load(self, text: str) -> list[int]:
        rows, dropped = encode_text(text, self.rows)
        self.dropped += dropped
        seq = _control(RCL) + _control(ENM)
        for i, row in enumerate(rows):
            seq += _control(_pac(BOTTOM_ROW - len(rows) + 1 + i)) + row
        return seq

    def _roll(self, text: str) -> list[int]:
        rows, dropped = encode_text(text, None)
        self.dropped += dropped
        seq: list[int] = []
        for row in rows:  # CR first: the caption starts on the frame it is due
            seq += _control(CR) + _control(_pac(BOTTOM_ROW)) + row
        return seq

    def prepare(self, text: str) -> None:
        """A caption that will be shown later (pop-on loads it while the current one shows)."""
        if self.mode == "popon" and text:
            self._prepared.append(text)

    def _next_preload(self) -> None:
        while self._prepared and self._prepared[0] == self.shown:
            self._prepared.popleft()
        if self._loading is None and self._prepared:
            self._loading = self._prepared.popleft()
            self._preload.extend(self._load(self._loading))

    def frame(self, active: str | None) -> list[int]:
        """Byte pairs for the next output frame, given the caption that is due on screen now."""
        if active != self.shown:
            # what is still unsent of the previous caption is superseded (the mode command stays)
            modes = [p for p in self._out if p in ROLL_UP.values()]
            self._out.clear()
            self._out.extend(modes)
            if not active:
                self._out.extend(_control(EDM))
            elif self.mode == "rollup":
                # nothing 608 can write (all of it Cyrillic, CJK ...): erase (EDM) rather than
                # leave the previous caption on screen as if it were this one
                self._out.extend(self._roll(active) or _control(EDM))
            else:
                if self._loading != active:  # not preloaded: load it now, show it when loaded
                    self._preload.clear()
                    self._out.extend(self._load(active))
                else:
                    self._out.extend(self._preload)
                    self._preload.clear()
                self._loading = None
                self._out.extend(_control(EOC))
                if active in self._prepared:  # it and any older ones (replaced unseen) are done
                    while self._prepared.popleft() != active:
                        pass
            self.shown = active or None
        if self.mode == "popon" and not self._out:
            self._next_preload()
        self._credit += self.per_frame
        pairs: list[int] = []
        while self._credit >= 1 and len(pairs) < self.slots:
            self._credit -= 1
            if self._out:
                pairs.append(self._out.popleft())
            elif self._preload:
                pairs.append(self._preload.popleft())
            else:
                pairs.append(PADDING)
        self._credit = min(self._credit, 1.0)
        return pairs or [PADDING]


def cc_data(pairs: list[int]) -> bytes:
    """CTA-708 cc_data() constructs for field-1 608 pairs: 0xFC (marker, cc_valid, type 0) + 2 bytes."""
    return b"".join(bytes((0xFC, p >> 8, p & 0xFF)) for p in pairs)


def _emulation_prevention(rbsp: bytes) -> bytes:
    out = bytearray()
    zeros = 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def sei_nal(pairs: list[int]) -> bytes:
    """An H.264 SEI NAL unit (no start code) with one A/53 GA94 cc_data message of ``pairs``."""
    cc = cc_data(pairs)
    payload = (bytes((0xB5, 0x00, 0x31)) + b"GA94" + bytes((0x03, 0x40 | len(pairs), 0xFF))
               + cc + b"\xff")  # itu_t_t35 header, user_data_type 3, flags|cc_count, em_data; marker
    msg = bytearray((4,))  # payloadType 4: user_data_registered_itu_t_t35
    size = len(payload)
    while size >= 255:
        msg.append(255)
        size -= 255
    msg.append(size)
    rbsp = bytes(msg) + payload + b"\x80"  # rbsp_trailing_bits
    return b"\x06" + _emulation_prevention(rbsp)


def _nal_units_annexb(data: bytes) -> list[tuple[int, int]]:
    """(start of the start code, start of the NAL) for each NAL unit of an Annex B access unit."""
    out = []
    i = 0
    n = len(data)
    while i + 3 <= n:
        if data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 1:
            sc = i - 1 if i > 0 and data[i - 1] == 0 else i
            out.append((sc, i + 3))
            i += 3
        else:
            i += 1
    return out


def insert_sei(au: bytes, nal: bytes) -> bytes:
    """The access unit ``au`` with the SEI NAL ``nal`` before its first slice (NAL type 1-5)."""
    if au[:3] == b"\x00\x00\x01" or au[:4] == b"\x00\x00\x00\x01":
        for sc, start in _nal_units_annexb(au):
            if 1 <= au[start] & 0x1F <= 5:
                return au[:sc] + b"\x00\x00\x00\x01" + nal + au[sc:]
        return au + b"\x00\x00\x00\x01" + nal
    i = 0  # 4-byte length prefixes (AVCC)
    while i + 5 <= len(au):
        size = int.from_bytes(au[i : i + 4], "big")
        if 1 <= au[i + 4] & 0x1F <= 5:
            break
        i += 4 + size
    return au[:i] + len(nal).to_bytes(4, "big") + nal + au[i:]

"""CEA-608 closed captions in the restream's H.264 SEI, read back with FFmpeg's closed-caption
decoder (``movie=OUT[out0+subcc]`` -> SRT) and compared with our SRT sink for the same captions."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import time

import av
import numpy as np
import pytest
import srt

from pipeline.plugins import make_sink
from pipeline.types import Caption, Frame
from plugins.sinks.burnin import Output, RestreamSettings, RestreamSink
from plugins.sinks.burnin.cea608 import EOC, Cea608Track, encode_text
from test_sink_burnin import NginxRtmp, free_port, needs_nginx

FPS = 30
FRAME = 1 / FPS
W, H = 160, 90
pytestmark = pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs the system ffmpeg")


def cc_cues(path) -> list[tuple[float, float, str]]:
    """(start, end, text) of the captions FFmpeg's CC decoder finds in ``path`` (tags removed)."""
    out = f"{path}.cc.srt"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"movie={path}[out0+subcc]",
                    "-map", "0:s", out], check=True, timeout=120)
    with open(out, encoding="utf-8") as f:
        subs = list(srt.parse(f.read()))
    clean = lambda t: " ".join(re.sub(r"<[^>]+>|\{[^}]+\}", " ", t).split())  # noqa: E731
    return [(s.start.total_seconds(), s.end.total_seconds(), clean(s.content)) for s in subs]


def odd_parity(b: int) -> bool:
    return bin(b).count("1") % 2 == 1


def test_608_byte_pairs_are_valid_and_unmappable_characters_dropped():
    rows, dropped = encode_text("Café “quoted” *star* naïve ½ 中文 😀 x_y {z}", None)
    pairs = [p for row in rows for p in row]
    assert dropped == 3  # 中, 文, 😀
    for p in pairs:
        hi, lo = p >> 8, p & 0xFF
        assert odd_parity(hi) and odd_parity(lo), hex(p)
        h7 = hi & 0x7F
        assert h7 >= 0x20 or 0x10 <= h7 <= 0x1F, hex(p)  # a character or a control/extended code
    assert all(len(r) <= 32 for r in rows)


def drive(path: str, captions, seconds: float, mode: str, fmt_opts: dict | None = None) -> None:
    """Encode ``seconds`` of frames straight into an Output with the 608 track (faster than real
    time); captions are (start, stop, text), prepared 2 s ahead like the sink with delay_s=2."""
    s = RestreamSettings(output=path, fps=FPS, codec="libx264", preset="ultrafast", gop_s=1, **(fmt_opts or {}))
    out = Output(s, W, H, "libx264")
    track = Cea608Track(mode, 3, FPS)
    vf = av.VideoFrame.from_ndarray(np.full((H, W, 3), 90, np.uint8), format="rgb24").reformat(format="yuv420p")
    prepared = set()
    for n in range(round(seconds * FPS)):
        t = n * FRAME
        for c in captions:
            if c[0] - 2 <= t and c not in prepared:
                prepared.add(c)
                track.prepare(c[2])
        active = next((c[2] for c in captions if c[0] <= t + 1e-6 < c[1]), None)
        out.write(vf, n, track.frame(active))
    out.close()


CAPS = [(1.0, 2.5, "Hello world, this is a test"), (3.0, 5.0, "Ça va? The striker scores — 2 goals!"),
        (5.0, 7.5, "A longer caption that needs two rows of the thirty-two columns")]


@pytest.mark.parametrize("mode", ["rollup", "popon"])
@pytest.mark.parametrize("name", ["out.mp4", "out.ts", "out.mkv", "hls/index.m3u8"])
def test_608_read_back_from_every_file_output(tmp_path, name, mode):
    path = tmp_path / name
    drive(str(path), CAPS, 8.5, mode, {"hls_time": 1.0, "hls_list_size": 0} if "hls" in name else None)
    cues = cc_cues(path)
    for start, stop, text in CAPS:
        at = [c for c in cues if start - FRAME - 1e-3 <= c[0] < stop]
        assert at and abs(at[0][0] - start) <= FRAME + 1e-3, (text, cues)
        words = text.replace("—", "-").split()  # the em dash is in 608's extended set
        assert at[-1][2].split()[-len(words):] == words, (text, at)
        if stop != 5.0:  # erased when it expires (5.0: replaced by the next)
            assert abs(at[-1][1] - stop) <= FRAME + 1e-3, (text, at)


# --- the restream sink, live, against our SRT sink ---------------------------------------------
def caption_script(seconds: float, seed: int = 7) -> list[Caption]:
    """Captions of 2.5 s with words, numbers and punctuation; some back to back, some with a
    2.5 s gap (the SRT sink ends a cue 2 s after its stop: the 608 caption must be erased then)."""
    rng = random.Random(seed)
    vocab = ("the keeper dives left and the ball goes in goal crowd cheers player runs pass shot wide "
             "corner kick header save referee whistle half time score").split()
    out, t = [], 1.0
    while t + 3 < seconds:
        n = rng.randint(3, 9)
        text = " ".join(rng.choice(vocab) for _ in range(n)).capitalize() + rng.choice([".", "!", "?", f" {rng.randint(1, 99)}."])
        dur = 2.5
        out.append(Caption(round(t, 3), round(t + dur, 3), text))
        t += dur + rng.choice([0.0, 2.5])
    return out


def run_restream(tmp_path, seconds: float, mode: str, outage_at: float):
    """RestreamSink (delay_s 2) to nginx-rtmp (recording), restarted at ``outage_at`` for 1.5 s;
    the same captions to an SRT sink. Returns (recordings, output start times, captions, srt path)."""
    ngx = NginxRtmp(tmp_path / "nginx", free_port())
    ngx.start()
    srt_path = tmp_path / "ours.srt"
    ours = make_sink(f"srt:{srt_path}")
    ours.start()
    # ttl = caption length 2.5 s + the SRT sink's linger_s 2 s: the same end as its cues
    sink = RestreamSink(output=f"rtmp://127.0.0.1:{ngx.port}/live/cc", fps=FPS, delay_s=2.0, ttl_s=4.5,
                        cc_mode=mode, cc_rows=3, codec="libx264", preset="ultrafast", bitrate="300k",
                        gop_s=1, audio=False, reconnect_initial_s=0.3, reconnect_max_s=1.0)
    captions = caption_script(seconds)
    img = np.full((H, W, 3), 90, np.uint8)
    sink.start()
    try:
        a = time.monotonic() + 0.2
        posted = 0
        restarted = False
        i = 0
        while i * FRAME < seconds + 2.5:
            now = time.monotonic()
            # frames delivered a little ahead, stamped with their ideal arrival (a steady source)
            while a + i * FRAME <= now + 0.1:
                sink.on_frame(Frame(img, i * FRAME, arrival=a + i * FRAME, index=i))
                i += 1
            # a caption arrives 0.3 s after its start, as the engine's (its clip must end first)
            while posted < len(captions) and a + captions[posted].start + 0.3 <= now:
                sink.on_caption(captions[posted])
                ours.on_caption(captions[posted])
                posted += 1
            if not restarted and now - a >= outage_at + 2.0:  # output time = stream time (delay 2 s)
                ngx.stop()
                time.sleep(1.5)
                ngx.start()
                restarted = True
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        sink.stop()
        ours.stop()
        ngx.stop()
    assert sink.error is None and sink.counters["reconnects"] >= 1, sink.counters
    assert sink.output_starts[0] == 0.0
    return ngx.recordings(), list(sink.output_starts), captions, srt_path


def compare(recordings, starts, captions, srt_path) -> int:
    """Every SRT-sink cue inside a recording is in the 608 captions: same words, same start and
    end (± one frame). Returns how many were compared."""
    with open(srt_path, encoding="utf-8") as f:
        ours = [(s.start.total_seconds(), s.end.total_seconds(), " ".join(s.content.split())) for s in srt.parse(f.read())]
    assert len(ours) == len(captions)
    assert len(recordings) >= 2, recordings
    # the recordings are the connections in order; each starts at its output_starts time
    compared = 0
    for rec, t_open in zip(recordings, starts[-len(recordings):]):
        with av.open(str(rec)) as c:  # where the recording really ends: its last video packet
            st = c.streams.video[0]
            dur = max(float(p.pts * st.time_base) for p in c.demux(st) if p.pts is not None)
        cues = [(s + t_open, e + t_open, txt) for s, e, txt in cc_cues(rec)]
        for start, stop, text in ours:
            # shown and ended while this connection was up (FFmpeg's decoder does not emit the
            # caption still on screen at the end of a file); in the first ~1.2 s of a connection
            # the caption on screen is sent again first
            if not (t_open + (1.2 if t_open else 0.3) <= start and stop <= t_open + dur - 0.2):
                continue
            # the next caption's cue may start one frame early (as this one's may: ± FRAME below)
            at = [c for c in cues if start - FRAME - 0.01 <= c[0] < stop - FRAME - 0.01]
            assert at and abs(at[0][0] - start) <= FRAME + 0.01, (start, text, cues)
            words = text.split()
            assert at[-1][2].split()[-len(words):] == words, (text, at)
            assert abs(at[-1][1] - stop) <= FRAME + 0.01, (stop, text, at)
            compared += 1
    return compared


@needs_nginx
@pytest.mark.slow  # ~30 s each
@pytest.mark.parametrize("mode", ["rollup", "popon"])
def test_restream_608_over_rtmp_matches_srt_sink_through_a_reconnect(tmp_path, mode):
    recs, starts, caps, srt_path = run_restream(tmp_path, 22.0, mode, outage_at=6.5)
    assert compare(recs, starts, caps, srt_path) >= 2


@needs_nginx
@pytest.mark.slow
def test_restream_608_two_minutes_matches_srt_sink(tmp_path):
    recs, starts, caps, srt_path = run_restream(tmp_path, 120.0, "rollup", outage_at=60.0)
    n = compare(recs, starts, caps, srt_path)
    print(f"608 vs SRT sink: {n} of {len(caps)} captions compared over {len(recs)} RTMP connections")
    assert n >= len(caps) - 4  # all but the ones around the outage


def test_popon_captions_replaced_before_they_showed_do_not_block_the_next():
    """Captions replaced in the sink before they reached a frame (several due on one tick) must
    not be preloaded in place of the next one that will show."""
    track = Cea608Track("popon", 2, FPS)
    for t in ("a", "b", "c", "d", "e"):
        track.prepare(t)
    for text in (None, "a", "d"):  # b and c never shown
        for _ in range(60):
            track.frame(text)
    assert track.frame("e") == [EOC]  # "e" was loaded ahead: it shows on its frame


@pytest.mark.parametrize("mode", ["rollup", "popon"])
def test_caption_without_608_characters_does_not_leave_the_previous_one_on_screen(tmp_path, mode):
    """A caption 608 cannot write at all (Russian, Chinese) replaced the previous one in the sink,
    but in roll-up nothing was sent for it: the previous caption stayed on the viewer's screen
    for the whole of the new one (FFmpeg read "Hello world" from 1.0 to 4.0 s). It must be erased
    on the frame the unwritable caption is due."""
    caps = [(1.0, 2.5, "Hello world"), (2.5, 4.0, "Привет мир 中文"), (4.0, 5.5, "Back again")]
    path = tmp_path / "out.ts"
    drive(str(path), caps, 6.5, mode)
    cues = cc_cues(path)
    hello = [c for c in cues if "Hello" in c[2]]
    assert hello and all(c[1] <= 2.5 + FRAME + 1e-3 for c in hello), cues
    back = [c for c in cues if c[2].endswith("Back again")]
    assert back and abs(back[0][0] - 4.0) <= FRAME + 1e-3, cues


@pytest.mark.parametrize("mode", ["rollup", "popon"])
def test_repeated_special_characters_are_all_shown(tmp_path, mode):
    """Special characters (CEA-608 "Special North American character set", 0x11 0x30-0x3F) are
    two-byte codes like control codes, and decoders ignore the second of two identical ones in
    a row (FFmpeg's ccaption_dec, libcaption, iOS, VLC): "♪♪" read back as "♪"."""
    caps = [(1.0, 3.5, "♪♪ la la ♪♪"), (4.0, 6.5, "½½ ®®®")]
    path = tmp_path / "out.ts"
    drive(str(path), caps, 7.5, mode)
    cues = cc_cues(path)
    for start, _, text in caps:
        at = [c for c in cues if abs(c[0] - start) <= FRAME + 1e-3]
        assert at and at[-1][2].endswith(text), (text, cues)


def test_decomposed_accents_keep_their_608_letter(tmp_path):
    """Text in Unicode decomposed form (NFD: 'e' + U+0301, as macOS and some tokenizers give it)
    lost the accent 608 has ('café' came out 'cafe', the accent counted as dropped): each
    combining mark was mapped alone instead of with its letter."""
    nfd = "cafe\u0301 man\u0303ana U\u0308ber"
    rows, dropped = encode_text(nfd, None)
    assert (rows, dropped) == encode_text("café mañana Über", None)
    path = tmp_path / "out.ts"
    drive(str(path), [(1.0, 3.0, nfd)], 4.0, "popon")
    assert [c[2] for c in cc_cues(path)] == ["café mañana Über"]


@pytest.mark.parametrize("mode", ["rollup", "popon"])
def test_rows_wrap_at_32_columns_of_what_is_written(tmp_path, mode):
    """A character written as several 608 characters ('…' -> '...', 'ﬁ' -> 'fi') counted as one
    column when rows were wrapped, so a row could hold more than 32 characters and the decoder
    dropped the rest (FFmpeg read 'fine fine ... fi' and 'stop…' as 'sto')."""
    text = "Wait… what… really… yes… no… ok… ﬁne"
    path = tmp_path / "out.ts"
    drive(str(path), [(3.0, 6.0, text)], 7.0, mode)
    cues = cc_cues(path)
    assert cues and cues[-1][2] == "Wait... what... really... yes... no... ok... fine", cues


def test_latin_letters_without_a_decomposition_get_their_nearest_608_letters(tmp_path):
    """Letters and punctuation that Unicode does not decompose (Polish ł, French œ, Danish æ,
    Icelandic ð/þ, the en dash, the euro sign) were dropped, not replaced by their nearest 608
    letters as the docs say: 'Łódź – œuvre' came out 'ódz  uvre'."""
    text = "Łódź – œuvre Æsir ðþ 5 €"
    rows, dropped = encode_text(text, None)
    assert dropped == 0
    path = tmp_path / "out.ts"
    drive(str(path), [(1.0, 4.0, text)], 5.0, "rollup")
    assert [c[2] for c in cc_cues(path)] == ["Lódz - oeuvre AEsir dth 5 EUR"]


@needs_nginx
def test_dropped_character_count_survives_a_reconnect(tmp_path):
    """``cc_dropped_chars`` was copied from the 608 track, which starts again at every output
    open: after an RTMP reconnect the count fell back (6 dropped before the outage, 3 after:
    reported 3, not 9). It counts each caption's dropped characters once, for the whole run."""
    ngx = NginxRtmp(tmp_path / "nginx", free_port())
    ngx.start()
    sink = RestreamSink(output=f"rtmp://127.0.0.1:{ngx.port}/live/cc", fps=FPS, ttl_s=1.0, cc_mode="rollup",
                        codec="libx264", preset="ultrafast", bitrate="300k", gop_s=1, audio=False,
                        reconnect_initial_s=0.3, reconnect_max_s=1.0)
    img = np.full((H, W, 3), 90, np.uint8)
    sink.start()
    try:
        a, i, step = time.monotonic(), 0, 0
        while True:
            now = time.monotonic() - a
            while i * FRAME <= now:
                sink.on_frame(Frame(img, i * FRAME, arrival=a + i * FRAME, index=i))
                i += 1
            if step == 0 and now >= 0.5:
                sink.on_caption(Caption(0.5, 1.0, "Привет"))  # 6 dropped
                step = 1
            elif step == 1 and now >= 2.0 and sink.counters.get("cc_dropped_chars") == 6:
                ngx.stop()
                time.sleep(1.0)
                ngx.start()
                step = 2
            elif step == 2 and sink.counters["opens"] >= 2 and sink.counters["frames_out"] > 0:
                sink.on_caption(Caption(now, now + 0.5, "мир ok"))  # 3 dropped
                step, t3 = 3, now
            elif step == 3 and now >= t3 + 1.0:
                break
            assert now < 20, (step, sink.counters)
            time.sleep(0.02)
    finally:
        sink.stop()
        ngx.stop()
    assert sink.counters["cc_dropped_chars"] == 9, sink.counters


def test_popon_rows_beyond_cc_rows_are_counted(tmp_path):
    """Pop-on shows a caption's last ``cc_rows`` rows; the rows before them were dropped with no trace (the count of
    what was not carried said 0). FFmpeg reads back the last rows only, and the sink counts what it cut
    (``cc_cut_chars``: the columns of the rows before, spaces included); roll-up scrolls every row through, cuts
    nothing."""
    from plugins.sinks.burnin.cea608 import cut_columns

    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    rows = [" ".join(text.split()[:6]), " ".join(text.split()[6:11]), " ".join(text.split()[11:])]
    assert [len(r) for r in rows] == [27, 27, 32] and len(encode_text(text, None)[0]) == 3  # 32-column rows
    assert cut_columns(text, 2) == 27 and cut_columns(text, 3) == 0 and cut_columns("", 2) == 0
    path = tmp_path / "out.ts"
    s = RestreamSettings(output=str(path), fps=FPS, codec="libx264", preset="ultrafast", gop_s=1)
    out = Output(s, W, H, "libx264")
    track = Cea608Track("popon", 2, FPS)
    vf = av.VideoFrame.from_ndarray(np.full((H, W, 3), 90, np.uint8), format="rgb24").reformat(format="yuv420p")
    for n in range(round(4.0 * FPS)):
        out.write(vf, n, track.frame(text if 1.0 <= n * FRAME < 3.0 else None))
    out.close()
    assert [c[2] for c in cc_cues(path)] == [" ".join(rows[1:])]
    for mode, cut in (("popon", 27), ("rollup", 0)):
        sink = RestreamSink(output=str(tmp_path / f"{mode}.ts"), fps=FPS, cc_mode=mode, cc_rows=2)
        sink.on_caption(Caption(0.5, 1.0, text))
        assert sink.counters["cc_cut_chars"] == cut and sink.counters["cc_dropped_chars"] == 0, sink.counters

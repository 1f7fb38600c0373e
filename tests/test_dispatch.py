"""The dispatcher: a raising sink and a hanging sink never stop the others."""

from __future__ import annotations

import threading
import time

import numpy as np

from pipeline.backoff import Backoff
from pipeline.fanout.dispatch import Dispatcher
from pipeline.fanout.sink import DeliveryError, Sink
from pipeline.types import Caption, Frame, StreamEvent


class Recorder(Sink):
    name = "rec"

    def __init__(self):
        super().__init__()
        self.captions, self.events, self.stopped = [], [], False

    def on_caption(self, c):
        self.captions.append(c.text)

    def on_event(self, e):
        self.events.append(e.kind)

    def stop(self):
        self.stopped = True


class Flaky(Recorder):
    name = "flaky"

    def __init__(self, fail_times):
        super().__init__()
        self.fail_times = fail_times
        self.calls = 0

    def on_caption(self, c):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise RuntimeError("boom rtmp://h/live/SECRET")
        super().on_caption(c)


class Hanger(Recorder):
    name = "hanger"

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def on_caption(self, c):
        if c.text == "hang":
            self.release.wait(30)
        super().on_caption(c)


class SlowFrames(Sink):
    name = "frames"
    wants_frames = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_frame(self, f):
        self.seen.append(f.index)
        time.sleep(0.05)


def cap(text, i=0):
    return Caption(start=i, stop=i + 1, text=text, turn=i)


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_raising_and_hanging_sinks_do_not_stop_others():
    good, flaky, hanger = Recorder(), Flaky(fail_times=2), Hanger()
    d = Dispatcher([good, flaky, hanger], call_timeout=0.5, retry=Backoff(initial=0.05, max_attempts=4), watch_interval=0.1)
    d.start()
    t0 = time.monotonic()
    d.caption(cap("hang"))
    for i in range(1, 51):
        d.caption(cap(f"c{i}", i))
    d.event(StreamEvent("source_lost", 3.0))
    assert time.monotonic() - t0 < 0.1  # the producer never waits
    assert wait_for(lambda: len(good.captions) == 51 and good.events == ["source_lost"])
    assert wait_for(lambda: len(flaky.captions) == 51)  # retried: nothing lost
    assert wait_for(lambda: d.status()["hanger"]["state"] == "hung", 3)
    st = d.status()
    assert st["rec"]["state"] == "ok" and st["rec"]["captions"] == 51
    assert st["flaky"]["state"] == "ok" and st["flaky"]["retries"] == 2 and st["flaky"]["errors"] == 2
    assert "SECRET" not in st["flaky"]["last_error"]
    assert st["hanger"]["hangs"] == 1 and st["hanger"]["busy_s"] >= 0.5
    # stop: the hung sink is abandoned within the timeout, the others are flushed and closed
    t1 = time.monotonic()
    final = d.stop(timeout=1.0)
    assert time.monotonic() - t1 < 1.5
    assert good.stopped and flaky.stopped and not hanger.stopped
    assert final["hanger"]["state"] == "hung" and final["rec"]["state"] == "stopped"
    hanger.release.set()


def test_hung_sink_recovers_when_call_returns():
    h = Hanger()
    d = Dispatcher([h], call_timeout=0.2, watch_interval=0.05)
    d.start()
    d.caption(cap("hang"))
    d.caption(cap("after"))
    assert wait_for(lambda: d.status()["hanger"]["state"] == "hung", 2)
    h.release.set()
    assert wait_for(lambda: h.captions == ["hang", "after"])
    assert d.status()["hanger"]["state"] == "ok"
    d.stop(2)


def test_always_failing_sink_is_reported_failed():
    bad = Flaky(fail_times=10**9)
    good = Recorder()
    d = Dispatcher([bad, good], retry=Backoff(initial=0.01, max_attempts=2))
    d.start()
    for i in range(5):
        d.caption(cap(f"x{i}", i))
    assert wait_for(lambda: d.status()["flaky"]["failed"] == 5)
    st = d.status()
    assert st["flaky"]["state"] == "failed" and st["rec"]["captions"] == 5
    d.stop(2)


def test_delivery_error_is_not_retried_and_start_is_retried():
    class Once(Recorder):
        name = "once"
        starts = 0

        def start(self):
            Once.starts += 1
            if Once.starts < 3:
                raise ConnectionError("server not up yet")

        def on_caption(self, c):
            if c.text == "bad":
                raise DeliveryError("gave up after my own retries")
            super().on_caption(c)

    s = Once()
    d = Dispatcher([s], retry=Backoff(initial=0.02, max_attempts=6))
    d.start()
    d.caption(cap("bad"))
    d.caption(cap("good"))
    assert wait_for(lambda: s.captions == ["good"])
    st = d.status()["once"]
    assert Once.starts == 3 and st["failed"] == 1 and st["retries"] == 0 and st["state"] == "ok"
    d.stop(2)


def test_a_delivery_error_is_logged_as_one_line_a_bug_with_its_traceback(caplog):
    """A DeliveryError is the sink's own one-line verdict (webhook: "connection refused after 4 attempts"):
    the log gets that line, not a traceback through the dispatcher (a user read it as a crash); an
    unexpected exception (a bug) keeps its first traceback."""
    class Refused(Recorder):
        name = "refused"

        def on_caption(self, c):
            if c.text == "bug":
                raise KeyError("oops")
            raise DeliveryError("webhook http://x/: connection refused after 4 attempt(s)")

    s = Refused()
    d = Dispatcher([s], retry=Backoff(initial=0.01, max_attempts=1))
    with caplog.at_level("WARNING", logger="pipeline.fanout.dispatch"):
        d.start()
        d.caption(cap("x"))
        assert wait_for(lambda: d.status()["refused"]["failed"] == 1)
        d.caption(cap("bug"))
        assert wait_for(lambda: d.status()["refused"]["failed"] == 2)
        d.stop(2)
    records = [r for r in caplog.records if "refused" in r.getMessage() or "oops" in r.getMessage()]
    assert [bool(r.exc_info) for r in records[:2]] == [False, True], [r.getMessage() for r in records]


def test_a_sink_target_down_for_hours_does_not_flood_the_log(caplog):
    """A webhook whose server is down for the whole run (a real refused port): every caption fails, a day of
    captions is 86,400 failures. The log gets the first few and then one line a minute with the count, not a
    line per caption; the status keeps counting every failure and the latest error."""
    import servers
    from plugins.sinks.webhook import WebhookSink

    sink = WebhookSink(url=f"http://127.0.0.1:{servers.free_port()}/hook", retries=0, timeout_s=2)
    d = Dispatcher([sink], queue_size=1000)
    with caplog.at_level("WARNING", logger="pipeline.fanout.dispatch"):
        d.start()
        for i in range(400):
            d.caption(cap(f"c{i}", i))
        assert wait_for(lambda: d.status()["webhook"]["failed"] == 400, 25)
        final = d.stop(5)["webhook"]
    assert final["state"] == "failed" and final["errors"] == 400 and "refused" in final["last_error"].lower()
    lines = [r for r in caplog.records if r.name == "pipeline.fanout.dispatch" and "webhook" in r.getMessage()]
    assert 1 <= len(lines) <= 10, f"{len(lines)} warning lines for 400 failed captions"


def test_bounded_queue_drops_oldest_and_frames_latest_wins():
    h = Hanger()
    slow = SlowFrames()
    d = Dispatcher([h, slow], queue_size=10, call_timeout=5)
    d.start()
    d.caption(cap("hang"))
    time.sleep(0.05)
    for i in range(30):
        d.caption(cap(f"c{i}", i))
    img = np.zeros((4, 4, 3), np.uint8)
    for i in range(100):
        d.frame(Frame(img, i / 100, index=i))
        time.sleep(0.002)
    st = d.status()
    assert st["hanger"]["dropped"] == 20 and st["hanger"]["queued"] == 10
    h.release.set()
    assert wait_for(lambda: len(h.captions) == 11)
    assert h.captions[1:] == [f"c{i}" for i in range(20, 30)]
    assert wait_for(lambda: slow.seen and slow.seen[-1] == 99)
    assert wait_for(lambda: d.status()["frames"]["frames"] == len(slow.seen))
    st = d.status()["frames"]
    assert st["frames_dropped"] > 50 and st["frames"] + st["frames_dropped"] == 100
    assert d.status()["hanger"]["frames"] == 0  # only sinks that want frames get them
    d.stop(2)


def test_audio_in_order_bounded_only_to_sinks_that_want_it():
    from pipeline.types import AudioChunk

    class Listener(Recorder):
        name = "listener"
        wants_audio = True

        def __init__(self):
            super().__init__()
            self.audio, self.gate = [], threading.Event()

        def on_audio(self, chunk):
            self.gate.wait(5)
            self.audio.append(chunk.pts)

    listener, plain = Listener(), Recorder()
    d = Dispatcher([listener, plain], audio_queue_size=20)
    assert d.wants_audio
    d.start()
    d.audio(AudioChunk(None, -1.0))  # the listener blocks on this one
    time.sleep(0.05)
    for i in range(50):
        d.audio(AudioChunk(None, i / 10))
    st = d.status()
    assert st["listener"]["audio_dropped"] == 30 and st["rec"]["audio"] == 0
    listener.gate.set()
    assert wait_for(lambda: len(listener.audio) == 21)
    assert listener.audio == [-1.0] + [i / 10 for i in range(30, 50)]  # in order, the oldest dropped
    assert d.status()["listener"]["audio"] == 21
    d.stop(2)
    assert not Dispatcher([Recorder()]).wants_audio

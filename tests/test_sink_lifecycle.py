"""Every built-in sink starts and stops cleanly through the dispatcher, leaking no threads or fds."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from pipeline.fanout.dispatch import Dispatcher
from pipeline.plugins import make_sink
from plugins.sinks.burnin import RestreamSink
from plugins.sinks.obs import ObsSink
from plugins.sinks.youtube import YoutubeSink
from pipeline.types import Caption, Frame, StreamEvent


def counts() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def test_start_stop_cycles_leak_nothing(tmp_path):
    def build():
        return [
            make_sink("console"),
            make_sink(f"jsonl:{tmp_path}/e.jsonl"),
            make_sink(f"srt:{tmp_path}/c.srt"),
            make_sink(f"vtt:{tmp_path}/c.vtt"),
            make_sink("overlay", port=0),
            make_sink(f"burnin:{tmp_path}/b.mkv", fps=10, width=160, height=96),
            # nothing listens there: keeps reconnecting in its own thread until stopped
            make_sink("twitch:#x", host="127.0.0.1", port=1, tls=False, reconnect_initial_s=0.05),
            make_sink("webhook:http://127.0.0.1:1/hook", retries=0, timeout_s=0.5),
            # classes, not names: an install made before these existed has no entry points for them
            RestreamSink(output=f"{tmp_path}/r.ts", fps=10, width=160, height=96),
            YoutubeSink(url="http://127.0.0.1:1/closedcaption", key_env="PATH", timeout_s=0.5, stop_timeout_s=0.5),
            ObsSink(url="ws://127.0.0.1:1", backoff_initial_s=0.05),
        ]

    def cycle():
        d = Dispatcher(build(), call_timeout=5)
        d.start()
        img = np.zeros((96, 160, 3), np.uint8)
        for i in range(5):
            d.frame(Frame(img, i / 10, index=i))
            d.caption(Caption(i, i + 1, f"caption {i}"))
            d.event(StreamEvent("tick", i))
            time.sleep(0.05)
        live = d.status()
        assert live["burnin"]["detail"]["codec"] == "libx264" or live["burnin"]["detail"]["codec"] == "h264_nvenc"
        assert live["twitch"]["detail"]["connected"] is False
        assert live["overlay"]["detail"]["url"].startswith("http://127.0.0.1:")
        st = d.stop(timeout=10)
        assert all(s["state"] in ("stopped", "failed") for s in st.values()), st
        assert st["webhook"]["failed"] == 5 and st["srt"]["state"] == "stopped"
        assert live["obs"]["detail"]["connected"] is False

    cycle()  # warm-up: imports, lazily created pools
    time.sleep(0.2)
    before = counts()
    for _ in range(3):
        cycle()
    time.sleep(0.3)
    after = counts()
    assert after[0] <= before[0], (before, after)
    assert after[1] <= before[1], (before, after)

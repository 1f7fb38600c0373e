"""The cluster's GPU worker (``pipeline/cluster/worker.py``) in process, without Ray (tiny model, CPU): the turns
it serves equal a stream's own session's; a stream opened with recent commentary (a moved one) starts a fresh
context whose first turn carries it, as a rollover does, and later turns do not; a full worker refuses;
``close`` gives the row back."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def setup():
    from pipeline.capture.files import file_clips
    from pipeline.engine import EngineConfig
    from pipeline.fixtures.testvideo import test_video
    from pipeline.fixtures.tiny import tiny_checkpoint

    cfg = EngineConfig(model=str(tiny_checkpoint("small")), device="cpu", greedy=True, max_streams=2,
                       max_new_tokens=4)
    clips = list(file_clips(test_video(seconds=4, width=320, height=180)))[:3]
    return cfg, clips


def test_worker_turns_equal_the_session_and_a_moved_stream_opens_on_its_commentary(setup):
    from pipeline.cluster.worker import GpuWorker
    from pipeline.engine import StreamingSession
    from pipeline.engine.context import PREVIOUS

    cfg, clips = setup
    w = GpuWorker(cfg, "w0")
    try:
        w.open("a", cfg)
        got = [w.turn("a", c)[0] for c in clips]
        alone = StreamingSession(w.engine.model, cfg)
        assert [c.token_ids for c in got] == [alone.step(c).token_ids for c in clips]
        assert [c.turn for c in got] == list(range(1, len(clips) + 1)) and len(clips) >= 2

        history = ["The striker runs down the wing.", "A shot, saved!"]
        info = w.open("b", cfg, history)
        assert info["free"] == 0 and info["streams"] == ["a", "b"]
        s = w.streams["b"].session
        prompts, finish = [], s.finish
        s.finish = lambda req, res: (prompts.append(req.text), finish(req, res))[1]  # each turn's prompt text
        cap, fig = w.turn("b", clips[0])
        assert PREVIOUS.split("\n")[0] in prompts[-1] and "A shot, saved!" in prompts[-1]
        assert fig["query"] == cfg.query and fig["sent_query"] == cfg.query  # not sent again next turn
        w.turn("b", clips[1])
        assert "previous commentary" not in prompts[-1] and cfg.query not in prompts[-1]

        with pytest.raises(RuntimeError, match="the engine is full: 2 streams"):
            w.open("c", cfg)
        w.close("a")
        assert w.ping()["free"] == 1
        with pytest.raises(KeyError, match="not open on worker w0"):
            w.turn("a", clips[0])
    finally:
        w.stop()

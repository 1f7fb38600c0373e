"""Context policies: bounded sessions on unbounded streams, and eviction that changes nothing it keeps."""

import resource

import numpy as np
import pytest
import torch

from pipeline.engine import ContextFullError, EngineConfig, StreamingSession, load_model
from pipeline.engine.sampling import SamplingSettings, TokenChooser
from pipeline.engine.vision import patchify
from pipeline.fixtures.tiny import tiny_checkpoint
from pipeline.types import Clip

from test_engine import reference_positions


@pytest.fixture(scope="module")
def model():
    return load_model(str(tiny_checkpoint("small")), device="cpu")


@pytest.fixture(scope="module")
def one_layer():
    """The tiny model cut to one decoder layer. There a token's cached K/V depend only on the token and its
    position, so evicting and re-indexing must equal recomputing the kept tokens from scratch, exactly."""
    m = load_model(str(tiny_checkpoint("small")), device="cpu")
    text = m.hf.model.language_model
    text.layers = text.layers[:1]
    for cfg in (m.hf.config, getattr(m.hf.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = 1
    return m


def stream(n_turns, h=112, w=168, seed=0):
    """An opener then one 2-frame clip per second, as the sampler produces them."""
    rng = np.random.default_rng(seed)
    yield Clip(rng.integers(0, 256, (6, h, w, 3), dtype=np.uint8), tuple(np.arange(6) * 0.5))
    for k in range(1, n_turns):
        t = 2.0 + k
        yield Clip(rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8), (t, t + 0.5))


def check_last_turn(model, session, clips_by_turn, out, positions, prompt_ids):
    """The last turn's tokens equal greedy choices of a from-scratch forward over the kept tokens."""
    ids, pixels, grids = [], [], []
    for seg in session.segments:
        ids.extend(seg.ids)
        pv, g = patchify(clips_by_turn[seg.turn].frames, model.patches)
        pixels.append(pv)
        grids.append(list(g))
    last = session.segments[-1]
    prompt_end = last.start + len(prompt_ids)
    ids.extend(out[-1:])  # not fed; only so indices line up
    first_len = session.segments[0].end - session.segments[0].start
    pos = reference_positions(model, ids, grids, positions, first_len)
    assert int(pos.max()) < session.next_pos + 1  # positions stay contiguous after re-indexing
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([ids]), pixel_values_videos=torch.cat(pixels),
                          video_grid_thw=torch.tensor(grids), position_ids=pos).logits[0].float()
    chooser = TokenChooser(1, logits.shape[-1], "cpu", SamplingSettings(repetition_penalty=1.05, greedy=True,
                                                                         eos_base=None))
    for k, tok in enumerate(out):
        at = prompt_end - 1 + k
        chooser.reset(0)
        chooser.add(0, torch.tensor(ids[:at + 1]))
        assert chooser.choose_one(logits[at], k) == tok, f"token {k} of the turn differs"


@pytest.mark.parametrize("positions", ["seed", "exact"])
def test_window_eviction_equals_forward_over_kept_tokens(one_layer, positions):
    model = one_layer
    session = StreamingSession(model, EngineConfig(greedy=True, positions=positions, context="window",
                                                   window_seconds=3.0, max_context=4096))
    clips_by_turn, checked = {}, 0
    for k, clip in enumerate(stream(14)):
        clips_by_turn[session.turns] = clip
        req = session.video_request(clip)
        cap = session.finish(req, session.core.run([req])[0])
        if session.evicted_turns and k >= 5:
            check_last_turn(model, session, clips_by_turn, list(cap.token_ids), positions, req.ids)
            checked += 1
        assert len(session.segments) <= 1 + 6  # the first turn + about 3 s of turns (+ slack)
    assert session.evicted_turns >= 8 and checked >= 4


def test_eviction_moves_and_rerotates_the_first_layer_exactly(model):
    """On the full model, kept tokens keep the context they were computed with (deeper layers saw the evicted
    turns, as in StreamingVLM); the first layer's K/V are context-free and must equal a recomputation."""
    session = StreamingSession(model, EngineConfig(greedy=True, context="window", window_seconds=3.0,
                                                   max_context=4096))
    clips_by_turn = {}
    for clip in stream(9):
        clips_by_turn[session.turns] = clip
        session.step(clip)
    assert session.evicted_turns > 0
    ids, pixels, grids = [], [], []
    for seg in session.segments:
        ids.extend(seg.ids)
        pv, g = patchify(clips_by_turn[seg.turn].frames, model.patches)
        pixels.append(pv)
        grids.append(list(g))
    first_len = session.segments[0].end
    pos = reference_positions(model, ids, grids, "seed", first_len)
    with torch.no_grad():
        out = model.hf(input_ids=torch.tensor([ids]), pixel_values_videos=torch.cat(pixels),
                       video_grid_thw=torch.tensor(grids), position_ids=pos, use_cache=True)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    layer = cache.layers[0] if hasattr(cache, "layers") else None
    k0 = layer.keys if layer is not None else cache.key_cache[0]
    v0 = layer.values if layer is not None else cache.value_cache[0]
    cache, row = session.core.runner.cache, slice(session.slot, session.slot + 1)
    torch.testing.assert_close(cache.k[0, row, :, :len(ids)], k0, rtol=0, atol=1e-4)
    torch.testing.assert_close(cache.v[0, row, :, :len(ids)], v0, rtol=0, atol=1e-5)


def test_window_keeps_the_cache_under_budget(model):
    session = StreamingSession(model, EngineConfig(greedy=True, context="window", window_seconds=1e9,
                                                   max_context=600, context_headroom=64))
    for clip in stream(40):
        session.step(clip)
        assert session.context_length <= 600
    assert session.evicted_turns > 0


def test_rollover_starts_a_fresh_context_with_previous_commentary(model):
    cfg = EngineConfig(greedy=True, context="rollover", rollover_seconds=8.0, max_context=4096)
    session = StreamingSession(model, cfg)
    captions, opened = [], None
    for clip in stream(12):
        req = session.video_request(clip)
        if req.reset:
            opened = req  # the rollover turn's request: a fresh context
        captions.append(session.finish(req, session.core.run([req])[0]))
    assert session.rollovers == 1
    roll = next(i for i, c in enumerate(captions) if c.start > 0 and c.stop - c.start == 3.0)
    # the rollover turn opens on the latest 6 frames, labelled from 0, with the previous commentary
    assert (captions[roll].start, captions[roll].stop) == (6.0, 9.0)
    # it is exactly a fresh session's first turn on those frames and that prompt
    fresh = StreamingSession(model, cfg)
    clips = list(stream(12))
    frames = np.concatenate([clips[roll - 2].frames, clips[roll - 1].frames, clips[roll].frames])
    fresh.query = opened.query
    first = fresh.step(Clip(frames, (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)))
    assert first.token_ids == captions[roll].token_ids
    assert "Here is previous commentary of the video:" in opened.query
    assert "Time=0.0-3.0s" in opened.text and opened.text.startswith("<|im_start|>system")


@pytest.mark.parametrize("policy", ["rollover", "window"])
def test_a_long_stream_stays_bounded(model, policy):
    """Twelve minutes of stream time (720 turns) on 56x56 frames, crossing 11 rollovers / hundreds of
    evictions: memory, cache and positions stay bounded. (Hours of stream: scripts/bench_long_stream.py.)"""
    cfg = EngineConfig(greedy=True, context=policy, max_new_tokens=4, max_context=2048, rollover_seconds=60,
                       window_seconds=30)
    session = StreamingSession(model, cfg)
    rss, max_ctx, max_pos = [], 0, 0
    for k, clip in enumerate(stream(720, h=56, w=56)):
        session.step(clip)
        max_ctx = max(max_ctx, session.context_length)
        max_pos = max(max_pos, session.next_pos)
        if k % 120 == 119:
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert max_ctx <= 2048
    assert max_pos < 2048  # positions inside the trained window (and far inside the cache)
    grew = rss[-1] - rss[1]  # KiB, from minute 4 to minute 12
    assert grew < 16_384, f"peak RSS grew by {grew} KiB after the first 4 minutes"
    if policy == "rollover":
        assert session.rollovers >= 720 // 60 - 2
    else:
        assert session.evicted_turns > 600


def test_none_policy_fills_up(model):
    session = StreamingSession(model, EngineConfig(greedy=True, context="none", max_context=512))
    with pytest.raises(ContextFullError):
        for clip in stream(200):
            session.step(clip)


@pytest.mark.parametrize("policy", ["rollover", "window", "none"])
def test_a_burst_of_questions_makes_room_as_clips_do(model, policy):
    """Viewers' questions with no clip between them: each question and its answer must fit, so when the context is
    full the policy makes room as for a clip. Before, the context never rolled over or evicted for a question: after
    ≈ 11 questions at a 1k context every further one failed (HTTP 409) until the next clip. ``rollover``: the
    question opens a fresh context on the latest 3 s of frames with the question after them (a fresh session's first
    turn on those frames and that text, token for token); ``window``: the oldest turns after the first leave;
    ``none``: still a clear ContextFullError."""
    cfg = EngineConfig(greedy=True, context=policy, max_context=900, max_new_tokens=4, answer_max_new_tokens=48,
                       window_seconds=1e9, context_headroom=64)
    session = StreamingSession(model, cfg)
    clips = list(stream(4))
    for clip in clips:
        session.step(clip)
    answers, opened = [], None
    try:
        for i in range(30):
            req = session.question_request(f"What happened in part {i} of the video so far?", at=float(i))
            if req.reset:
                opened = (req, session.finish(req, session.core.run([req])[0]))
                answers.append(opened[1])
            else:
                answers.append(session.finish(req, session.core.run([req])[0]))
            assert session.context_length <= 900
    except ContextFullError as e:
        assert policy == "none", f"question {len(answers)}: {e}"
        assert len(answers) >= 3 and "does not fit" in str(e)
        return
    assert policy != "none", "the context never filled: the test asks too little"
    assert len(answers) == 30 and all(a.kind == "answer" for a in answers)
    if policy == "window":
        assert session.evicted_turns > 0 and session.rollovers == 0
        assert session.segments[0].turn == 0  # the first turn (the attention sink) stays
        return
    assert session.rollovers >= 1 and opened is not None
    req, answer = opened
    assert req.frames is not None and "Time=0.0-3.0s" in req.text and answer.query.startswith("What happened")
    fresh = StreamingSession(model, cfg)  # a fresh session's first turn: those frames, the question as the query
    frames = np.concatenate([c.frames for c in clips])[-6:]
    fresh.query = answer.query
    first = fresh.video_request(Clip(frames, (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)))
    first.max_new = cfg.answer_max_new_tokens
    assert first.ids == req.ids
    assert fresh.finish(first, fresh.core.run([first])[0]).token_ids == answer.token_ids


def test_stagger_fractions_spread_the_rows_and_leave_row_0_on_time():
    from pipeline.engine.context import stagger_fraction

    fr = [stagger_fraction(k, 0.25) for k in range(32)]
    assert fr[0] == 0.0 and all(0.0 <= f < 0.25 for f in fr)
    # 32 rows over [0, 0.25): every eighth of the range holds some, none more than 5 (the golden-ratio sequence)
    counts = np.bincount([int(f / 0.25 * 8) for f in fr], minlength=8)
    assert counts.min() >= 3 and counts.max() <= 5, counts
    assert stagger_fraction(7, 0.0) == 0.0
    with pytest.raises(ValueError, match="rollover_stagger"):
        stagger_fraction(1, 1.0)
    with pytest.raises(ValueError, match="rollover_stagger"):
        EngineConfig(rollover_stagger=-0.1)


@pytest.mark.parametrize("budget", ["tokens", "seconds"])
def test_a_staggered_stream_rolls_over_early_and_keeps_doing_so(model, budget):
    """``rollover_early``: a stream rolls over when its context has used (1 - early) of the room its first turn
    left (or of ``rollover_seconds``), at every cycle; with 0 it rolls over exactly where it did before."""
    cfg = EngineConfig(greedy=True, context="rollover", max_context=1024 if budget == "tokens" else 32768,
                       rollover_seconds=8.0 if budget == "seconds" else 1e9, max_new_tokens=4, context_headroom=128)

    def roll_turns(early):
        session = StreamingSession(model, cfg, rollover_early=early)
        out = []
        for i, clip in enumerate(stream(40)):
            req = session.video_request(clip)
            if req.reset:
                out.append(i)
            session.finish(req, session.core.run([req])[0])
        session.close()
        return out

    on_time, early = roll_turns(0.0), roll_turns(0.3)
    assert len(on_time) >= 2 and len(early) > len(on_time), (on_time, early)
    assert early[0] < on_time[0]
    gaps = np.diff(early)
    assert gaps.min() >= 2  # never a rollover every turn: the early budget is a share of the room left


def test_the_engine_staggers_its_streams_by_cache_row(model):
    """``EngineWorker.open_session``: row 0's stream (``livecc run``'s only one) rolls over on time, the others
    early by ``stagger_fraction`` of ``engine.rollover_stagger``; 0 turns it off."""
    from pipeline.engine.context import stagger_fraction
    from pipeline.engine_worker import EngineWorker

    for stagger in (0.25, 0.0):
        cfg = EngineConfig(greedy=True, max_context=2048, rollover_stagger=stagger)
        worker = EngineWorker(cfg, model=model, slots=3)
        sessions = [worker.open_session(cfg) for _ in range(3)]
        assert [s.rollover_early for s in sessions] == [stagger_fraction(s.slot, stagger) for s in sessions]
        assert sessions[0].slot == 0 and sessions[0].rollover_early == 0.0
        assert (sessions[1].rollover_early > 0) == (stagger > 0)

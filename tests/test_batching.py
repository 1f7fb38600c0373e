"""Many streams on one engine core give each stream exactly the tokens it gets alone.

Four streams with different resolutions, queries, context policies (rollover, window eviction) and
seeds share one core (one model, one KV cache with a row per stream); one stream changes its query and
asks a question mid-run, so the streams drift out of phase and rows join and leave the decode batch at
different steps. Each stream is also run alone (a batch of one); token ids must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine import EngineConfig, StreamingSession, load_model, make_core
from pipeline.fixtures.tiny import tiny_checkpoint
from pipeline.types import Clip

pytestmark = pytest.mark.timeout(300)

TURNS = 12


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.fixture(scope="module", params=["cpu", CUDA])
def model(request):
    """float32 everywhere: on CUDA the decode steps replay CUDA graphs per batch size."""
    return load_model(str(tiny_checkpoint("small")), device=request.param, dtype="float32")


def clips(h, w, seed):
    rng = np.random.default_rng(seed)
    yield Clip(rng.integers(0, 256, (6, h, w, 3), dtype=np.uint8), tuple(np.arange(6) * 0.5))
    for k in range(1, TURNS):
        t = 2.0 + k
        yield Clip(rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8), (t, t + 0.5))


# (height, width, clip seed, engine settings of the stream, sampling seed, script of extra actions by turn)
STREAMS = [
    (112, 168, 0, dict(query="Describe the court."), 11, {4: [("query", "Who scores?")], 7: [("ask", "Who won?")]}),
    (56, 84, 1, dict(context="rollover", rollover_seconds=6.0), 12, {}),
    (168, 112, 2, dict(context="window", window_seconds=3.0, query="Narrate."), 13, {}),
    (84, 84, 3, dict(max_new_tokens=6), 14, {9: [("ask", "What colour?")]}),
]


def script(i):
    h, w, seed, _, _, extra = STREAMS[i]
    for k, clip in enumerate(clips(h, w, seed)):
        yield from extra.get(k, [])
        yield ("clip", clip)


def alone(model, i, base):
    _, _, _, own, seed, _ = STREAMS[i]
    s = StreamingSession(model, EngineConfig(**{**base, **own}), seed=seed)
    out = []
    for kind, arg in script(i):
        if kind == "query":
            s.set_query(arg)
        else:
            out.append((s.step(arg) if kind == "clip" else s.ask(arg)).token_ids)
    return out


def together(model, base):
    core = make_core(model, EngineConfig(**base), slots=len(STREAMS))
    sessions = [StreamingSession(model, EngineConfig(**{**base, **own}), core=core, seed=seed)
                for _, _, _, own, seed, _ in STREAMS]
    scripts = [script(i) for i in range(len(STREAMS))]
    outs: list[list] = [[] for _ in STREAMS]
    while True:
        reqs = []
        for s, sc in zip(sessions, scripts):
            for kind, arg in sc:
                if kind == "query":
                    s.set_query(arg)
                    continue
                reqs.append((s, s.video_request(arg) if kind == "clip" else s.question_request(arg)))
                break
        if not reqs:
            return outs, core
        results = core.run([r for _, r in reqs])
        for (s, req), res in zip(reqs, results):
            outs[sessions.index(s)].append(s.finish(req, res).token_ids)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded-sampling"])
def test_batched_equals_sequential(model, greedy):
    base = dict(greedy=greedy, max_context=2048, max_new_tokens=16)
    batched, core = together(model, base)
    for i in range(len(STREAMS)):
        assert batched[i] == alone(model, i, base), f"stream {i} differs when batched"
    asks = [sum(kind == "ask" for acts in extra.values() for kind, _ in acts) for *_, extra in STREAMS]
    assert [len(b) for b in batched] == [TURNS + n for n in asks]
    assert core.steps > 0


def test_rows_join_and_leave_the_batch(model):
    """A decode step serves several rows at once, and rows finish at different steps."""
    core = make_core(model, EngineConfig(greedy=True, max_context=2048), slots=3)
    sessions = [StreamingSession(model, EngineConfig(greedy=True, max_context=2048, max_new_tokens=n), core=core)
                for n in (3, 9, 16)]
    seen_batches = []
    real = core.runner.decode

    def spy(slots, *rest):
        seen_batches.append(len(slots))
        return real(slots, *rest)

    core.runner.decode = spy
    gens = [clips(56, 84, i) for i in range(3)]
    reqs = [s.video_request(next(g)) for s, g in zip(sessions, gens)]
    results = core.run(reqs)
    assert max(seen_batches) >= 2 and len(set(seen_batches)) > 1  # rows decoded together, and some left early
    assert all(len(r.tokens) <= n for n, r in zip((3, 9, 16), results))


@pytest.mark.parametrize("greedy", [True, False])
def test_a_caption_in_progress_copies_no_step_inputs(model, greedy):
    """The decode step keeps its inputs on the device and advances them itself (``ModelRunner.state``): a step whose
    rows, cache lengths, positions and generation steps are what the step before left copies nothing from the host
    (``_write_state`` runs only when a row joins or leaves, or a prefill or an undone step changed a length). Three
    streams with different caps, two turns each, greedy and seeded sampling, with the streaming-EOS threshold (it reads
    each row's generation step from the state): the tokens equal those of a runner that rewrites its state before
    every step, and most steps write nothing."""
    from pipeline.engine.runner import AT, LIVE, POS, STEP

    def serve(rewrite_always: bool):
        cfg = EngineConfig(greedy=greedy, max_context=2048, streaming_eos_base=0.0, streaming_eos_step=0.02)
        core = make_core(model, cfg, slots=3)
        caps = (3, 9, 16)
        sessions = [StreamingSession(model, EngineConfig(greedy=greedy, max_context=2048, max_new_tokens=n,
                                                         streaming_eos_step=0.02), core=core, seed=11 + i)
                    for i, n in enumerate(caps)]
        r = core.runner
        counts = {"write": 0, "step": 0, "checked": 0}
        real_write, real_decode = r._write_state, r.decode

        def write(*a):
            counts["write"] += 1
            return real_write(*a)

        def decode(slots, feed, positions, steps):
            counts["step"] += 1
            if rewrite_always:
                r._expect = None
            nb = r.decode_shape(slots)[0]
            if r._expect == (tuple(slots), tuple(r.cache.lengths[:nb]), tuple(positions), tuple(steps)):
                # a step that copies nothing: the state the step before left is what the host would write
                state = r.state[:, slots].tolist()
                assert state[POS] == positions and state[STEP] == steps and state[LIVE] == [1] * len(slots)
                assert state[AT] == [r.cache.lengths[s] for s in slots]
                counts["checked"] += 1
            return real_decode(slots, feed, positions, steps)

        r._write_state, r.decode = write, decode
        gens = [clips(56, 84, i) for i in range(3)]
        tokens = []
        for _ in range(2):
            reqs = [s.video_request(next(g)) for s, g in zip(sessions, gens)]
            results = core.run(reqs)
            for s, req, res in zip(sessions, reqs, results):
                s.finish(req, res)
            tokens.append([res.tokens for res in results])
        return tokens, counts

    steady, kept = serve(False)
    every, rewritten = serve(True)
    assert steady == every and kept["checked"] > 10
    assert rewritten["write"] == rewritten["step"] > 10
    assert kept["step"] == rewritten["step"] and kept["write"] < kept["step"] / 2, kept


def test_decode_steps_between_prefills(model):
    """With ``decode_steps_per_prefill`` = 3 a waiting turn is prefilled only after 3 decode steps of the rows already
    decoding (or at once when none is), and every stream still gets the tokens it gets with the default of 1."""
    def serve(steps):
        cfg = EngineConfig(greedy=True, max_context=2048, max_new_tokens=12, prefill_batch=1,
                           decode_steps_per_prefill=steps)
        core = make_core(model, cfg, slots=3)
        assert core.decode_steps_per_prefill == steps
        sessions = [StreamingSession(model, cfg, core=core) for _ in range(3)]
        events = []
        real_prefill, real_decode = core.runner.prefill, core.runner.decode

        def prefill(turns):
            events.append(("P", len(core.active)))
            return real_prefill(turns)

        def decode(slots, *rest):
            events.append(("D", len(slots)))
            return real_decode(slots, *rest)

        core.runner.prefill, core.runner.decode = prefill, decode
        gens = [clips(56, 84, i) for i in range(3)]
        results = core.run([s.video_request(next(g)) for s, g in zip(sessions, gens)])
        return [r.tokens for r in results], events

    base, _ = serve(1)
    tokens, events = serve(3)
    assert tokens == base
    since = None
    for kind, active in events:
        if kind == "P":
            assert since is None or active == 0 or since >= 3, events
            since = 0
        else:
            since += 1
    assert sum(k == "P" for k, _ in events) == 3


def test_slots_are_refused_when_full(model):
    core = make_core(model, EngineConfig(greedy=True, max_context=512), slots=2)
    a = StreamingSession(model, EngineConfig(greedy=True, max_context=512), core=core)
    StreamingSession(model, EngineConfig(greedy=True, max_context=512), core=core)
    with pytest.raises(RuntimeError, match="slots are in use"):
        StreamingSession(model, EngineConfig(greedy=True, max_context=512), core=core)
    a.close()
    StreamingSession(model, EngineConfig(greedy=True, max_context=512), core=core)  # the freed row is reused


def test_prefill_batch_comes_from_the_config(model):
    from pipeline import config
    from pipeline.errors import ConfigError

    assert make_core(model, EngineConfig(max_context=512, prefill_batch=3), slots=1).prefill_batch == 3
    assert make_core(model, EngineConfig(max_context=512), slots=1).prefill_batch == 4
    assert make_core(model, EngineConfig(max_context=512, decode_steps_per_prefill=3), slots=1).decode_steps_per_prefill == 3
    assert make_core(model, EngineConfig(max_context=512), slots=1).decode_steps_per_prefill == 2
    with pytest.raises(ConfigError, match="decode_steps_per_prefill must be at least 1"):
        config.validate({"engine": {"decode_steps_per_prefill": 0}}).engine_config()
    with pytest.raises(ConfigError, match="prefill_batch must be at least 1"):
        config.validate({"engine": {"prefill_batch": 0}}).engine_config()


def test_prefill_answers_in_the_callers_order(model):
    """The runner packs a prefill's turns in slot order (the CUDA varlen kernel reads the cache rows in storage
    order) and answers in the caller's order: turns given as slots 2, 0, 1 get the logits they get given 0, 1, 2."""
    from pipeline.engine.runner import ModelRunner

    gen = torch.Generator().manual_seed(0)
    turns = {s: (s, torch.randint(0, 4000, (n,), generator=gen).tolist(), torch.arange(n).expand(3, n), None)
             for s, n in ((0, 30), (1, 7), (2, 50))}
    out = []
    for slots in ([2, 0, 1], [0, 1, 2]):
        r = ModelRunner(model, slots=3, capacity=256, graphs=False)
        logits = r.prefill([turns[s] for s in slots])
        out.append({s: logits[i] for i, s in enumerate(slots)})
        assert r.cache.lengths == [30, 7, 50]
    for s in range(3):
        torch.testing.assert_close(out[0][s], out[1][s], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[0][0], out[0][2])  # the rows differ: a mix-up would show


def test_prefill_graphs_keep_the_recently_used_lengths():
    """``PrefillGraphs``' policy (the capture itself is CUDA's: tests/test_gpu.py): a (slot, length) is captured
    the second time it is seen, turns longer than ``max_tokens`` stay eager, and beyond ``limit`` graphs the least
    recently replayed is dropped. With cuDNN for the past (Hopper), the key also holds the past's whole
    ``PAST_BLOCK``-key blocks: a longer past is captured at once (its length was seen twice) and the graph of the
    shorter one dropped."""
    from types import SimpleNamespace

    from pipeline.engine.cuda_graphs import PrefillGraphs

    captured = []

    class Recording(PrefillGraphs):
        def _capture(self, slot, x, pos, at, used, past):  # stands in for the CUDA capture; replays nothing
            captured.append((slot, x.shape[0], past))
            return SimpleNamespace(replay=lambda: None), (x.clone(), pos.clone(), at.clone(),
                                                          torch.zeros(1, dtype=torch.int32)), torch.ones(1, 5)

    from pipeline.engine.runner import PAST_BLOCK as B
    from pipeline.engine.runner import PAST_SPLIT
    from pipeline.engine.runner import past_block

    runner = SimpleNamespace(cache=SimpleNamespace(slots=1), cudnn_past=True)
    graphs = Recording(runner, pool=None, limit=2, max_tokens=8)

    def turn(slot, n, start=10, past=0):
        return graphs.run(slot, torch.zeros(n, 4), torch.zeros(3, 1, n, dtype=torch.long),
                          torch.arange(n), start + n, past)

    assert turn(0, 5) is None and captured == []  # first sight: eager
    assert turn(0, 5) is not None and captured == [(0, 5, 0)]  # second: captured and replayed
    assert turn(0, 9) is None and turn(0, 9) is None and captured == [(0, 5, 0)]  # too long: always eager
    turn(0, 6), turn(0, 6)  # (0, 6) captured: two graphs
    turn(0, 5)  # (0, 5) used again: (0, 6) is now the least recent
    turn(0, 7), turn(0, 7)  # a third: (0, 6) dropped
    assert list(graphs.graphs) == [(0, 5, 0), (0, 7, 0)]
    assert turn(0, 5) is not None and captured == [(0, 5, 0), (0, 6, 0), (0, 7, 0)]

    captured.clear()
    graphs = Recording(runner, pool=None, limit=4, max_tokens=512)
    pb = lambda start: turn(0, 386, start, past=past_block(start, 386))  # noqa: E731 - as ModelRunner.prefill
    assert pb(B + 52) is None and pb(B + 438) is not None  # one block of past through cuDNN
    assert pb(2 * B - 96) is not None and captured == [(0, 386, B)]  # same block: replayed
    assert pb(2 * B + 4) is not None and captured == [(0, 386, B), (0, 386, 2 * B)]  # two blocks: captured at once
    assert list(graphs.graphs) == [(0, 386, 2 * B)]  # the one-block graph dropped
    assert past_block(2 * B + 4, 40) == 0 and past_block(B - 1, 386) == 0  # < 64 new tokens, or no whole block
    assert B % PAST_SPLIT == 0  # a block splits into the parts of one cuDNN call
    assert turn(0, 386, 2 * B + 4) is not None and captured[-1] == (0, 386, 0)  # cuDNN off: its own graph


def test_a_past_block_that_does_not_split_evenly_is_refused_at_start(monkeypatch, model):
    """``runner.PAST_SPLIT`` parts of a ``PAST_BLOCK``: a runner whose block does not split evenly is a clear error
    when it is built, not a cuDNN failure at the first turn past a block (which would turn cuDNN off for good)."""
    from pipeline.engine import runner
    from pipeline.engine.runner import ModelRunner

    monkeypatch.setattr(runner, "PAST_SPLIT", 3)  # PAST_BLOCK stays 2048
    with pytest.raises(ValueError, match="multiple of PAST_SPLIT"):
        ModelRunner(model, slots=1, capacity=256, graphs=False)
    monkeypatch.setattr(runner, "PAST_BLOCK", 3072)
    ModelRunner(model, slots=1, capacity=256, graphs=False)


def test_a_failed_decode_step_fails_only_the_turns_still_decoding(model):
    """With overlap the host reads a step's tokens after launching the next: when that launch fails, a turn that had
    ended in the step before still gets its result (3 tokens), and only the turn still decoding gets the error.
    A turn capped at 0 tokens gets its one chosen token instead of vanishing."""
    cfg = EngineConfig(greedy=True, max_context=2048, max_new_tokens=16)
    core = make_core(model, cfg, slots=3)
    sessions = [StreamingSession(model, cfg, core=core) for _ in range(3)]
    reqs = [s.video_request(next(clips(56, 84, i))) for i, s in enumerate(sessions)]
    reqs[0].max_new, reqs[2].max_new = 3, 0
    core.stop_ids = frozenset()  # no early stop: the caps decide
    results = {}
    for r in reqs:
        r.on_done = lambda req, res: results.__setitem__(req.slot, res)
    real, calls = core.runner.decode, []

    def decode(slots, *rest):
        calls.append(len(slots))
        if len(calls) == 3:
            raise RuntimeError("step failed")
        return real(slots, *rest)

    core.runner.decode = decode
    core._prefill(reqs)
    while core.active:
        core._decode_step()
    assert calls == [2, 2, 1]  # the third step serves only the uncapped turn, and fails
    assert len(results[reqs[0].slot].tokens) == 3
    assert isinstance(results[reqs[1].slot], RuntimeError)
    assert len(results[reqs[2].slot].tokens) == 1


def test_a_prefills_first_tokens_are_read_after_the_next_step_is_launched(model):
    """Overlap from the prefill on: the first decode step of a turn is launched, fed the first token still on the
    device, before the host reads that token (no wait for the host between the prefill and decoding). A turn whose
    first token is a stop id then ends with that one token and leaves no trace: its row's cache holds the prompt
    alone and its repetition counts the prompt's ids alone (the first token and the step's choice taken back), while
    the other turn decodes on."""
    cfg = EngineConfig(greedy=True, max_context=2048, max_new_tokens=8)

    def turn(core, sessions):
        return [s.video_request(next(clips(56, 84, i))) for i, s in enumerate(sessions)]

    core = make_core(model, cfg, slots=2)
    sessions = [StreamingSession(model, cfg, core=core) for _ in range(2)]
    reqs = turn(core, sessions)
    firsts = [res.tokens[0] for res in core.run(reqs)]
    assert firsts[0] != firsts[1]  # (the clips differ: one turn can end while the other goes on)

    core = make_core(model, cfg, slots=2)
    sessions = [StreamingSession(model, cfg, core=core) for _ in range(2)]
    core.stop_ids = frozenset({firsts[0]})
    reqs = turn(core, sessions)
    events, results = [], {}
    for r in reqs:
        r.on_done = lambda req, res: results.__setitem__(req.slot, res)
    real_read, real_decode = core._read, core.runner.decode
    core._read = lambda step: events.append("read first" if step.prefill else "read step") or real_read(step)
    core.runner.decode = lambda slots, *rest: events.append(f"launch {len(slots)}") or real_decode(slots, *rest)
    core._prefill(reqs)
    assert events == [] and len(core.active) == 2  # nothing read yet: both rows join the batch
    core._decode_step()
    assert events == ["launch 2", "read first"]  # the step launched first, fed both first tokens from the device
    assert results[reqs[0].slot].tokens == [firsts[0]] and len(core.active) == 1
    while core.active:
        core._decode_step()
    assert len(results[reqs[1].slot].tokens) > 1
    slot = reqs[0].slot
    assert core.runner.cache.length(slot) == len(reqs[0].ids)
    want = torch.bincount(torch.tensor(reqs[0].ids), minlength=core.chooser.counts.shape[1]).to(torch.int32)
    assert torch.equal(core.chooser.counts[slot].cpu(), want)


def test_a_failed_first_token_read_fails_its_turns_not_the_engine(model):
    """With overlap off (a benchmark's baseline) the prefill reads its first tokens at once; when that read fails (a
    device error surfaces there), those turns get the error and the prefill returns, instead of the error escaping into
    the engine thread (which would end it with every other turn left waiting)."""
    cfg = EngineConfig(greedy=True, max_context=2048, max_new_tokens=4)
    core = make_core(model, cfg, slots=2)
    core.overlap = False
    sessions = [StreamingSession(model, cfg, core=core) for _ in range(2)]
    reqs = [s.video_request(next(clips(56, 84, i))) for i, s in enumerate(sessions)]
    results = {}
    for r in reqs:
        r.on_done = lambda req, res: results.__setitem__(req.slot, res)

    def read(step):
        raise RuntimeError("device error")

    core._read = read
    core._prefill(reqs)  # does not raise
    assert all(isinstance(results[r.slot], RuntimeError) for r in reqs) and core.active == []


def test_stopping_delivers_the_turns_that_ended_in_the_step_in_flight(model):
    """The engine stops with a decode step launched but not read: a turn whose last token is in that step gets its
    result (3 tokens), the turn still decoding gets the stop error."""
    cfg = EngineConfig(greedy=True, max_context=2048, max_new_tokens=16)
    core = make_core(model, cfg, slots=2)
    sessions = [StreamingSession(model, cfg, core=core) for _ in range(2)]
    reqs = [s.video_request(next(clips(56, 84, i))) for i, s in enumerate(sessions)]
    reqs[0].max_new = 3
    core.stop_ids = frozenset()
    results = {}
    for r in reqs:
        r.on_done = lambda req, res: results.__setitem__(req.slot, res)
    core._prefill(reqs)
    core._decode_step()
    core._decode_step()  # the first turn's third token is in the step in flight
    assert results == {} and core._launched is not None
    core._drain(RuntimeError("the engine stopped"))
    assert len(results[reqs[0].slot].tokens) == 3
    assert str(results[reqs[1].slot]) == "the engine stopped"

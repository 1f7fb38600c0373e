"""The streaming engine against transformers' own Qwen2-VL forward over the whole conversation.

Incremental decoding on our KV cache must pick, at every generated token, what a from-scratch
full-sequence forward of the conversation so far picks (teacher forcing over the final sequence is
the same test token for token, because greedy choice is deterministic).
"""

import importlib
import numpy as np
import pytest
import torch

from pipeline.engine import ContextFullError, EngineConfig, StreamingSession, load_model
from pipeline.engine.sampling import SamplingSettings, TokenChooser
from pipeline.fixtures.tiny import tiny_checkpoint
from pipeline.types import Clip

QUERY2 = "Describe the colours and the moving shapes."


@pytest.fixture(scope="module", params=["small", "qwen"])
def model(request):
    return load_model(str(tiny_checkpoint(request.param)), device="cpu")


def synthetic_clips(n_turns, h=112, w=168, seed=0):
    rng = np.random.default_rng(seed)
    yield Clip(rng.integers(0, 256, (6, h, w, 3), dtype=np.uint8), tuple(np.arange(6) * 0.5))
    for k in range(1, n_turns):
        t0 = 2.0 + k
        yield Clip(rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8), (t0, t0 + 0.5))


def serve(session, req):
    """One turn through the session's core (what ``step``/``ask`` do), keeping the request to inspect."""
    return session.finish(req, session.core.run([req])[0])


def run_conversation(model, positions, n_turns=22):
    """Run turns (query change at turn 8, a question at turn 14); record what the reference forward needs."""
    session = StreamingSession(model, EngineConfig(greedy=True, positions=positions, max_context=8192))
    record = []  # (prompt ids, generated ids, clip or None)
    for k, clip in enumerate(synthetic_clips(n_turns)):
        if k == 8:
            session.set_query(QUERY2)
        if k == 14:
            before = session.context_length
            req = session.question_request("What colour dominates so far?")
            ans = serve(session, req)
            record.append((req.ids, list(ans.token_ids), None))
            assert session.context_length == before + len(req.ids) + len(ans.token_ids) - 1
        before = session.context_length
        req = session.video_request(clip)
        cap = serve(session, req)
        record.append((req.ids, list(cap.token_ids), clip))
        # the last generated token (EOS or the capped one) is not part of the context
        assert session.context_length == before + len(req.ids) + len(cap.token_ids) - 1
    return session, record


def reference_positions(model, ids, grids, positions, first_len):
    """Positions from transformers' own get_rope_index (exact), or turn 1's then 1-D (seed)."""
    inner = model.hf.model
    vid = model.video_token_id
    ids_t = torch.tensor([ids])
    grid_t = torch.tensor(grids) if grids else None
    if positions == "exact":
        types = (ids_t == vid).int() * 2
        pos, _ = inner.get_rope_index(ids_t, mm_token_type_ids=types, video_grid_thw=grid_t)
        return pos
    first = ids_t[:, :first_len]
    pos1, delta = inner.get_rope_index(first, mm_token_type_ids=(first == vid).int() * 2, video_grid_thw=grid_t[:1])
    rest = torch.arange(first_len, len(ids)).view(1, 1, -1).expand(3, 1, -1) + delta
    return torch.cat([pos1, rest], dim=-1)


def check_against_full_forward(model, record, positions):
    from pipeline.engine.vision import patchify

    ids, pixels, grids, targets = [], [], [], []
    first_len = len(record[0][0])
    for prompt, out, clip in record:
        if clip is not None:
            pv, g = patchify(clip.frames, model.patches)
            pixels.append(pv)
            grids.append(list(g))
        ids.extend(prompt)
        for k, tok in enumerate(out):
            targets.append((len(ids) - 1 + k, tok))
        ids.extend(out[:-1])
    pos = reference_positions(model, ids, grids, positions, first_len)
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([ids]), pixel_values_videos=torch.cat(pixels),
                          video_grid_thw=torch.tensor(grids), position_ids=pos).logits[0].float()
    ids_t = torch.tensor(ids)
    chooser = TokenChooser(1, logits.shape[-1], "cpu", SamplingSettings(repetition_penalty=1.05, greedy=True,
                                                                         silence_id=model.silence_id))
    step_in_turn = {}
    for i, (at, tok) in enumerate(targets):
        chooser.reset(0)
        chooser.add(0, ids_t[:at + 1])
        step = 0 if i == 0 or targets[i - 1][0] != at - 1 else step_in_turn[at - 1] + 1
        step_in_turn[at] = step
        assert chooser.choose_one(logits[at], step) == tok, f"token {i} (sequence index {at}) differs"
    return len(targets)


@pytest.mark.parametrize("positions", ["exact", "seed"])
def test_incremental_equals_full_forward(model, positions):
    session, record = run_conversation(model, positions)
    n = check_against_full_forward(model, record, positions)
    outs = [out for _, out, clip in record if clip is not None]
    assert len(outs) == 22 and n > 100
    # both ends of a turn occur: the EOS and the 16-token cap
    assert any(o[-1] in model.stop_ids for o in outs)
    assert any(len(o) == 16 and o[-1] not in model.stop_ids for o in outs)


def test_query_sent_only_when_changed(model):
    session = StreamingSession(model, EngineConfig(greedy=True))
    texts = []
    for k, clip in enumerate(synthetic_clips(5)):
        if k == 3:
            session.set_query(QUERY2)
        req = session.video_request(clip)
        serve(session, req)
        texts.append(req.text)
    assert texts[0].startswith("<|im_start|>system") and "Please describe the video." in texts[0]
    assert "Time=0.0-3.0s" in texts[0]
    assert texts[1].startswith("<|im_end|>\n<|im_start|>user\nTime=3.0-4.0s")
    assert "Please describe" not in texts[1] and "Please describe" not in texts[2]
    assert QUERY2 in texts[3] and QUERY2 not in texts[4]


def test_positions_modes_differ_after_first_turn(model):
    a, ra = run_conversation(model, "seed", n_turns=4)
    b, rb = run_conversation(model, "exact", n_turns=4)
    assert ra[0][1] == rb[0][1]  # turn 1 is the same in both modes
    assert a.next_pos != b.next_pos  # later video chunks are placed differently


def test_context_full_is_a_clear_error(model):
    session = StreamingSession(model, EngineConfig(greedy=True, max_context=200, context="none"))
    clips = synthetic_clips(30)
    with pytest.raises(ContextFullError, match="does not fit"):
        for clip in clips:
            session.step(clip)


def test_streaming_eos_threshold_forces_speech(model):
    """With base 1.0 the ' ...' token can never be chosen: the threshold processor of the reference."""
    def chooser(base, step):
        return TokenChooser(1, 16, "cpu", SamplingSettings(repetition_penalty=1.0, greedy=True, silence_id=3,
                                                           eos_base=base, eos_step=step))

    logits = torch.zeros(16)
    logits[3] = 10.0
    assert chooser(1.0, 0.0).choose_one(logits, 0) != 3
    assert chooser(0.0, 0.0).choose_one(logits, 0) == 3
    # base + step * k: at step 0 p=0.9 is above 0.5, at step 5 it is below 0.5 + 0.1 * 5
    ramp = chooser(0.5, 0.1)
    assert ramp.choose_one(logits, 0) == 3 and ramp.choose_one(logits, 5) != 3


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 3
    ids = torch.tensor([[1, 5, 5, 7, 49, 0]])
    want = RepetitionPenaltyLogitsProcessor(1.15)(ids, logits.clone())[0]
    chooser = TokenChooser(1, 50, "cpu", SamplingSettings(repetition_penalty=1.15, greedy=True, eos_base=None))
    chooser.add(0, ids[0])
    assert torch.equal(chooser.process(logits.clone(), chooser.counts[:1], torch.tensor([0]))[0], want)


def test_unseeded_rows_draw_together_each_from_its_own_row():
    """With no row seeded, the rows draw together in one call over the batch: each row still draws from its own
    probabilities (top-k 1 leaves one token per row), and seeded rows keep their own generators. The batch's draw is
    ``torch.multinomial``'s own, written out so a CUDA graph can hold it: the same ids from the same generator state."""
    chooser = TokenChooser(4, 50, "cpu", SamplingSettings(repetition_penalty=1.0, greedy=False, top_k=1,
                                                          eos_base=None))
    logits = torch.zeros(4, 50)
    logits[torch.arange(4), torch.tensor([7, 3, 42, 3])] = 5.0
    assert chooser.choose(logits, [2, 0, 3, 1], [0] * 4).tolist() == [7, 3, 42, 3]
    chooser.seed(3, 5)
    assert chooser.choose(logits, [2, 0, 3, 1], [0] * 4).tolist() == [7, 3, 42, 3]
    plain = TokenChooser(4, 50, "cpu", SamplingSettings(repetition_penalty=1.0, greedy=False, eos_base=None))
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    try:
        torch.manual_seed(3)
        want = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
        torch.manual_seed(3)
        got = plain.pick(logits, [None] * 64)
    finally:
        torch.set_rng_state(state)
    assert torch.equal(got, want) and len(set(got.tolist())) > 5


@pytest.mark.parametrize("grid_t,compile", [(1, False), (3, False), (3, True)])
def test_vision_tower_equals_transformers(model, grid_t, compile):
    """Our tower (per-frame attention batched; with ``compile`` its rotary and activation fused by torch.compile,
    as on CUDA) gives transformers' output."""
    from pipeline.engine.vision import patchify
    from pipeline.engine.vision_tower import VisionTower

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2 * grid_t, 112, 168, 3), dtype=np.uint8)
    pv, grid = patchify(frames, model.patches)
    with torch.no_grad():
        out = model.visual(pv, grid_thw=torch.tensor([grid]))
    want = out.pooler_output if hasattr(out, "pooler_output") else out
    tower = VisionTower(model.visual, compile=compile)
    assert (tower.act is not None) == compile  # the fused activation is in use, not the module's
    got = tower(pv, grid)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_vision_tower_compiles_once_for_every_clip_shape(model):
    """The tower's compiled rotary and activation have a dynamic patch count: the opener's shape (6 frames) and a
    1-s clip's (2 frames), and another frame size, reuse one compilation each, so a stream's first 1-s clip does
    not stall its turn compiling again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pipeline.engine.vision import patchify
    from pipeline.engine.vision_tower import VisionTower

    rng = np.random.default_rng(4)
    torch._dynamo.reset()
    counters.clear()
    tower = VisionTower(model.visual, compile=True)
    for t, h, w in ((6, 112, 168), (2, 112, 168), (2, 56, 84)):
        pv, grid = patchify(rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), model.patches)
        tower(pv, grid)
    assert tower.act is not None
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # rotary, activation


def test_vision_tower_runs_uncompiled_when_the_compiler_fails(model, caplog, monkeypatch, tmp_path):
    """A machine where torch.compile cannot build its kernels (here inductor is given a C++ compiler that does not
    exist, so its CPU code generation really fails): the compiled tower falls back to the uncompiled one, logs it,
    and the turn still gets transformers' output."""
    import logging

    import torch._dynamo
    import torch._inductor.config as inductor

    from pipeline.engine.vision import patchify
    from pipeline.engine.vision_tower import VisionTower

    frames = np.random.default_rng(2).integers(0, 256, (2, 56, 84, 3), dtype=np.uint8)
    pv, grid = patchify(frames, model.patches)
    with torch.no_grad():
        out = model.visual(pv, grid_thw=torch.tensor([grid]))
    want = out.pooler_output if hasattr(out, "pooler_output") else out
    torch._dynamo.reset()  # nothing compiled earlier (in this process, or on disk) may stand in for the compilation
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    tower = VisionTower(model.visual, compile=True)
    with caplog.at_level(logging.WARNING), inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        got = tower(pv, grid)
    assert "torch.compile of the vision tower failed" in caplog.text
    assert tower.act is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tower(pv, grid), want, rtol=1e-5, atol=1e-5)  # and it stays uncompiled


def test_compiled_prefill_equals_eager(model, caplog, monkeypatch, tmp_path):
    """The prefill's norms, rotary and SiLU compiled with a dynamic token count (``TextModel.compile_prefill``, on by
    default on CUDA) give the eager prefill's logits and cache, for turns of two lengths (two rows together, then one
    row on top of its past); and when the compiler cannot build its kernels (inductor given a C++ compiler that does
    not exist) the prefill logs it, runs eager from then on, and the turn still gets the same logits."""
    import logging

    import torch._dynamo
    import torch._inductor.config as inductor

    from pipeline.engine.runner import ModelRunner

    rng = np.random.default_rng(3)
    vocab = model.hf.lm_head.weight.shape[0]
    turns = [[int(t) for t in rng.integers(0, vocab, n)] for n in (37, 52, 29)]

    def run(compiled: bool):
        r = ModelRunner(model, slots=2, capacity=256, graphs=False, compile=False)
        if compiled:
            r.model.compile_prefill()
            r.prefill_compiled = True
        pos = [torch.arange(len(t)).expand(3, len(t)) for t in turns]
        a = r.prefill([(0, turns[0], pos[0], None), (1, turns[1], pos[1], None)])
        b = r.prefill([(0, turns[2], pos[2] + len(turns[0]), None)])
        keys = r.cache.k[:, :, :, :len(turns[0]) + len(turns[2])].clone()
        return a, b, keys, r

    from torch._dynamo.utils import counters

    want = run(False)
    torch._dynamo.reset()
    counters.clear()
    got = run(True)
    assert got[3].prefill_compiled  # the compiled path ran, for both token counts
    # one graph each for pre_attention and post_attention, whatever the turn length (89 tokens, then 29)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()  # nothing compiled earlier (in this process, or on disk) may stand in for the compilation
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with caplog.at_level(logging.WARNING), inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        broken = run(True)
    assert "torch.compile of the prefill failed" in caplog.text
    assert not broken[3].prefill_compiled
    for g, w in zip(broken[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_long_first_turn_needs_no_mask_memory():
    """A 12,000-token first turn (``livecc ask`` prefills a whole recorded video at once) on the CPU: SDPA's own
    causal kernel, no (T, T) mask. The masked path held a 1.1 GB mask and 2.3 GB of scores for it (tiny model,
    2 query heads per KV head); the prefill now grows the process by far less than the mask alone."""
    import subprocess
    import sys

    code = f"""
import resource, torch
torch.set_num_threads(1)
from pipeline.engine import load_model
from pipeline.engine.runner import ModelRunner
m = load_model({str(tiny_checkpoint("small"))!r}, device="cpu")
r = ModelRunner(m, slots=1, capacity=12288, graphs=False)
ids = torch.randint(0, 4000, (12000,), generator=torch.Generator().manual_seed(0)).tolist()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
logits = r.prefill([(0, ids, torch.arange(12000).expand(3, 12000), None)])
assert torch.isfinite(logits).all() and r.cache.length(0) == 12000
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mb = int(out.stdout.split()[-1])
    print(f"peak memory grew {grown_mb} MB")
    assert grown_mb < 500, grown_mb


def test_merge_attention_equals_attention_over_all_keys():
    """The prefill's split attention (a past block through cuDNN, the rest through FlashAttention) is put back
    together by ``merge_attention`` from each part's output and log-sum-exp: equal to attending over all keys."""
    from pipeline.engine.model import merge_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, 8, generator=g)  # (N queries, H heads, d)
    k, v = torch.randn(16, 3, 8, generator=g), torch.randn(16, 3, 8, generator=g)  # (S keys, H, d)

    def attention(keys, values):  # (N, H, d) and the log-sum-exp (N, H) of the scaled scores
        s = torch.einsum("nhd,shd->nhs", q, keys) / 8 ** 0.5
        return torch.einsum("nhs,shd->nhd", s.softmax(-1), values), s.logsumexp(-1)

    full, _ = attention(k, v)
    o1, l1 = attention(k[:11], v[:11])
    o2, l2 = attention(k[11:], v[11:])
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2), full, rtol=1e-5, atol=1e-6)


def test_merge_splits_equals_attention_over_all_keys():
    """The past block's attention in S parts (the batch of one cuDNN call) is put back together by ``merge_splits``
    from each part's output and log-sum-exp: equal to attending over all keys, its log-sum-exp too."""
    from pipeline.engine.model import merge_splits

    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 3, 8, generator=g)
    k, v = torch.randn(18, 3, 8, generator=g), torch.randn(18, 3, 8, generator=g)

    def attention(keys, values):
        s = torch.einsum("nhd,shd->nhs", q, keys) / 8 ** 0.5
        return torch.einsum("nhs,shd->nhd", s.softmax(-1), values), s.logsumexp(-1)

    full, full_lse = attention(k, v)
    parts = [attention(k[i:i + 6], v[i:i + 6]) for i in (0, 6, 12)]
    o, lse = merge_splits(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    torch.testing.assert_close(o, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits,compiled", [(1, False), (3, False), (3, True)])
def test_attend_past_in_parts_equals_attention_over_the_whole_block(monkeypatch, caplog, model, splits, compiled):
    """``TextModel.attend_past`` stacks a KV head's query heads as rows and, with ``splits`` > 1, hands cuDNN the
    block's keys as that many batches (views of the cache row); cuDNN itself needs CUDA, so here its op is
    PyTorch's math attention with the same outputs (o, log-sum-exp (B, H, S, 1)): the layout around it is what is
    checked — the result equals grouped-query attention over every key of the block, for 1 and 3 parts, with the
    merge eager and compiled (``compile_prefill``: CPU inductor here) at two turn lengths."""
    from pipeline.engine.model import TextModel

    def math_attention(q, k, v, bias, lse, dropout, causal, scale_given, **_):
        assert not causal and bias is None and k.shape[0] == q.shape[0]
        s = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
        return (s.softmax(-1) @ v.float()).to(q.dtype), s.logsumexp(-1, keepdim=True)

    m = TextModel(model.hf)
    if compiled:
        for name in ("torch._inductor.compile_fx", "torch.utils.flop_counter"):  # before the op is replaced:
            importlib.import_module(name)  # the compiler's own registrations name the real op
        m.compile_prefill()
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", math_attention)
    H, KV, D = m.n_heads, m.n_kv, m.head_dim
    g = torch.Generator().manual_seed(2)
    P, cap = 24, 40
    for n in (7, 11):
        q = torch.randn(n, H, D, generator=g)
        cache_k, cache_v = torch.randn(1, KV, cap, D, generator=g), torch.randn(1, KV, cap, D, generator=g)
        keys, values = cache_k[:, :, :P], cache_v[:, :, :P]  # a cache row's first P keys: strided, as KVCache.row
        o, lse = m.attend_past(q, keys, values, splits)
        k = keys[0].repeat_interleave(H // KV, 0)  # (H, P, d): each query head's KV head
        v = values[0].repeat_interleave(H // KV, 0)
        s = torch.einsum("nhd,hpd->nhp", q, k) / D ** 0.5
        torch.testing.assert_close(o, torch.einsum("nhp,hpd->nhd", s.softmax(-1), v), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse, s.logsumexp(-1), rtol=1e-4, atol=1e-5)
    assert "runs eager" not in caplog.text  # compiled, not fallen back
    with pytest.raises(ValueError, match="do not split"):
        m.attend_past(q, cache_k[:, :, :25], cache_v[:, :, :25], 3)


def test_a_fused_merge_that_fails_to_compile_runs_eager_from_then_on(caplog):
    """``model.fused``: a function that torch.compile cannot take whole (here a data-dependent branch, a graph
    break under fullgraph) is run eager with a warning, then eager for good; its results are the function's own.
    Without the fallback the compiler's error would reach the prefill (and, being a RuntimeError, be taken for a
    cuDNN failure there)."""
    from pipeline.engine.model import fused

    calls = []

    def merge(x):
        calls.append(1)
        if x.sum() > 0:  # data-dependent control flow: fullgraph compilation fails
            return x * 2
        return x

    f = fused(merge)
    x = torch.ones(4)
    with caplog.at_level("WARNING", logger="pipeline.engine.model"):
        assert torch.equal(f(x), x * 2)
    assert "runs eager from now on" in caplog.text
    caplog.clear()
    assert torch.equal(f(-x), -x) and caplog.text == ""  # eager, no second attempt to compile


def test_the_compiled_decode_step_equals_the_eager_one_and_stores_its_keys(model):
    """The decode step as CUDA compiles it, here with CPU inductor: ``pre_attention_store`` writes each row's new key
    and value into the cache from the compiled function (index tensors only, in place), and the one-row step, compiled
    apart with coordinate-descent tuning, computes its products as multiply-and-sum reductions (``model.linear``) and
    its MLP in two compiled parts (``model.post_in_two``).
    Logits and the stored keys equal the eager step's for one row and for three."""
    import torch._dynamo

    from pipeline.engine.runner import ModelRunner

    results = []
    for compiled in (False, True):
        gen = torch.Generator().manual_seed(0)  # the same cache and inputs for both
        torch._dynamo.reset()
        r = ModelRunner(model, slots=3, capacity=256, graphs=False, compile=False)
        m = r.model
        for s in range(3):
            r.cache.lengths[s] = 20 + 7 * s
            r.cache.k[:, s].normal_(generator=gen), r.cache.v[:, s].normal_(generator=gen)
        if compiled:
            m.compile(None, {"coordinate_descent_tuning": True})
        out = []
        for nb in (1, 3):
            x = torch.randn(nb, m.hidden, generator=gen, dtype=m.dtype)
            at = torch.tensor(r.cache.lengths[:nb])
            pos = at + 5
            out.append(r.decode_step(x, pos, at, window=r.windows[0]))
        if compiled:
            assert m.step_fns(1) is m.one_row and m.one_row[1] is not m.post  # the one-row functions ran
        results.append((out, r.cache.k.clone(), r.cache.v.clone()))
    (eager, ke, ve), (comp, kc, vc) = results
    for a, b in zip(eager, comp):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert torch.allclose(ke, kc, atol=1e-5) and torch.allclose(ve, vc, atol=1e-5)
    assert not torch.equal(kc[:, 0, :, 20], torch.zeros_like(kc[:, 0, :, 20]))  # written at each row's length

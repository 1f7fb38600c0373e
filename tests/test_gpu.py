"""Checks that need CUDA (skipped elsewhere; run on the lent GPU: `python3 -m pytest tests/test_gpu.py`)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("splits", [1, 3])
def test_varlen_prefill_equals_masked_attention(monkeypatch, splits):
    """The CUDA prefill (one FlashAttention varlen call per layer over every row, in place in the cache; on Hopper
    with the past's ``PAST_BLOCK``-key blocks through cuDNN, each in ``PAST_SPLIT`` parts, merged by log-sum-exp)
    against the masked row-by-row SDPA path: three rows of different pasts (two blocks in one, one in another),
    given out of slot order, two prefills; for the engine's blocks (split 1) and for blocks of 3,072 keys in 3 parts
    of one cuDNN call (``--past-split 3``)."""
    from pipeline.engine import load_model
    from pipeline.engine import runner
    from pipeline.engine.runner import ModelRunner

    if splits > 1:
        monkeypatch.setattr(runner, "PAST_SPLIT", splits)
        monkeypatch.setattr(runner, "PAST_BLOCK", 1024 * splits)
    from pipeline.fixtures.tiny import tiny_checkpoint

    model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)

    def turn(slot, start, n):
        return slot, torch.randint(0, 4000, (n,), generator=gen).tolist(), torch.arange(start, start + n).expand(3, n), None

    first = [turn(2, 0, 6200), turn(0, 0, 90), turn(1, 0, 3100)]
    second = [turn(1, 3100, 100), turn(2, 6200, 386), turn(0, 90, 386)]
    out = []
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    for flash, cudnn in ((True, True), (True, False), (False, False)):
        r = ModelRunner(model, slots=3, capacity=8192, graphs=False)
        assert r.flash and r.cudnn_past == hopper
        r.flash, r.cudnn_past = flash, cudnn and hopper
        out.append((r.prefill(first), r.prefill(second), r.cache))
        assert r.cudnn_past == (cudnn and hopper)  # cuDNN did not fail over to FlashAttention
    (b1, b2, cb) = out[-1]
    for a1, a2, ca in out[:-1]:
        for got, want in ((a1, b1), (a2, b2)):
            cos = F.cosine_similarity(got, want, dim=-1)
            assert cos.min().item() > 0.999, cos
            assert (got.argmax(-1) == want.argmax(-1)).all()
        assert ca.lengths == cb.lengths == [476, 3200, 6586]
        for slot, n in enumerate(ca.lengths):
            assert torch.equal(ca.k[:1, slot, :, :n], cb.k[:1, slot, :, :n])  # layer 0's keys: same inputs, same scatter


def test_varlen_decode_is_as_close_to_float32_as_masked_attention():
    """bf16 decode steps replayed from CUDA graphs: the split-KV Triton kernels (the engine's default) and
    FlashAttention varlen, each over each row's used keys in place in the cache, and the grouped matmuls over a
    masked window (whose scores round to bf16), each against the same steps in float32; rows of different lengths
    (one past two 512-key splits, one past three), one sitting out (slot 1), out of slot order, 20 teacher-forced
    steps."""
    from pipeline.engine import load_model
    from pipeline.engine.runner import ModelRunner
    from pipeline.fixtures.tiny import tiny_checkpoint

    gen = torch.Generator().manual_seed(0)
    turns = [(s, torch.randint(0, 4000, (n,), generator=gen).tolist(), torch.arange(n).expand(3, n), None)
             for s, n in ((0, 700), (1, 33), (2, 90), (3, 1500))]
    feed = torch.randint(0, 4000, (20, 3), generator=gen)
    slots = [3, 0, 2]
    logits = {}
    ways = (("split-kv", "bfloat16", True, True), ("flash", "bfloat16", True, False),
            ("masked", "bfloat16", False, False), ("fp32", "float32", False, False))
    for name, dtype, flash, split_kv in ways:
        model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype=dtype)
        r = ModelRunner(model, slots=4, capacity=4096, graphs=True, compile=False)
        assert r.flash == r.split_kv == (dtype == "bfloat16")
        r.prefill(turns)
        r.flash, r.split_kv = flash, split_kv
        steps = []
        for t in range(feed.shape[0]):
            pos = [r.cache.length(s) for s in slots]
            steps.append(r.decode_logits(slots, feed[t].cuda(), pos))
        logits[name] = torch.stack(steps)
        assert r.cache.lengths == [720, 33, 110, 1520]
    ref = logits["fp32"]
    cos = {k: F.cosine_similarity(logits[k], ref, dim=-1) for k in ("split-kv", "flash", "masked")}
    same = {k: (logits[k].argmax(-1) == ref.argmax(-1)).float().mean().item() for k in cos}
    for k in cos:
        print(f"{k}: logits cosine to float32 mean {cos[k].mean().item():.5f} min {cos[k].min().item():.5f}, "
              f"same argmax {same[k]:.0%}")
    for k in ("split-kv", "flash"):
        assert cos[k].min().item() > 0.99
        assert cos[k].mean().item() >= cos["masked"].mean().item() - 1e-3
        assert same[k] >= same["masked"] - 0.05


def test_split_kv_decode_attention_in_bfloat16_against_float32_and_replayed_at_new_lengths():
    """decode_attention on the 7B's attention shape (28 query heads, 4 KV heads, 128) in bf16 against float32
    attention, rows at 1 .. 20k keys; then replayed from a CUDA graph after the lengths changed (one graph serves
    every length up to its window), and a row alone equal to the same row in the batch, bit for bit."""
    from pipeline.engine.decode_attention import decode_attention

    H, KV, D, cap = 28, 4, 128, 20480
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(4, KV, cap, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(4, KV, cap, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(4, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)

    def want(used):
        out = []
        for b, n in enumerate(used.tolist()):
            kk, vv = (t[b, :, :n].float().repeat_interleave(H // KV, 0) for t in (k, v))
            s = torch.einsum("hd,hld->hl", q[b].float(), kk) * D ** -0.5
            out.append(torch.einsum("hl,hld->hd", s.softmax(-1), vv))
        return torch.stack(out)

    used = torch.tensor([1, 511, 9000, 20480], dtype=torch.int32, device="cuda")
    err = (decode_attention(q, k, v, used, cap).float() - want(used)).abs().max().item()
    assert err < 2e-2, err  # bf16 output of values ~ N(0, 1) averaged: rounding of the last bits
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode_attention(q, k, v, used, cap)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, k, v, used, cap)
    used.copy_(torch.tensor([20480, 3, 513, 12000], dtype=torch.int32))
    g.replay()
    err = (out.float() - want(used)).abs().max().item()
    assert err < 2e-2, err
    alone = decode_attention(q[2:3], k[2:], v[2:], used[2:3], 1024)  # 1 and 4 rows: the same split length
    assert torch.equal(alone[0], out[2])


def test_split_kv_kernels_compile_once_for_every_window():
    """A new attention window (a new decode-step graph, every 2048 keys mid-stream) must not compile the split-KV
    kernels again: Triton specializes on whether integer arguments divide by 16, so the scratch space is padded
    to keep its strides' divisibility (an unpadded scratch compiled again at 8k keys: one 655-ms turn)."""
    from pipeline.engine import decode_attention as da

    H, KV, D, cap = 28, 4, 128, 32768
    k = torch.randn(1, KV, cap, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, H, D, device="cuda", dtype=torch.bfloat16)
    _, split_kv, merge = da._kernels()

    def compiled() -> list[int]:  # kernels each has compiled so far (other tests' shapes included)
        if not all(hasattr(fn, "device_caches") for fn in (split_kv, merge)):
            pytest.skip("this Triton keeps its compiled kernels elsewhere")
        return [sum(len(c[0]) for c in fn.device_caches.values()) for fn in (split_kv, merge)]

    windows = (1024,) + tuple(range(2048, cap + 1, 2048))
    da.decode_attention(q, k, k, torch.tensor([1000], dtype=torch.int32, device="cuda"), windows[0])
    first = compiled()
    for window in windows[1:]:
        da.decode_attention(q, k, k, torch.tensor([window - 5], dtype=torch.int32, device="cuda"), window)
    torch.cuda.synchronize()
    assert compiled() == first


@pytest.mark.parametrize("compile", [False, True])
def test_graph_decode_agrees_with_plain_decode(compile):
    """Tiny checkpoint in float32 on the GPU: CUDA-graph (and compiled) decode vs the eager plain step."""
    import numpy as np

    from pipeline.engine import EngineConfig, StreamingSession, load_model
    from pipeline.fixtures.tiny import tiny_checkpoint
    from pipeline.types import Clip

    model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype="float32")
    rng = np.random.default_rng(0)
    clips = [Clip(rng.integers(0, 256, (6, 112, 168, 3), dtype=np.uint8), tuple(np.arange(6) * 0.5))]
    clips += [Clip(rng.integers(0, 256, (2, 112, 168, 3), dtype=np.uint8), (2.0 + k, 2.5 + k)) for k in range(1, 20)]

    def run(fast):
        s = StreamingSession(model, EngineConfig(greedy=True, fast=fast, compile=compile and fast, max_context=4096))
        return [s.step(c).token_ids for c in clips]

    plain, fast = run(False), run(True)
    same = sum(a == b for a, b in zip(plain, fast)) / len(plain)
    print(f"turns with identical tokens: {same:.0%}")
    # the graphs replay the very step that runs eagerly; compiled, its small kernels are fused
    assert same == 1.0 if not compile else same >= 0.9


@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_lowbit_kernel_on_the_7b_shapes_eager_compiled_and_in_a_graph(mode, monkeypatch):
    """engine.quantize int4's and fp8's one-row kernels (pipeline/engine/int4.py, fp8.py) on LiveCC-7B's matrix
    shapes (tiled) and one that does not tile, in bfloat16: against the dequantized weight in float32, called
    eagerly, compiled (the custom operator inside inductor's graph) and replayed from a CUDA graph; their
    several-rows kernels (2 to 64 rows: the inline PTX conversions and ``wgmma`` that the CPU's interpreter does
    not run) the same ways; and several rows with a dynamic count compiled (the prefill's path: blocks of
    dequantized rows)."""
    from pipeline.engine.fp8 import Fp8Weight
    from pipeline.engine.int4 import Int4Weight

    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    cls = {"int4": Int4Weight, "fp8": Fp8Weight}[mode]
    torch.manual_seed(0)
    # q|k|v, down, gate|up, lm_head (tiled); a shape that is not (plain layout, masked tails, the inline asm too)
    for n, k in ((4608, 3584), (3584, 18944), (37888, 3584), (151936, 3584), (100, 640)):
        torch._dynamo.reset()  # a new weight a shape: the lambdas below would exceed dynamo's recompile limit
        q = cls.from_float(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        assert q.tiled == (n != 100) and q.packed.dtype == torch.int32
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ q.dequantize(torch.float32).T
        compiled = torch.compile(lambda x: q.linear(x) * 2, fullgraph=True)
        static = x.clone()
        out = compiled(static)  # compiled before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(static)
        graph.replay()
        for got in (q.linear(x).float(), compiled(x).float() / 2, out.float() / 2):
            err = ((got - want).norm() / want.norm()).item()
            assert err < 5e-3, (n, k, err)  # bfloat16 output rounding (2^-9 relative) and float32 sums
        fmt = importlib.import_module(f"pipeline.engine.{mode}")
        xs = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)  # a few rows: the engine's way, then row-wise
        wants = xs.float() @ q.dequantize(torch.float32).T
        assert ((q.linear(xs).float() - wants).norm() / wants.norm()).item() < 5e-3
        with monkeypatch.context() as rowwise:
            rowwise.setattr(fmt, "BATCH_KERNEL", False)
            assert ((q.linear(xs).float() - wants).norm() / wants.norm()).item() < 5e-3
        # the several-rows kernel (BATCH_KERNEL), eager, compiled and from a graph
        tensors = (q.packed, q.scale) if mode == "fp8" else (q.packed, q.scale, q.zero)
        product = lambda x: fmt.gemv(x, *tensors, q.config, q.tiled)  # noqa: E731
        for rows in (2, 5, 33, fmt.BATCH_ROWS):
            xs = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            wants = xs.float() @ q.dequantize(torch.float32).T
            got = product(xs)
            assert got.shape == (rows, n) and got.dtype == torch.bfloat16
            assert ((got.float() - wants).norm() / wants.norm()).item() < 5e-3, (n, k, rows)
        torch._dynamo.reset()
        batch = torch.compile(lambda x: product(x) * 2, fullgraph=True)
        static = xs.clone()
        batch(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = batch(static)
        graph.replay()
        assert ((out.float() / 2 - wants).norm() / wants.norm()).item() < 5e-3
        if n == 4608:  # torch 2.11's dynamo could not trace slice.indices there: the compiled prefill fell back
            many = torch.compile(lambda x, w: w.linear(x), fullgraph=True, dynamic=True)
            for t in (386, 700):
                xt = torch.randn(1, t, k, device="cuda", dtype=torch.bfloat16)
                wt = xt.float() @ q.dequantize(torch.float32).T
                assert ((many(xt, q).float() - wt).norm() / wt.norm()).item() < 5e-3


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8", "int4-rowwise", "fp8-rowwise"])
def test_quantized_decode_agrees_with_bfloat16(mode, monkeypatch):
    """engine.quantize on CUDA (tiny checkpoint in bfloat16, random weights): the quantized runner on the engine's
    default path (CUDA graphs + compiled decode step) against the bfloat16 one over 1,000 teacher-forced decode
    steps, then whole turns through the engine: two batched rows, one evicting (window), one rolling over. Prints
    what it saw. int4 and fp8 take the format's several-rows kernel (``BATCH_KERNEL``) for the two batched rows;
    int4-rowwise, fp8-rowwise: without it (the one-row kernel a row at a time); the rows each kernel launch was
    given are recorded (at compile warm-up and graph capture, where the operator's Python runs) and checked."""
    rowwise = mode.endswith("-rowwise")
    mode = mode.split("-")[0]
    launched: set[int] = set()  # the row counts the format's kernels were launched with
    if mode != "int8":
        fmt = importlib.import_module(f"pipeline.engine.{mode}")
        monkeypatch.setattr(fmt, "BATCH_KERNEL", not rowwise)
        launch = fmt.launch
        monkeypatch.setattr(fmt, "launch", lambda x, *a, **k: launched.add(x.shape[0]) or launch(x, *a, **k))
    import random

    import numpy as np

    from pipeline.engine import EngineConfig, StreamingSession, load_model, make_core
    from pipeline.engine.quantize import decode_agreement
    from pipeline.engine.runner import ModelRunner
    from pipeline.fixtures.tiny import tiny_checkpoint
    from pipeline.types import Clip

    from pipeline.engine.quantize import QuantizeError, check

    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(QuantizeError, match="needs CUDA compute capability 8.9"):
            check(mode, torch.device("cuda"), torch.bfloat16)
        pytest.skip("fp8 needs compute capability 8.9: refused at start, as it should be")
    if mode != "int8":
        with pytest.raises(QuantizeError, match="runs in bfloat16"):
            check(mode, torch.device("cuda"), torch.float32)
    ckpt = str(tiny_checkpoint("small"))
    ref = load_model(ckpt, device="cuda", dtype="bfloat16")
    q = load_model(ckpt, device="cuda", dtype="bfloat16", quantize=mode)
    assert q.weight_bytes < ref.weight_bytes
    from pipeline.engine.model import language_parts

    from pipeline.engine.quantize import embeddings_fit

    text, head = language_parts(q.hf)  # a GPU with room (this one) holds the embeddings: no host lookup per step
    assert text.embed_tokens.weight.device.type == "cuda"
    assert embeddings_fit(torch.empty(1000, 128, device="meta"), torch.device("cuda"))
    free = torch.cuda.mem_get_info()[0]  # a table as large as the free memory stays in host memory
    assert not embeddings_fit(torch.empty(free // 2, 1, dtype=torch.bfloat16, device="meta"), torch.device("cuda"))
    runner = ModelRunner(q, slots=2, capacity=4096, graphs=True, compile=True)
    random.seed(0)
    prompt = [random.randrange(4000) for _ in range(200)]
    got = decode_agreement(ModelRunner(ref, slots=1, capacity=4096, graphs=True, compile=False), runner, prompt, 1000)
    print(mode, got, f"weights {q.weight_bytes} vs {ref.weight_bytes} bytes")
    assert runner.graphs.compile, "the compiled decode step fell back to eager with quantized weights"
    # A broken kernel gives NaN or cosine ~0 (fp8 gave NaN before its zero-row guard). Measured on an H200 with this
    # tiny random-weight model (hidden 128: one int4 group per row, near-tied logits), cosine mean / argmax:
    # int8 0.997 / 86 %, fp8 0.958 / 55 %, int4 0.828 / 27 %; the bounds sit below those, not at a quality target
    assert got["cosine_mean"] > {"int8": 0.99, "fp8": 0.93, "int4": 0.78}[mode]
    assert got["argmax_agree"] >= {"int8": 0.75, "fp8": 0.4, "int4": 0.18}[mode]

    rng = np.random.default_rng(0)
    cfgs = [EngineConfig(greedy=True, max_context=4096, context="window", window_seconds=3.0, quantize=mode),
            EngineConfig(greedy=True, max_context=4096, context="rollover", rollover_seconds=6.0, quantize=mode)]
    core = make_core(q, cfgs[0], slots=2)
    assert core.runner.prefill_compiled, "the compiled prefill fell back to eager with quantized weights"
    sessions = [StreamingSession(q, cfg, core=core) for cfg in cfgs]
    for k in range(12):
        n, times = (6, tuple(np.arange(6) * 0.5)) if k == 0 else (2, (2.0 + k, 2.5 + k))
        reqs = [s.video_request(Clip(rng.integers(0, 256, (n, 112, 168, 3), dtype=np.uint8), times))
                for s in sessions]
        for s, req, res in zip(sessions, reqs, core.run(reqs)):
            s.finish(req, res)
    assert core.steps > 0 and sessions[0].evicted_turns > 0 and sessions[1].rollovers > 0
    if mode != "int8":  # two streams' decode step: one launch of the several-rows kernel, or one a row
        assert 1 in launched and (max(launched) == 1 if rowwise else 2 in launched), launched


def test_make_core_compiles_every_decode_batch_size_before_the_first_stream():
    """``make_core`` on CUDA compiles the prefill and compiles and captures the decode step for every batch-size
    bucket its cache can run (3 slots: buckets 1, 2, 4 capped at 3 -> 1, 2, 3), leaving every row empty; a stream's
    first turns then capture no new batch size (only new attention windows, which compile nothing)."""
    import numpy as np

    from pipeline.engine import EngineConfig, StreamingSession, load_model, make_core
    from pipeline.fixtures.tiny import tiny_checkpoint
    from pipeline.types import Clip

    model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype="bfloat16")
    cfg = EngineConfig(greedy=True, max_context=4096)
    core = make_core(model, cfg, slots=3)
    graphs = core.runner.graphs
    assert {key[0] for key in graphs.graphs} == {1, 2, 3}
    assert core.runner.cache.lengths == [0, 0, 0]
    sessions = [StreamingSession(model, cfg, core=core) for _ in range(3)]
    rng = np.random.default_rng(0)
    for k in range(3):
        n, times = (6, tuple(np.arange(6) * 0.5)) if k == 0 else (2, (2.0 + k, 2.5 + k))
        reqs = [s.video_request(Clip(rng.integers(0, 256, (n, 112, 168, 3), dtype=np.uint8), times)) for s in sessions]
        for s, req, res in zip(sessions, reqs, core.run(reqs)):
            s.finish(req, res)
    assert {key[0] for key in graphs.graphs} == {1, 2, 3}


def test_compiling_the_decode_steps_never_copies_the_kv_cache_to_host_memory(monkeypatch):
    """Inductor's autotuner saves every argument a kernel writes before it benchmarks the kernel's candidate
    configurations, to pinned host memory when a copy on the GPU would raise the peak
    (``CachingAutotuner.copy_args_to_cpu_if_needed``). With the decode step's cache store inside the tuned step,
    that argument was the whole cache, copied out and back for every candidate: compiling 32 streams' decode steps
    on the H200 (28 GiB of keys) ran past 400 s. The store is now compiled apart and never autotuned: warming up
    every batch size of a 6-slot runner (fresh compilations, no cached tuning) copies nothing to host memory."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime import triton_heuristics

    from pipeline.engine import load_model
    from pipeline.engine.runner import ModelRunner
    from pipeline.fixtures.tiny import tiny_checkpoint

    copied = []
    save = triton_heuristics.CachingAutotuner.copy_args_to_cpu_if_needed

    def spy(self, *args, **kwargs):
        out = save(self, *args, **kwargs)
        copied.extend((self.fn.__name__, name) for name in out)
        return out

    monkeypatch.setattr(triton_heuristics.CachingAutotuner, "copy_args_to_cpu_if_needed", spy)
    torch._dynamo.reset()
    model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype="bfloat16")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the peak is now what is allocated: no room for a copy of the cache
    with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False):
        runner = ModelRunner(model, slots=6, capacity=8192, graphs=True, compile=True)
        runner.warm_up()
    assert {key[0] for key in runner.graphs.graphs} == {1, 2, 4, 6} and runner.graphs.compile
    assert not copied, copied


def test_a_decode_step_is_launched_without_waiting_for_the_step_before():
    """Overlap: while one decode step runs, the core launches the next (fed the token still on the device) with no
    stream sync (``torch.cuda.set_sync_debug_mode("error")`` raises on any) other than reading the step before, for
    greedy and seeded sampling, rows ending at different steps. (That the tokens equal those of the reference
    loop with the overlap undone at each turn's end: tests/test_parity.py, tests/test_batching.py.)"""
    import numpy as np

    from pipeline.engine import EngineConfig, StreamingSession, load_model, make_core
    from pipeline.fixtures.tiny import tiny_checkpoint
    from pipeline.types import Clip

    model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype="bfloat16")
    for greedy in (True, False):
        cfg = EngineConfig(greedy=greedy, max_context=4096, max_new_tokens=12)
        core = make_core(model, cfg, slots=2)
        sessions = [StreamingSession(model, cfg, core=core, seed=7 + i) for i in range(2)]
        rng = np.random.default_rng(0)
        clip = Clip(rng.integers(0, 256, (6, 112, 168, 3), dtype=np.uint8), tuple(np.arange(6) * 0.5))
        reqs = [s.video_request(clip) for s in sessions]
        core._prefill(reqs)
        core._decode_step()  # the first step is in flight, nothing read yet
        launches = 0
        real_read = core._read

        def read(step):  # the one wait of a step: for the step before it, after this one is launched
            torch.cuda.set_sync_debug_mode(0)
            try:
                return real_read(step)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        core._read = read
        torch.cuda.set_sync_debug_mode("error")
        try:
            while core.active:
                core._decode_step()
                launches += 1
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert launches >= 2


def test_a_lone_rows_prefill_replayed_from_its_graph_equals_the_eager_prefill():
    """``PrefillGraphs``: a stream's turns of one length are captured at the second and replayed after; logits and
    the keys written equal those of the eager prefill (same turns on a runner without prefill graphs)."""
    import numpy as np

    from pipeline.engine import EngineConfig, StreamingSession, load_model, make_core
    from pipeline.fixtures.tiny import tiny_checkpoint
    from pipeline.types import Clip

    model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype="bfloat16")
    cfg = EngineConfig(greedy=True, max_context=4096, max_new_tokens=4)
    cores = [make_core(model, cfg, slots=2) for _ in range(2)]
    pg = cores[0].runner.prefill_graphs
    assert not pg.graphs and not pg.seen  # the warm-up's turns (eager) neither captured nor counted
    cores[1].runner.prefill_graphs = None
    logits = [[], []]
    for core, out in zip(cores, logits):
        real = core.runner.prefill

        def spy(turns, real=real, out=out):
            out.append(real(turns).clone())
            return out[-1]

        core.runner.prefill = spy
    sessions = [StreamingSession(model, cfg, core=core) for core in cores]
    rng = np.random.default_rng(0)
    for k in range(6):
        n, times = (6, tuple(np.arange(6) * 0.5)) if k == 0 else (2, (2.0 + k, 2.5 + k))
        clip = Clip(rng.integers(0, 256, (n, 112, 168, 3), dtype=np.uint8), times)
        for s in sessions:
            s.step(clip)
    graphs = cores[0].runner.prefill_graphs
    assert len(graphs.graphs) == 1 and graphs.enabled
    for a, b in zip(*logits):
        assert torch.allclose(a, b, atol=0.05, rtol=0.02), (a - b).abs().max()
    ca, cb = cores[0].runner.cache, cores[1].runner.cache
    n = ca.length(0)
    assert n == cb.length(0) > 0
    for layer in (0, cores[0].runner.model.n_layers - 1):
        ka, _ = ca.row(layer, 0, n)
        kb, _ = cb.row(layer, 0, n)
        assert torch.allclose(ka.float(), kb.float(), atol=0.05)


def test_a_lone_rows_prefill_graph_reads_whole_blocks_of_past_through_cudnn():
    """On Hopper a prefill graph reads the row's whole ``PAST_BLOCK``-key blocks of past through cuDNN (in
    ``PAST_SPLIT`` parts), as the eager prefill does, keyed by that past: 386-token turns after B + 128 keys (one
    block) and on past 2B (two blocks), replayed
    from their graphs, give the eager prefill's logits and keys; the one-block graph is dropped when the two-block
    one is captured, and cuDNN stays on (its capture did not fail)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the past goes through cuDNN from Hopper on")
    from pipeline.engine import load_model
    from pipeline.engine.runner import PAST_BLOCK as B
    from pipeline.engine.runner import ModelRunner
    from pipeline.fixtures.tiny import tiny_checkpoint

    model = load_model(str(tiny_checkpoint("small")), device="cuda", dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)
    turns = []
    start = 0
    for n in [B + 128] + [386] * ((B - 128) // 386 + 2):
        turns.append((0, torch.randint(0, 4000, (n,), generator=gen).tolist(), torch.arange(start, start + n).expand(3, n),
                      None))
        start += n
    graphed = ModelRunner(model, slots=2, capacity=8192, graphs=True, compile=False)
    eager = ModelRunner(model, slots=2, capacity=8192, graphs=False)
    assert graphed.prefill_graphs is not None and graphed.prefill_graphs.cudnn and eager.cudnn_past
    keys_seen = []
    for t in turns:
        a, b = graphed.prefill([t]), eager.prefill([t])
        keys_seen.append(set(graphed.prefill_graphs.graphs))
        assert torch.allclose(a, b, atol=0.05, rtol=0.02), (a - b).abs().max()
    assert {(0, 386, B)} in keys_seen  # replayed with one block of past through cuDNN ...
    assert keys_seen[-1] == {(0, 386, 2 * B)}  # ... then two, the shorter one dropped
    assert graphed.prefill_graphs.cudnn and graphed.prefill_graphs.enabled
    n = graphed.cache.length(0)
    assert n == eager.cache.length(0) == start
    for layer in (0, graphed.model.n_layers - 1):
        ka, _ = graphed.cache.row(layer, 0, n)
        kb, _ = eager.cache.row(layer, 0, n)
        assert torch.allclose(ka.float(), kb.float(), atol=0.05)

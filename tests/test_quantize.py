"""engine.quantize on the CPU: int8 weight-only (torchao) is the mode that runs here; int4 and fp8 need CUDA
(tests/test_gpu.py). The tiny checkpoint's weights are random, so these check the kernels and the engine's
paths with quantized weights, not caption quality."""

from __future__ import annotations

import gc
import json
import random

import pytest
import torch

from pipeline.engine import EngineConfig, ModelLoadError, load_model
from pipeline.engine.model import language_parts
from pipeline.engine.quantize import QuantizeError, check, decode_agreement
from pipeline.engine.runner import ModelRunner
from pipeline.fixtures.tiny import tiny_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ckpt():
    return str(tiny_checkpoint("small"))


@pytest.fixture(scope="module")
def reference(ckpt):
    return load_model(ckpt, device="cpu")  # float32


@pytest.fixture(scope="module")
def int8(ckpt):
    return load_model(ckpt, device="cpu", quantize="int8")


def ref_ptrs(model) -> set[int]:
    return {p.data_ptr() for p in model.hf.parameters()} | {
        getattr(layer, a).data_ptr() for layer in language_parts(model.hf)[0].layers
        for a in ("qkv_weight", "gate_up_weight") if hasattr(layer, a)}


def test_int8_decode_logits_stay_close_and_weights_shrink(ckpt, reference, int8):
    text, lm_head = language_parts(reference.hf)
    linear = sum(m.weight.numel() * m.weight.element_size() for layer in text.layers
                 for m in (*layer.self_attn.children(), *layer.mlp.children()) if hasattr(m, "weight"))
    linear += lm_head.weight.numel() * lm_head.weight.element_size()
    # float32 -> int8 (+ one float32 scale per row): at least 70% of the linear weights' bytes are gone
    assert int8.quantize == "int8" and reference.quantize == "none"
    assert int8.weight_bytes <= reference.weight_bytes - 0.7 * linear
    # and the float32 matrices are gone, not just uncounted: loading an int8 model leaves no plain tensor of a
    # quantized shape alive (those alive before it, e.g. another test file's model in this worker, do not count)
    layer = ModelRunner(int8, slots=1, capacity=64).model.layers[0]
    shapes = {tuple(w.shape) for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w)}

    def plain_of_those_shapes() -> list:
        gc.collect()
        return [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)
                and tuple(o.shape) in shapes and o.device.type == "cpu" and o.dtype == torch.float32
                and o.data_ptr() not in ref_ptrs(reference)]

    before = {id(o) for o in plain_of_those_shapes()}
    fresh = load_model(ckpt, device="cpu", quantize="int8")
    ModelRunner(fresh, slots=1, capacity=64)
    alive = [o for o in plain_of_those_shapes() if id(o) not in before]
    assert not alive, [tuple(o.shape) for o in alive]
    random.seed(0)
    prompt = [random.randrange(4000) for _ in range(64)]
    got = decode_agreement(ModelRunner(reference, slots=1, capacity=1024), ModelRunner(int8, slots=1, capacity=1024),
                           prompt, steps=100)
    print(got)  # measured: cosine mean 0.9986, min 0.991; argmax agrees on ~90% of steps (random weights, near ties)
    assert got["cosine_mean"] > 0.995 and got["cosine_min"] > 0.97
    assert got["argmax_agree"] >= 0.8


def test_int8_engine_batched_rows_and_context_policies(int8):
    """The quantized model through the whole engine: four streams batched on one core (prefill, decode rows
    joining and leaving, window eviction, rollover, a question) give each stream the tokens it gets alone."""
    from test_batching import STREAMS, TURNS, alone, together

    base = dict(greedy=True, max_context=2048, max_new_tokens=8)
    batched, core = together(int8, base)
    assert core.steps > 0
    for i in (1, 2):  # the rollover and the window-eviction streams
        assert batched[i] == alone(int8, i, base), f"stream {i} differs when batched"
    assert [len(b) for b in batched][:3] == [TURNS + 1, TURNS, TURNS]
    assert STREAMS[1][3]["context"] == "rollover" and STREAMS[2][3]["context"] == "window"


def test_modes_this_device_cannot_run_fail_at_start(ckpt):
    for mode, why in (("int4", "needs a CUDA GPU"), ("fp8", "needs a CUDA GPU")):
        with pytest.raises(ModelLoadError, match=why) as e:
            load_model(ckpt, device="cpu", quantize=mode)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="quantize must be none, int8, int4, fp8"):
        EngineConfig(quantize="int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_modes_asked_for_on_a_machine_without_cuda():
    with pytest.raises(QuantizeError, match=r"runs on cuda, but no CUDA GPU is available\); use int8 or none"):
        check("fp8", torch.device("cuda"), torch.bfloat16)


def test_config_key_and_flag(tmp_path):
    from pipeline.cli import build_parser
    from pipeline.config import ConfigError, load

    p = tmp_path / "c.yaml"
    p.write_text("engine:\n  quantize: int3\n")
    with pytest.raises(ConfigError, match="quantize must be none, int8, int4, fp8"):
        load(p).engine_config()
    p.write_text("engine:\n  quantize: int8\n")
    assert load(p).engine_config().quantize == "int8"
    assert load(None, engine={"quantize": "int4"}).engine_config().quantize == "int4"  # what --quantize sets
    for argv in (["run", "x.mp4", "--quantize", "int4"], ["caption", "x.mp4", "--quantize", "fp8"]):
        assert build_parser().parse_args(argv).quantize == argv[-1]


def test_status_api_and_metrics_say_the_mode_and_weight_bytes(int8, tmp_path):
    """A live pipeline (ffmpeg test source, the real HTTP server) on the int8 model."""
    from test_control import call, start_pipeline

    from pipeline.status import summary

    p, rec, _, base = start_pipeline(int8, tmp_path, extra={"engine": {"model": "tiny", "device": "cpu", "seed": 0,
                                                                       "quantize": "int8"}})
    try:
        rec.wait(lambda c: len(c) >= 1)
        status, body = call(base + "/api/status")
        snap = json.loads(body)
        assert status == 200 and snap["quantize"] == "int8" and snap["weight_bytes"] == int8.weight_bytes > 0
        _, out = call(base + "/metrics")
        text = out.decode()
        value = next(line.split()[-1] for line in text.splitlines() if line.startswith("livecc_weight_bytes "))
        assert float(value) == int8.weight_bytes
        assert 'livecc_quantize{mode="int8"} 1.0' in text
        assert summary(snap)["weights"].startswith("int8, ")
    finally:
        p.stop()


def test_cli_mode_the_device_cannot_run_is_one_line(ckpt):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline", "run", "lavfi:testsrc2=size=320x240:rate=15", "--model",
                        ckpt, "--device", "cpu", "--quantize", "int4", "--status", "off"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        "livecc: error: quantize=int4 needs a CUDA GPU (this engine runs on cpu); use int8 or none"
    assert "Traceback" not in r.stderr


def test_one_row_product_reads_int8_weights_in_one_reduction():
    """Inside the compiled decode step a one-row product with torchao's per-row int8 weights is one reduction over
    the 1-byte codes, scaled after the sum (``model.linear``): the same product as the dequantized matrix, and no
    matrix multiplication call in the generated code (torchao's own dispatch compiles to ``_weight_int8pack_mm``).
    torchao's fp8 weights are not read this way (fp8 is the engine's own format now): not per-row parts."""
    from torch import nn
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import Int8WeightOnlyConfig, PerRow, quantize_
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    from pipeline.engine.model import linear, per_row_parts

    torch.manual_seed(0)
    w = torch.randn(96, 256, dtype=torch.bfloat16) * 0.05
    lin = nn.Linear(256, 96, bias=False, dtype=torch.bfloat16)
    lin.weight = nn.Parameter(w.clone(), requires_grad=False)
    quantize_(lin, Int8WeightOnlyConfig())
    fp8 = nn.Parameter(Float8Tensor.from_hp(w, granularity=PerRow()), requires_grad=False)  # CPU: built directly
    assert per_row_parts(fp8) is None
    x, b = torch.randn(1, 1, 256, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)
    for q in (lin.weight,):
        assert per_row_parts(q) is not None
        want = torch.nn.functional.linear(x.float(), q.dequantize().float(), b.float())
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(linear, fullgraph=True, dynamic=False), x, q, b)
        assert got.shape == (1, 1, 96) and got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()).item() < 0.01, type(q).__name__
        text = "\n".join(code)
        assert "int8pack_mm" not in text and "extern_kernels.mm" not in text and "addmm" not in text, text[-2000:]
    assert per_row_parts(w) is None and per_row_parts(torch.nn.Parameter(w)) is None

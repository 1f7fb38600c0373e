"""A checkpoint that is already quantized (AWQ, GPTQ, bitsandbytes, FP8, ...: a ``quantization_config`` in its
config.json) is refused by ``load_model`` before transformers reads a weight, as one line naming the method and
the ``--quantize`` mode to use on the original checkpoint. Real files: copies of the tiny checkpoint with a
``quantization_config`` added and their weights file overwritten with garbage (were it read, the error would be
another one); the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.engine import ModelLoadError, load_model
from pipeline.engine.config import DEFAULT_MODEL
from pipeline.fixtures.tiny import tiny_checkpoint

LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]

CASES = {  # quantization_config -> (how the message names it, the --quantize mode it suggests)
    "awq_4bit": ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
                 "AWQ 4-bit", "int4"),
    "gptq_8bit": ({"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False, "sym": True},
                  "GPTQ 8-bit", "int8"),
    "gptq_4bit": ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ 4-bit", "int4"),
    "bnb_4bit": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                 "bitsandbytes 4-bit", "int4"),
    "bnb_8bit": ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit", "int8"),
    "fp8": ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "FP8", "fp8"),
    "compressed_fp8": ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
        "compressed-tensors float8", "fp8"),
    "compressed_w4a16": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "group_size": 128}}}},
        "compressed-tensors 4-bit", "int4"),
    "hqq_4bit": ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64}}},
                 "HQQ 4-bit", "int4"),
    "unknown": ({"quant_method": "mystery"}, "mystery", "int4 (or int8)"),
}


def quantized_copy(dest, qc: dict):
    """The tiny checkpoint copied to ``dest`` with ``qc`` as its quantization_config and unreadable weights."""
    shutil.copytree(tiny_checkpoint("small"), dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}, indent=2))
    (dest / "model.safetensors").write_bytes(b"not safetensors: the loader must never read this")
    return dest


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_prequantized_local_checkpoint_is_one_clear_line_before_any_weight_is_read(tmp_path, case):
    qc, named, mode = CASES[case]
    folder = quantized_copy(tmp_path / case, qc)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"{folder} is already quantized ({named}, quantization_config in its config.json); this engine "
                   f"does not load pre-quantized weights: it quantizes the original bfloat16 weights itself. "
                   f"Pass the original checkpoint ({DEFAULT_MODEL}) with --quantize {mode}"), msg


def test_the_same_folder_without_quantization_config_loads(tmp_path):
    """The check looks at the config only: the copy with its real weights and no quantization_config loads."""
    folder = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint("small"), folder)
    assert load_model(str(folder), device="cpu").quantize == "none"


def test_livecc_caption_shows_the_line_and_exits_2(tmp_path):
    folder = quantized_copy(tmp_path / "awq", CASES["awq_4bit"][0])
    r = subprocess.run([*LIVECC, "caption", str(_video()), "--model", str(folder), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("livecc: error: ") and "already quantized (AWQ 4-bit" in lines[0], lines[0]
    assert f"Pass the original checkpoint ({DEFAULT_MODEL}) with --quantize int4" in lines[0], lines[0]


def test_a_cached_hub_id_is_checked_too_offline(tmp_path):
    """A hub id whose config.json is in the local Hugging Face cache: the same line, with no network."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--Qwen2-VL-7B-Instruct-AWQ"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    quantized_copy(snapshot / "snapshots" / commit, CASES["awq_4bit"][0])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([*LIVECC, "caption", str(_video()), "--model", "someone/Qwen2-VL-7B-Instruct-AWQ",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("livecc: error: someone/Qwen2-VL-7B-Instruct-AWQ is already quantized (AWQ 4-bit"), \
        lines[0]


def _video():
    from pipeline.fixtures.testvideo import test_video  # imported here: pytest would collect it as a test

    return test_video(seconds=4)

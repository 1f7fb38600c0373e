"""The tiny LiveCC-style checkpoint (pipeline/fixtures/tiny.py) and the synthetic test video (pipeline/fixtures/testvideo.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.fixtures.testvideo import frame_count, make_test_video, render_frame, test_video
from pipeline.fixtures.tiny import SPECIAL_TOKENS, build_tiny_checkpoint, greedy_turns, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
SYSTEM_PROMPT_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def qwen_ckpt() -> Path:
    return tiny_checkpoint("qwen")


@pytest.fixture(scope="module")
def small_ckpt() -> Path:
    return tiny_checkpoint("small")


@pytest.fixture(scope="module")
def short_video() -> Path:
    return test_video(seconds=4.0)


# ---------------------------------------------------------------- checkpoint files

def test_rebuild_is_byte_identical(tmp_path, small_ckpt, qwen_ckpt):
    a = build_tiny_checkpoint(tmp_path / "a", vocab="small")
    b = build_tiny_checkpoint(tmp_path / "b", vocab="small")
    assert _hashes(a) == _hashes(b) == _hashes(small_ckpt)
    q = build_tiny_checkpoint(tmp_path / "q", vocab="qwen")  # ~3 s
    assert _hashes(q) == _hashes(qwen_ckpt)
    assert build_tiny_checkpoint(tmp_path / "s1", vocab="small", seed=1).joinpath("model.safetensors").read_bytes() \
        != (a / "model.safetensors").read_bytes()


def test_files_and_layout(qwen_ckpt):
    names = {p.name for p in qwen_ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
            "chat_template.json", "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt"} <= names
    cfg = json.loads((qwen_ckpt / "config.json").read_text())
    # the flat 4.5x layout of the real LiveCC/Qwen2-VL config
    assert cfg["model_type"] == "qwen2_vl" and "text_config" not in cfg
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (128, 2, 4, 2, 384, 152064)
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [4, 6, 6]} and cfg["rope_theta"] == 1e6
    assert cfg["tie_word_embeddings"] is False and cfg["max_position_embeddings"] == 32768
    v = cfg["vision_config"]
    assert (v["depth"], v["embed_dim"], v["num_heads"], v["patch_size"], v["spatial_merge_size"],
            v["temporal_patch_size"], v["hidden_size"]) == (2, 64, 4, 14, 2, 2, 128)
    assert (cfg["image_token_id"], cfg["video_token_id"], cfg["vision_start_token_id"]) == (151655, 151656, 151652)

    from safetensors import safe_open

    with safe_open(str(qwen_ckpt / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
            "visual.patch_embed.proj.weight", "visual.merger.mlp.2.weight"} <= keys
    assert all(k.split(".")[0] in ("model", "visual", "lm_head") for k in keys)
    assert not any(k.startswith(("model.language_model", "model.visual")) for k in keys)

    pre = json.loads((qwen_ckpt / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["min_pixels"], pre["max_pixels"], pre["patch_size"], pre["merge_size"],
            pre["temporal_patch_size"]) == (3136, 12845056, 14, 2, 2)


@pytest.mark.parametrize("vocab", ["qwen", "small"])
def test_generation_config(vocab):
    from transformers import AutoTokenizer, GenerationConfig

    d = tiny_checkpoint(vocab)
    tok = AutoTokenizer.from_pretrained(d)
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    g = GenerationConfig.from_pretrained(d)
    assert list(g.eos_token_id) == [im_end, eot]
    assert g.pad_token_id == eot and g.bos_token_id == eot
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty) == (True, 0.7, 0.8, 20, 1.05)


# ---------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("use_fast", [False, True])
def test_qwen_tokenizer_matches_qwen2(qwen_ckpt, use_fast):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_ckpt, use_fast=use_fast)
    assert len(tok) == 151657
    assert tok("Hello world").input_ids == [9707, 1879]
    assert tok(" ...").input_ids == [2503]
    assert tok(SYSTEM_PROMPT).input_ids == SYSTEM_PROMPT_IDS
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(151643, 151657))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    s = "Ein Fuß-Ball 日本語 🎉 ...\n\n  x = f(1234)\t'll"
    assert tok.decode(tok(s).input_ids) == s
    msgs = [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "Hi"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.index("<|im_start|>user") == 58
    assert text.endswith("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_slow_and_fast_agree(qwen_ckpt):
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(qwen_ckpt, use_fast=False)
    fast = AutoTokenizer.from_pretrained(qwen_ckpt, use_fast=True)
    text = (Path(__file__).read_text() + (ROOT / "pipeline" / "fixtures" / "tiny.py").read_text())[:20000]
    assert slow(text).input_ids == fast(text).input_ids


def test_small_tokenizer(small_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_ckpt)
    assert len(tok) == 4096 + 14
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(4096, 4110))
    assert tok(" ...").input_ids == [2503]  # a single token, the same id as in Qwen2
    assert tok("Hello, the answer is ...").input_ids[-1] == 2503
    assert all(i < 4096 for i in tok("Hello world, 日本語").input_ids)
    s = "Hello world 日本語 ... 12"
    assert tok.decode(tok(s).input_ids) == s
    assert tok(SYSTEM_PROMPT).input_ids[0] == 4097


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("vocab", ["qwen", "small"])
def test_model_loads_and_logits(vocab):
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    d = tiny_checkpoint(vocab)
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(d)
    w = model.lm_head.weight.detach()
    zero = (w == 0).all(dim=1)
    emitted = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    for t in SPECIAL_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        assert bool(zero[i]) == (i not in emitted), t
    assert zero[len(tok):].all() and not zero[:len(tok) - len(SPECIAL_TOKENS)].any()
    ids = tok(SYSTEM_PROMPT + "Describe the video.<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    assert 3.5 < float(logits[:, :len(tok)].std()) < 4.5
    assert int(logits[-1].argmax()) < len(tok)


@pytest.mark.parametrize("use_fast", [False, None])
def test_auto_processor_loads(qwen_ckpt, use_fast):
    """transformers' whole Qwen2-VL processor (its video part needs torchvision: in the test extra)."""
    from transformers import AutoProcessor

    kw = {} if use_fast is None else {"use_fast": use_fast}
    proc = AutoProcessor.from_pretrained(qwen_ckpt, **kw)
    assert type(proc).__name__ == "Qwen2VLProcessor"
    assert proc.tokenizer(" ...").input_ids == [2503]
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}]
    assert proc.apply_chat_template(msgs, tokenize=False).index("<|im_start|>user") == 58


@pytest.mark.parametrize("use_fast", [False, True])
def test_processor_parts_load(qwen_ckpt, use_fast):
    """What AutoProcessor loads, minus the torchvision-only video processor."""
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(qwen_ckpt, use_fast=use_fast)
    assert "Qwen2VLImageProcessor" in type(ip).__name__
    assert json.loads((qwen_ckpt / "chat_template.json").read_text())["chat_template"] == \
        json.loads((qwen_ckpt / "tokenizer_config.json").read_text())["chat_template"]


def test_greedy_probe_on_test_video(small_ckpt, short_video):
    """Greedy turns end with EOS in some chunks and hit the cap in others; the video matters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_ckpt)
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    kw = dict(turns=4, max_new_tokens=16, max_pixels=24 * 28 * 28)  # small frames keep it fast
    res = greedy_turns(small_ckpt, short_video, **kw)
    assert len(res) == 4
    ended = [g[-1] in stops for g in res]
    assert any(ended) and not all(ended), res
    assert len({tuple(g) for g in res}) >= 3
    for g in res:
        tok.decode(g)  # every emitted id decodes
    assert res == greedy_turns(small_ckpt, short_video, **kw)


# ---------------------------------------------------------------- cache

def test_cache_parallel_builds(tmp_path):
    env = dict(os.environ, LIVECC_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    code = "from pipeline.fixtures.tiny import tiny_checkpoint; print(tiny_checkpoint('small'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    folder = Path(outs[0])
    assert folder.parent == tmp_path / "cache" and "v" in folder.name
    assert _hashes(folder) == _hashes(tiny_checkpoint("small"))
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_scripts(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), "--vocab", "small",
                          "--out", str(tmp_path / "ck")], capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == tmp_path / "ck" and (tmp_path / "ck" / "model.safetensors").exists()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_video.py"), "--seconds", "1",
                          "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == tmp_path / "v.mp4" and (tmp_path / "v.mp4").stat().st_size > 1000


# ---------------------------------------------------------------- test video

def test_video_rebuild_is_byte_identical(tmp_path, short_video):
    a = make_test_video(tmp_path / "a.mp4", seconds=4.0)
    assert a.read_bytes() == short_video.read_bytes()
    b = make_test_video(tmp_path / "b.mp4", seconds=2.0, audio=True)
    c = make_test_video(tmp_path / "c.mp4", seconds=2.0, audio=True)
    assert b.read_bytes() == c.read_bytes()


def test_video_decodes(short_video):
    import av

    assert frame_count(4.0, 30) == 120
    with av.open(str(short_video)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.width, s.height, s.format.name) == ("h264", 640, 360, "yuv420p")
        assert s.average_rate == 30 and s.frames == 120
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(s)]
    assert len(frames) == 120
    times = [t for t, _ in frames]
    assert times == sorted(times) and abs(times[45] - 1.5) < 1e-6
    for i in (0, 45, 119):
        src = render_frame(i, 640, 360, 30).astype(np.int16)
        got = frames[i][1].astype(np.int16)
        assert got.shape == (360, 640, 3)
        assert np.abs(got - src).mean() < 4  # same picture after H.264 (counter readable by eye)
    assert not np.array_equal(frames[0][1], frames[1][1])


def test_video_with_audio(tmp_path):
    import av

    p = make_test_video(tmp_path / "a.mp4", seconds=2.0, width=322, height=182, fps=25, audio=True)  # h % 4 == 2
    with av.open(str(p)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (322, 182)
        assert [s.type for s in c.streams] == ["video", "audio"]
        a = c.streams.audio[0]
        assert (a.codec_context.name, a.sample_rate, a.channels) == ("aac", 48000, 1)
        assert sum(1 for _ in c.decode(video=0)) == 50


def test_default_test_video():
    import av

    p = test_video()
    assert p == test_video() and p.name == "test.mp4"
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.frames, s.average_rate) == (640, 360, 900, 30)
        assert abs(float(c.duration / av.time_base) - 30.0) < 0.1

"""
nanoVPT tests: pytest, CPU, offline. transformers is the oracle: tiny random checkpoints are built in it, saved in
the Hub file layout, loaded into ours, and the numbers must agree. Without transformers this file fails to import,
which fails the suite (it must never be skipped).
Sections follow the modules: the shared fixtures (tiny checkpoints, tokenizer, images) first, then model.py,
encoders.py, data.py, vpt.py, vpt.py's engine, train.py, sample.py and synth.py. A section uses its own fixtures
and helpers and the shared ones, never another section's.
"""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers  # the parity oracle: a hard requirement of the test suite
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tokenizers import models
from tokenizers import Tokenizer as HFTokenizer
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Dinov2Config, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers import Dinov2Model as HFDinov2Model
from transformers import SamConfig as HFSamConfig
from transformers import SamModel
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.utils.chat_template_utils import render_jinja_template

import data
import encoders
import lora
import model as M
import sample
import synth
import train
import vpt
from data import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, ImageConfig, Tokenizer, encode_chat, load_image,
                  process_dino_image, process_image, process_images, render_chat, smart_resize)
from encoders import DinoConfig


# -----------------------------------------------------------------------------
# shared fixtures and helpers: the tiny Qwen2-VL, tokenizer, DINOv2 and VPT checkpoints, and test images

# ids of the tiny test vocabulary: the Qwen specials sit at the top of a 512-row embedding
VOCAB, VS, VE, IMG = 512, 509, 510, 511


def load_hf(path):
    return Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


CORPUS = ["You are a helpful assistant.", "Describe this image.", "The cat sits on the red mat, next to 3 dogs.",
          "What is in the picture? A small boat on a lake.", "Where is the dog? It is in the top left corner.",
          "How many people are there?\nThere are 12 people."]


def make_tiny_tokenizer(dirpath):
    """A ~400-token byte-level BPE with the Qwen2 pre-tokenizer and Qwen specials -> dirpath/tokenizer.json."""
    data.train_tokenizer(CORPUS, 400, dirpath)
    return str(dirpath / "tokenizer.json")


def _rgb(h, w, seed=0):
    """Smooth gradients plus noise, so resizing has real structure to get right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), 128 + 0 * xx], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory):
    """A tiny checkpoint whose config ids match its tokenizer.json: what sample.py needs."""
    d = tmp_path_factory.mktemp("chat")
    tok = Tokenizer(make_tiny_tokenizer(d))
    torch.manual_seed(2)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64), image_token_id=tok.image_pad_id,
        vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id, tie_word_embeddings=True)
    hf = Qwen2VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)
    hf.save_pretrained(d)
    Image.fromarray(_rgb(90, 120, seed=3)).save(d / "cat.png")
    return d


# head size 64 like every facebook/dinov2-*, so that from_state_dict's heads = width // 64 holds
TINY_DINO = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=518, patch_size=14)


def one_pass_and_two_pass(model, b):
    """([loss, loss], [grads, grads]) of a VPT model's one-pass training forward and of its two-pass slow path on
    the batch b, gradients by parameter name."""
    grads, losses = [], []
    for fwd in (model.forward, model.forward_two_pass):
        model.zero_grad()
        _, loss = fwd(b, b["targets"])
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return losses, grads


def _save_noisy(model, path):
    """Saves a transformers model with a large std everywhere (layer-scale lambdas, position tables, cls and mask
    tokens included), so that every detail of the computation shows in the comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    return path


def _write_hf_dino(path, **overrides):
    torch.manual_seed(0)
    return _save_noisy(HFDinov2Model(Dinov2Config(**TINY_DINO, **overrides)), path)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return _write_hf_dino(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def vpt_dir(chat_dir, dino_dir, tmp_path_factory):
    """A tiny VPT checkpoint started from the tiny Qwen2-VL and DINOv2 with vpt.from_base, plus records and images."""
    model, tok, img_cfg = vpt.from_base(str(chat_dir), "dino", str(dino_dir))
    torch.manual_seed(3)
    with torch.no_grad():  # a larger std, so that every detail of the wiring shows in the numbers
        for p in model.parameters():
            p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("vpt")
    vpt.save(model, tok, ImageConfig(max_pixels=112 * 112), d)
    Image.fromarray(_rgb(200, 260, seed=5)).save(d / "a.png")
    act = "<|detection_action_start|><|detection_action|><|detection_action_end|>"
    records = [
        {"messages": [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                      {"role": "assistant", "content": act}, {"role": "user", "content": "<detection_image>"},
                      {"role": "assistant", "content": "Now answer the question.\nA small boat."}],
         "images": ["a.png"], "detection_images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<image>\nWhere is the dog?"},
                      {"role": "assistant", "content": vpt.region_text((1, 2, 3, 4))},
                      {"role": "user", "content": "<image>"},
                      {"role": "assistant", "content": "Now answer the question.\nIn the top left corner."}],
         "images": ["a.png", "a.png_20,30,120,150"]},
        {"messages": [{"role": "user", "content": "<image>\nDescribe this image."},
                      {"role": "assistant", "content": "The cat sits on the red mat."}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<image>\nHow many people are there?"},
                      {"role": "assistant", "content": act}, {"role": "user", "content": "<detection_image>"},
                      {"role": "assistant", "content": "Now answer the question.\nThere are 12 people."}],
         "images": ["a.png"], "detection_images": ["a.png"]},
    ]
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


# -----------------------------------------------------------------------------
# model.py: Qwen2-VL against transformers (logits, M-RoPE, generate, KV cache, loading, sampling filters)

LOGIT_TOL = 1e-4  # fp32; the measured differences are below 5e-7 (the README's Numbers table)


def make_hf_model(path, tied=True, std=0.15, seed=0):
    """A tiny Qwen2-VL written by transformers' save_pretrained (Hub key layout, nested v5 config)."""
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64),
        image_token_id=IMG, vision_start_token_id=VS, vision_end_token_id=VE, tie_word_embeddings=tied)
    hf = Qwen2VLForConditionalGeneration(cfg)
    with torch.no_grad():  # a larger std than the init, so greedy decoding is sensitive to every detail
        for p in hf.parameters():
            p.normal_(0, std)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory):
    return make_hf_model(str(tmp_path_factory.mktemp("tied")), tied=True)


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory):
    return make_hf_model(str(tmp_path_factory.mktemp("untied")), tied=False, seed=1)


def image_block(n):
    return [VS] + [IMG] * n + [VE]


def hf_logits(hf, ids, mask, pv=None, grid=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int(), pixel_values=pv,
                  image_grid_thw=grid).logits


def ours_logits(model, ids, mask, pv=None, grid=None):
    pos, _ = M.get_rope_index(ids, grid, mask, IMG)
    with torch.no_grad():
        return model(dict(input_ids=ids, padding_mask=mask, position_ids=pos, pixel_values=pv, image_grid_thw=grid))[0]


def random_pixels(grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), 1176, generator=g)


# cases: (name, rows of token ids, image grids in order)
CASES = {
    "one image": ([[1, 2, 3] + image_block(8) + [4, 5, 6, 7]], [[1, 4, 8]]),
    "two images": ([[1, 2] + image_block(8) + [9, 10] + image_block(6) + [11, 12]], [[1, 4, 8], [1, 6, 4]]),
    "padded batch": ([[1, 2] + image_block(4) + [3, 4, 5, 6, 7, 8],
                      [1] + image_block(12) + [5, 6, 7, 8, 9, 10, 11, 12, 13]], [[1, 4, 4], [1, 6, 8]]),
    "text only": ([[5, 6, 7, 8, 9, 10, 11]], None),
}


def batch(rows):
    """Left-pads rows with id 0: (ids (B, T), padding mask (B, T))."""
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_positions_match_transformers(tied_dir, case):
    rows, grid = CASES[case]
    ids, mask = batch(rows)
    grid = torch.tensor(grid) if grid else None
    pv = random_pixels(grid) if grid is not None else None
    hf, ours = load_hf(tied_dir), M.from_pretrained(tied_dir)
    if grid is not None:
        ref_pos, ref_delta = hf.model.get_rope_index(ids, (ids == IMG).int(), grid, attention_mask=mask)
        pos, delta = M.get_rope_index(ids, grid, mask, IMG)
        assert torch.equal(pos, ref_pos), f"{case}: M-RoPE ids differ"
        assert torch.equal(delta, ref_delta), f"{case}: rope deltas {delta.tolist()} vs {ref_delta.tolist()}"
    ref, got = hf_logits(hf, ids, mask, pv, grid), ours_logits(ours, ids, mask, pv, grid)
    real = mask.bool()  # padded positions are ignored by both models
    diff = (ref[real] - got[real]).abs().max().item()
    print(f"{case}: max abs logit diff {diff:.2e}")
    assert diff <= LOGIT_TOL, f"{case}: logits differ by {diff}"


def test_vit_matches_transformers_with_and_without_autograd(tied_dir):
    # without gradient VisionMlp runs QuickGELU in place: the same floats as the autograd path, which keeps its
    # inputs for the backward; both against transformers' visual tower (its merged tokens, pooler_output)
    grid = torch.tensor([[1, 4, 8], [1, 6, 4]])
    pv = random_pixels(grid)
    hf, ours = load_hf(tied_dir), M.from_pretrained(tied_dir)
    with torch.no_grad():
        ref = hf.model.visual(pv, grid).pooler_output  # (14, 64)
        inference = ours.visual(pv, grid)
    training = ours.visual(pv, grid)
    assert training.requires_grad and not inference.requires_grad
    diff = (inference - ref).abs().max().item()
    print(f"ViT tokens: max abs diff {diff:.1e} against transformers (values up to {ref.abs().max():.2f})")
    assert torch.equal(inference, training.detach())
    assert diff <= 1e-5


def test_llm_in_bf16_and_its_rotation_under_autocast_match_transformers(tied_dir):
    # training's bf16 autocast keeps fp32 weights: the residual stream, and so the rotary tables, stay fp32 while q
    # and k come out of their projections in bf16. transformers' q * cos then promotes to fp32 and its SDPA casts
    # back to bf16; apply_rope rotates in the tables' fp32 and casts back: the same bf16 numbers
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb
    rows, grid = CASES["one image"]
    ids, mask = batch(rows)
    grid = torch.tensor(grid)
    pos, _ = M.get_rope_index(ids, grid, mask, IMG)
    hf, ours = load_hf(tied_dir), M.from_pretrained(tied_dir)
    q = torch.randn(1, 4, ids.size(1), 16, generator=torch.Generator().manual_seed(0)).bfloat16()  # (B, nh, T, hs)
    cos, sin = hf.model.language_model.rotary_emb(torch.zeros(1, ids.size(1), 64), pos)  # fp32 stream -> fp32 tables
    ref = apply_rotary_pos_emb(q, q, cos, sin)[0]
    assert ref.dtype == torch.float32
    assert torch.equal(M.apply_rope(q, *ours.model.rope(pos)), ref.bfloat16())
    # bf16 weights (inference on a GPU): the tables are cast once to the activations' bf16, as transformers' are
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tied_dir, dtype=torch.bfloat16,
                                                         attn_implementation="eager").eval()
    ours = M.from_pretrained(tied_dir, dtype=torch.bfloat16)
    pv = random_pixels(grid)
    ref, got = hf_logits(hf, ids, mask, pv, grid), ours_logits(ours, ids, mask, pv, grid)
    assert got.dtype == torch.bfloat16
    diff = (ref.float() - got.float()).abs().max().item()
    print(f"bf16 logits: max abs diff {diff:.1e} (values up to {ref.abs().max():.2f}; bf16 keeps 8 bits)")
    assert diff <= 2e-2


def test_rope_index_reference_example():
    # Qwen2VLModel.get_rope_index (transformers 5.23) worked by hand: 15 text tokens, a 1x4x8 image (2x4 tokens),
    # 13 text tokens
    ids = torch.tensor([[1] * 15 + [IMG] * 8 + [2] * 13])
    pos, delta = M.get_rope_index(ids, torch.tensor([[1, 4, 8]]), None, IMG)
    assert pos[0, 0].tolist() == list(range(15)) + [15] * 8 + list(range(19, 32))
    assert pos[1, 0].tolist() == list(range(15)) + [15] * 4 + [16] * 4 + list(range(19, 32))
    assert pos[2, 0].tolist() == list(range(15)) + [15, 16, 17, 18] * 2 + list(range(19, 32))
    assert delta.item() == -4


@pytest.mark.parametrize("case", ["one image", "padded batch"])
def test_greedy_tokens_match_generate(tied_dir, case):
    rows, grid = CASES[case]
    ids, mask = batch(rows)
    grid = torch.tensor(grid)
    pv = random_pixels(grid)
    hf, ours = load_hf(tied_dir), M.from_pretrained(tied_dir)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int(), pixel_values=pv,
                          image_grid_thw=grid, do_sample=False, repetition_penalty=1.0, max_new_tokens=20,
                          eos_token_id=None, pad_token_id=0)[:, ids.size(1):]
    got = torch.stack(list(M.generate(ours, ids, mask, pv, grid, max_new_tokens=20)), dim=1)
    assert got.tolist() == ref.tolist()


def test_kv_cache_decode_equals_full_forward(untied_dir):
    ours = M.from_pretrained(untied_dir)
    rows, grid = CASES["padded batch"]
    ids, mask = batch(rows)
    grid = torch.tensor(grid)
    pv = random_pixels(grid)
    seen = []  # generate's own logits: its prefill's and its 5 steps'
    hook = ours.lm_head.register_forward_hook(lambda module, args, out: seen.append(out))
    new = list(M.generate(ours, ids, mask, pv, grid, max_new_tokens=6))
    hook.remove()
    full = torch.cat([ids, torch.stack(new[:-1], dim=1)], dim=1)  # prompt + the 5 tokens fed back
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], dim=1)
    # the no-cache path: positions of the decoded tokens follow the rope delta (the decode branch of
    # Qwen2VLModel.compute_3d_position_ids, transformers 5.23)
    pos, delta = M.get_rope_index(ids, grid, mask, IMG)
    dec = M.decode_positions(mask, delta, T=5)
    with torch.no_grad():
        h = ours.model(ours.embed(full, pv, grid), torch.cat([pos, dec], dim=2), M.causal_mask(full_mask, full.size(1)))
        ref = ours.lm_head(h[:, ids.size(1) - 1:])  # logits that chose each of the 6 tokens
        cache = M.KVCache(ours.cfg, 2, full.size(1), "cpu", torch.float32)
        steps = [ours.model(ours.embed(ids, pv, grid), pos, M.causal_mask(mask, ids.size(1)), cache)[:, -1]]
        cache.advance(ids.size(1))
        for t in range(5):
            m = M.causal_mask(full_mask[:, :ids.size(1) + t + 1], 1, start=cache.pos)
            steps.append(ours.model(ours.model.embed_tokens(new[t][:, None]), dec[:, :, t:t + 1], m, cache)[:, -1])
            cache.advance(1)
        got = ours.lm_head(torch.stack(steps, dim=1))
    diff = (got - ref).abs().max().item()
    # generate hands each step its slice of tables made once: a wrong slice moves these logits by ~3e-3 while
    # the random model's greedy tokens stay the same
    gen = (torch.stack(seen, dim=1) - ref).abs().max().item()
    print(f"KV-cache vs no-cache logits: {diff:.2e}; generate's: {gen:.2e}")
    assert diff <= 1e-5, f"cached decode differs from the full forward by {diff}"
    assert gen <= 1e-5, f"generate's logits differ from the full forward by {gen}"


def flat_hub_config(nested):
    """Rewrites transformers 5's nested config.json into the flat pre-v5 layout the Hub checkpoints ship."""
    d = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    d.update(text, rope_theta=rope["rope_theta"],
             rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    d["vision_config"] = {k: v for k, v in nested["vision_config"].items() if k != "rope_parameters"}
    return d


def test_checkpoint_layouts_load(tmp_path, tied_dir, untied_dir):
    ids, mask = batch(CASES["one image"][0])
    grid = torch.tensor(CASES["one image"][1])
    pv = random_pixels(grid)
    for name, src in (("tied", tied_dir), ("untied", untied_dir)):
        hf = load_hf(src)
        ref = hf_logits(hf, ids, mask, pv, grid)
        # sharded: several safetensors files and an index
        sharded = tmp_path / f"{name}-sharded"
        hf.save_pretrained(sharded, max_shard_size="100KB")
        assert (sharded / "model.safetensors.index.json").exists()
        # flat: the pre-v5 config.json of the Hub
        flat = tmp_path / f"{name}-flat"
        hf.save_pretrained(flat)
        cfg = json.loads((flat / "config.json").read_text())
        (flat / "config.json").write_text(json.dumps(flat_hub_config(cfg)))
        for d in (src, sharded, flat):
            ours = M.from_pretrained(str(d))
            assert ours.cfg.tie_word_embeddings == (name == "tied")
            assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (name == "tied")
            diff = (ours_logits(ours, ids, mask, pv, grid) - ref).abs().max().item()
            assert diff <= LOGIT_TOL, f"{d}: logits differ by {diff}"


def test_strict_loading_names_the_bad_key(tmp_path, untied_dir):
    sd = load_file(os.path.join(untied_dir, "model.safetensors"))
    cfg = open(os.path.join(untied_dir, "config.json")).read()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
                    "model.layers.1.mlp.up_proj.weight"),
        "mis-shaped": ({**sd, "visual.merger.ln_q.bias": torch.zeros(7)}, "visual.merger.ln_q.bias"),
        "unexpected": ({**sd, "model.layers.9.extra": torch.zeros(1)}, "model.layers.9.extra"),
    }
    for what, (bad, key) in cases.items():
        d = tmp_path / what
        d.mkdir()
        save_file(bad, d / "model.safetensors")
        (d / "config.json").write_text(cfg)
        with pytest.raises(KeyError, match=f"{what}.*{key.replace('.', '[.]')}"):
            M.from_pretrained(str(d))


def test_loading_runs_no_initialiser_and_restores_them(untied_dir, monkeypatch):
    # a model filled from a checkpoint is built without initialising its meta tensors (model.no_init); torch's
    # initialisers are back afterwards, also when building fails
    init, calls = torch.nn.init, []
    for name in ("normal_", "kaiming_uniform_", "uniform_"):
        f = getattr(init, name)
        monkeypatch.setattr(init, name, lambda t, *a, f=f, name=name, **k: calls.append(name) or f(t, *a, **k))
    originals = dict(vars(init))
    M.from_pretrained(untied_dir)
    assert calls == [] and dict(vars(init)) == originals
    with pytest.raises(ZeroDivisionError), M.no_init():
        1 / 0
    assert dict(vars(init)) == originals
    torch.nn.Linear(2, 2)  # torch's own reset_parameters: the initialisers run again
    assert calls == ["kaiming_uniform_", "uniform_"]


def test_unreachable_hub_id_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local directory"):
        M.from_pretrained("nobody/no-such-model-here")
    # a path is never sent to the Hub, and a directory without config.json is named as such
    with pytest.raises(M.UserError, match=f"{tmp_path / 'nope'}: no such directory"):
        M.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(M.UserError, match=f"{tmp_path} is not a checkpoint directory: it has no config.json"):
        vpt.from_pretrained(str(tmp_path))


# config.json of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct as the Hub ships them (flat, pre-v5 layout);
# the 7B vision_config lists only what differs from transformers' defaults
HUB_CONFIG_COMMON = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2_vl",
    "num_hidden_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
HUB_CONFIGS = {
    "Qwen/Qwen2-VL-2B-Instruct": {
        **HUB_CONFIG_COMMON, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
        "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2}},
    "Qwen/Qwen2-VL-7B-Instruct": {
        **HUB_CONFIG_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
        "num_key_value_heads": 4, "tie_word_embeddings": False, "vocab_size": 152064,
        "vision_config": {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}},
}


def test_config_presets_parse_the_reference_configs():
    for name, preset in (("Qwen/Qwen2-VL-2B-Instruct", "qwen2-vl-2b"), ("Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl-7b")):
        cfg = M.QwenConfig.from_hf(HUB_CONFIGS[name])
        assert cfg == M.QwenConfig(**M.PRESETS[preset]), f"{name} parses differently from preset {preset}"
    with torch.device("meta"):
        n2b = sum(p.numel() for p in M.Qwen2VL(M.QwenConfig()).parameters())
        n7b = sum(p.numel() for p in M.Qwen2VL(M.QwenConfig(**M.PRESETS["qwen2-vl-7b"])).parameters())
    assert (n2b, n7b) == (2_208_985_600, 8_291_375_616), "parameter counts of Qwen2-VL-2B/7B-Instruct"


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert M.sample_next(logits, 0).item() == 0
    assert {M.sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)} == {0, 1}
    # softmax mass: 0.64, 0.23, 0.09, ... so top_p 0.8 keeps the first two tokens only
    assert {M.sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(200)} == {0, 1}
    assert {M.sample_next(logits, 1.0, top_p=0.1, generator=g).item() for _ in range(50)} == {0}


# -----------------------------------------------------------------------------
# encoders.py: DINOv2 against transformers


@pytest.fixture(scope="module")
def dino_swiglu_dir(tmp_path_factory):
    return _write_hf_dino(tmp_path_factory.mktemp("dino_swiglu"), use_swiglu_ffn=True)


def _load_dino(path):
    return encoders.dino_from_pretrained(str(path))


def _hf_last_hidden_state(path, pixel_values):
    model = HFDinov2Model.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).last_hidden_state


@pytest.mark.parametrize("size", [(224, 224), (224, 280), (518, 518)])  # interpolated, non-square, table as is
def test_dino_matches_transformers(dino_dir, size):
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    ref = _hf_last_hidden_state(dino_dir, pixel_values)
    with torch.no_grad():
        out = _load_dino(dino_dir)(pixel_values)
    assert out.shape == ref.shape == (2, 1 + (size[0] // 14) * (size[1] // 14), 128), (out.shape, ref.shape)
    diff = (out - ref).abs().max().item()
    print(f"dinov2 {size}: max|diff| = {diff:.3g}")
    assert diff <= 1e-4, f"last_hidden_state differs by {diff} at {size}"


def test_dino_swiglu_matches_transformers(dino_swiglu_dir):
    pixel_values = torch.randn(2, 3, 224, 280, generator=torch.Generator().manual_seed(2))
    ref = _hf_last_hidden_state(dino_swiglu_dir, pixel_values)
    with torch.no_grad():
        out = _load_dino(dino_swiglu_dir)(pixel_values)
    diff = (out - ref).abs().max().item()
    print(f"dinov2 swiglu (224, 280): max|diff| = {diff:.3g}")
    assert diff <= 1e-4, f"swiglu last_hidden_state differs by {diff}"


def test_dino_patch_features_drop_cls(dino_dir):
    model = _load_dino(dino_dir)
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats, full = model.patch_features(pixel_values), model(pixel_values)
    assert feats.shape == (1, 256, 128), feats.shape
    assert torch.equal(feats, full[:, 1:]), "patch_features must be last_hidden_state without CLS"


@pytest.mark.parametrize("fixture", ["dino_dir", "dino_swiglu_dir"])
def test_dino_config_from_state_dict(request, fixture):
    path = request.getfixturevalue(fixture)
    from_hf = DinoConfig.from_hf(json.loads((path / "config.json").read_text()))
    sd = {"detection_model." + k: v for k, v in load_file(path / "model.safetensors").items()}  # the VPT layout
    assert DinoConfig.from_state_dict(sd, prefix="detection_model.") == from_hf


# -----------------------------------------------------------------------------
# data.py: images, the Qwen2-VL and DINOv2 preprocessing


def hf_processor(**kw):
    return Qwen2VLImageProcessorPil(**{"min_pixels": 3136, "max_pixels": 12845056, **kw})  # Hub values


def _case(name):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(_rgb(60, 80))
    rgba = Image.fromarray(np.dstack([_rgb(60, 80), rng.integers(0, 256, (60, 80), dtype=np.uint8)]))
    p_transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_transparent.info["transparency"] = 3
    return {
        "tiny_20x30": lambda: Image.fromarray(_rgb(20, 30)),
        "huge_3000x2000": lambda: Image.fromarray(_rgb(3000, 2000)),
        "extreme_1500x10": lambda: Image.fromarray(_rgb(1500, 10)),
        "rgba": lambda: rgba,
        "L": lambda: rgb.convert("L"),
        "P": lambda: rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32),
        "P_transparency": lambda: p_transparent,
        "LA": lambda: rgba.convert("LA"),
        "I;16": lambda: Image.fromarray(rng.integers(0, 400, (45, 70)).astype(np.uint16)),  # >255 clips to white
        "I": lambda: Image.fromarray(rng.integers(-50, 400, (45, 70)).astype(np.int32)),
        "F": lambda: Image.fromarray((rng.random((45, 70)) * 300).astype(np.float32)),
        "CMYK": lambda: rgb.convert("CMYK"),
        "1": lambda: rgb.convert("1"),
    }[name]()


IMAGE_CASES = ["tiny_20x30", "huge_3000x2000", "extreme_1500x10", "rgba", "L", "P", "P_transparency", "LA", "I;16",
               "I", "F", "CMYK", "1"]


def _compare(ours, theirs, name):
    (pv, grid), out = ours, theirs
    diff = (pv - torch.from_numpy(out["pixel_values"])).abs().max().item()
    print(f"\n[pixel parity] {name}: pixel_values {tuple(pv.shape)} max|diff| = {diff}")
    assert pv.dtype == torch.float32 and grid.dtype == torch.int64
    assert pv.shape == out["pixel_values"].shape, f"{name}: {pv.shape} vs {out['pixel_values'].shape}"
    assert diff <= 1e-6, f"{name}: max|diff| {diff}"
    assert torch.equal(grid.reshape(-1, 3), torch.from_numpy(out["image_grid_thw"])), name


@pytest.fixture(scope="module")
def oracle():
    return hf_processor()


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_process_image_matches_hf(name, oracle):
    img = _case(name)
    _compare(process_image(img, ImageConfig()), oracle(img, return_tensors="np"), name)


def test_process_image_downscale_matches_hf():
    # exercises smart_resize's max_pixels branch without a 12.8 MP tensor
    img = _case("huge_3000x2000")
    _compare(process_image(img, ImageConfig(max_pixels=200_000)), hf_processor(max_pixels=200_000)(img), "down")


def test_exif_rotated_jpeg(tmp_path, oracle):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    Image.fromarray(_rgb(40, 90)).save(path, exif=exif)
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
    assert load_image(path).size == (40, 90) == upright.size
    _compare(process_image(path, ImageConfig()), oracle(upright), "exif_jpeg")
    _compare(process_image(str(path), ImageConfig()), oracle(upright), "exif_jpeg_str")


def test_process_images_concatenates(oracle):
    imgs = [_case("tiny_20x30"), _case("rgba"), _case("extreme_1500x10")]
    pv, grid = process_images(imgs, ImageConfig())
    out = oracle(imgs)
    assert torch.equal(pv, torch.from_numpy(out["pixel_values"]))
    assert torch.equal(grid, torch.from_numpy(out["image_grid_thw"]))
    assert grid.shape == (3, 3) and pv.shape[0] == grid.prod(-1).sum()
    assert process_images([], ImageConfig()) == (None, None)


@pytest.mark.parametrize("hw, grid", [((70, 100), (4, 8)), ((20, 30), (4, 6)), ((5000, 3000), (330, 198)),
                                      ((1080, 1920), (78, 138)), ((1500, 10), (50, 2))])
def test_smart_resize(hw, grid):
    h, w = smart_resize(*hw)
    assert (h // 14, w // 14) == grid and (h, w) == hf_smart_resize(*hw, min_pixels=3136, max_pixels=12845056)


def test_smart_resize_aspect_ratio():
    with pytest.raises(ValueError, match="2010x10"):
        smart_resize(2010, 10)
    smart_resize(2000, 10)  # exactly 200 is allowed


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match="x.png"):
        load_image(bad)
    truncated = tmp_path / "t.png"
    Image.fromarray(_rgb(50, 50)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="t.png"):
        load_image(truncated)


def test_load_image_modes():
    white = load_image(Image.new("RGBA", (3, 2), (10, 20, 30, 0)))
    assert white.mode == "RGB" and np.array(white).min() == 255, "fully transparent must be white"
    for name in ["L", "P", "LA", "I;16", "I", "F", "CMYK", "1"]:
        img = _case(name)
        assert img.mode == name and load_image(img).mode == "RGB", name


def test_image_config_from_dir(tmp_path):
    assert ImageConfig.from_dir(tmp_path) == ImageConfig()
    hub = {"min_pixels": 3136, "max_pixels": 1000, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
           "image_mean": [0.5, 0.5, 0.5], "image_std": list(data.CLIP_STD),
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub))
    cfg = ImageConfig.from_dir(tmp_path)
    assert cfg.max_pixels == 1000 and cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == data.CLIP_STD
    hf_processor(max_pixels=777).save_pretrained(tmp_path)  # 5.23 layout: limits nested in "size"
    assert ImageConfig.from_dir(tmp_path) == ImageConfig(max_pixels=777)
    (tmp_path / "preprocessor_config.json").write_text('{"do_normalize": false, "crop_size": 3}')
    with pytest.raises(ValueError, match="crop_size"):
        ImageConfig.from_dir(tmp_path)


def _hf_dino_pixels(img):
    proc = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return proc(img, return_tensors="pt")["pixel_values"][0]


def _noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w, h", [(300, 200), (200, 300), (100, 80), (333, 257), (512, 384)])  # wide, tall, upsampled
def test_process_dino_image_matches_bit_processor(w, h):
    img = _noise_image(w, h)
    ours, ref = process_dino_image(img), _hf_dino_pixels(img)
    assert ours.dtype == ref.dtype == torch.float32, (ours.dtype, ref.dtype)
    assert ours.shape == ref.shape == (3, 224, 224), (ours.shape, ref.shape)
    diff = (ours - ref).abs().max().item()
    print(f"process_dino_image {w}x{h}: max|diff| = {diff:.3g}")
    assert diff <= 1e-6, f"pixel values differ by {diff} for a {w}x{h} image"


def test_process_dino_image_nearest_downscale_first():
    img = _noise_image(900, 700, seed=1)
    # LLaMA-Factory's downscale: long side 512, sizes truncated, NEAREST
    small = img.resize((512, int(700 * 512 / 900)), resample=Image.NEAREST)
    ours = process_dino_image(img)
    diff = (ours - _hf_dino_pixels(small)).abs().max().item()
    print(f"process_dino_image 900x700 (NEAREST to 512x398 first): max|diff| = {diff:.3g}")
    assert diff <= 1e-6, f"pixel values differ by {diff} after the NEAREST pre-downscale"
    assert not torch.allclose(ours, _hf_dino_pixels(img)), "the pre-downscale must change the result"


# -----------------------------------------------------------------------------
# data.py: tokenizer and chat template


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


# chat_template.json of Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct on the Hugging Face Hub, verbatim
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
ONE_IMAGE = [{"role": "user", "content": "<image>Describe this image."}]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "What is in the picture?<image>"},
               {"role": "assistant", "content": "A small boat on a lake."}]
MULTI_TURN = [{"role": "user", "content": "<image>\nWhere is the dog?"},
              {"role": "assistant", "content": "It is in the top left corner."},
              {"role": "user", "content": "How many people are there?"},
              {"role": "assistant", "content": "There are 12 people."}]
TWO_IMAGES = [{"role": "user", "content": "<image><image>The cat sits on the red mat. Which one?"},
              {"role": "assistant", "content": "The first."}]
CHATS = {"one_image": (ONE_IMAGE, True), "system": (WITH_SYSTEM, False), "multi_turn": (MULTI_TURN, False),
         "two_images": (TWO_IMAGES, True)}


def _hf_content(text):
    """"<image>Describe." -> [{"type": "image"}, {"type": "text", "text": "Describe."}] (HF content lists)."""
    content = []
    for i, piece in enumerate(text.split("<image>")):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def hf_render(messages, add_generation_prompt, image_tokens=None):
    """The Hub template rendered by transformers (its jinja environment), pads expanded as Qwen2VLProcessor does."""
    hf_messages = [{"role": m["role"], "content": _hf_content(m["content"])} for m in messages]
    text = render_jinja_template([hf_messages], chat_template=QWEN2VL_TEMPLATE,
                                 add_generation_prompt=add_generation_prompt)[0][0]
    for n in image_tokens or []:  # processing_qwen2_vl: each <|image_pad|> in turn -> n copies
        text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
    return text.replace("<|placeholder|>", "<|image_pad|>")


@pytest.mark.parametrize("name", list(CHATS))
def test_render_chat_matches_hf(name):
    messages, gen = CHATS[name]
    assert render_chat(messages, add_generation_prompt=gen) == hf_render(messages, gen)
    counts = [3, 5][:sum(m["content"].count("<image>") for m in messages)]
    assert render_chat(messages, gen, image_tokens=counts) == hf_render(messages, gen, counts)


def test_render_chat_reference_example():
    assert render_chat(ONE_IMAGE, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
        "<|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"2 <image> placeholders.*\[4\]"):
        render_chat(TWO_IMAGES, image_tokens=[4])


@pytest.mark.parametrize("name", list(CHATS))
def test_encode_chat(name, tok):
    messages, gen = CHATS[name]
    n_img = sum(m["content"].count("<image>") for m in messages)
    grid = torch.tensor([[1, 4, 8], [1, 6, 4]])[:n_img]  # 8 and 6 image tokens
    ids, labels = encode_chat(tok, messages, grid if n_img else None, add_generation_prompt=gen)
    assert ids == tok.encode(hf_render(messages, gen, [8, 6][:n_img]))
    assert ids == tok.encode(render_chat(messages, gen, image_tokens=[8, 6][:n_img]))
    assert ids.count(tok.image_pad_id) == sum([8, 6][:n_img])
    # supervised spans are exactly "<content><|im_end|>" of each assistant reply
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(ids, labels))
    sup = [l != IGNORE_INDEX for l in labels] + [False]
    starts = [i for i in range(len(ids)) if sup[i] and (i == 0 or not sup[i - 1])]
    ends = [i for i in range(1, len(ids) + 1) if sup[i - 1] and not sup[i]]
    spans = list(zip(starts, ends))
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in spans] == [r + "<|im_end|>" for r in replies]
    header = tok.encode("<|im_start|>assistant\n")
    for a, b in spans:
        assert ids[a - len(header):a] == header and labels[a - 1] == labels[b] == IGNORE_INDEX
    assert len(spans) == (2 if name == "multi_turn" else len(replies))


def test_tokenizer(tmp_path, tok):
    assert tok.im_start_id == tok.token_to_id("<|im_start|>") and tok.image_pad_id == tok.token_to_id("<|image_pad|>")
    assert tok.endoftext_id == len(tok) - 14, "specials follow the ~400 trained tokens"
    text = "<|im_start|>user\nThe cat sits<|image_pad|><|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id and tok.image_pad_id in ids and tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nThe cat sits"
    with pytest.raises(KeyError, match="<nope>"):
        tok.token_to_id("<nope>")
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing")


def test_tokenizer_add_tokens_and_save(tmp_path):
    tok = Tokenizer(make_tiny_tokenizer(tmp_path))
    n = len(tok)
    ids = tok.add_tokens(["<|a_0|>", "<|a_1|>"], special=True)
    assert ids == [n, n + 1] and len(tok) == n + 2
    assert tok.add_tokens(["<|a_1|>", "<|a_0|>"], special=True) == [n + 1, n] and len(tok) == n + 2, "idempotent"
    assert tok.add_tokens(["<region>"]) == [n + 2]
    assert tok.encode("x<|a_1|>y<region>") == tok.encode("x") + [n + 1] + tok.encode("y") + [n + 2]
    tok.save(tmp_path / "saved")
    again = Tokenizer(tmp_path / "saved")
    assert len(again) == n + 3 and again.encode("<|a_0|><region>") == [n, n + 2]
    assert again.decode([n, n + 2], skip_special_tokens=True) == "<region>"


# -----------------------------------------------------------------------------
# vpt.py: vocabulary, regions, projector, training forward, mask modeling, checkpoints

QWEN_SPECIALS = data.QWEN_SPECIALS


def vpt_batch(d, mask_prob=0.0):
    model, tok, img_cfg = vpt.from_pretrained(str(d))
    T = model.tokens
    ds = data.VPTDataset(str(d / "records.jsonl"), tok, img_cfg, "dino", T.pad, T.act)
    b = data.collate([ds[i] for i in range(len(ds))], tok.endoftext_id, tok.image_pad_id, 2)
    b["mask_modeling"][:] = mask_prob > 0
    return model, tok, b


def test_vpt_token_ids_follow_the_authors_order(tmp_path):
    # a stand-in for the real Qwen2 tokenizer: 151643 regular tokens, then the 14 Qwen specials
    vocab = {f"t{i}": i for i in range(151643)}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.add_special_tokens(QWEN_SPECIALS)
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert len(tok) == 151657
    for enc, p in (("dino", "detection"), ("clip", "clip")):
        t = Tokenizer(tmp_path)
        ids = vpt.add_tokens(t, enc)
        assert ids.pad == 151657 and ids.region_start == 151658 and ids.region_end == 151659
        assert ids.xs == tuple(range(151660, 151668)) and ids.ys == tuple(range(151668, 151676))
        assert (ids.act_start, ids.act, ids.act_end) == (151676, 151677, 151678)
        assert t.token_to_id(f"<|{p}_action|>") == 151677
        assert vpt.add_tokens(t, enc) == ids, "adding the tokens again must not move them"


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_regions_round_trip(margin):
    W, H, k = 640, 480, 8
    for cx1 in range(k):
        for cx2 in range(cx1, k):
            for cy1, cy2 in ((0, 0), (2, 5), (cx1 % k, k - 1)):
                box = vpt.cells_to_box([cx1, cx2], [cy1, cy2], W, H, k, margin)
                widened = (max(cx1 - margin, 0), max(cy1 - margin, 0),
                           min(cx2 + margin, k - 1), min(cy2 + margin, k - 1))
                assert vpt.box_to_cells(box, W, H, k) == widened, (cx1, cy1, cx2, cy2, margin, box)
    # a pixel box becomes the cells of its corners, and the group's text parses back
    assert vpt.box_to_cells((130, 190, 170, 230), 448, 448) == (2, 3, 3, 4)
    assert vpt.parse_regions(vpt.region_text((2, 3, 3, 4))) == [([2, 3], [3, 4])]


def test_parse_regions_skips_malformed_groups():
    s, e = "<|region_token_start|>", "<|region_token_end|>"
    assert vpt.parse_regions(f"{s}<|x_1|><|x_2|>{e}") == []  # no y cell
    assert vpt.parse_regions(f"{s}<|x_1|><|y_2|>") == []  # unterminated
    assert vpt.parse_regions(f"{s}{e}") == []
    assert vpt.parse_regions(f"a{s}<|x_1|><|y_2|><|x_3|>{e} b {s}<|y_0|><|x_7|>{e}") == [([1, 3], [2]), ([7], [0])]


def test_projector_hand_computed():
    p = vpt.ControlProjector(2, 2)
    with torch.no_grad():
        p.linear_feature.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        p.linear_feature.bias.copy_(torch.tensor([0.0, 1.0]))
        p.linear_condition.weight.copy_(torch.eye(2))
        p.linear_condition.bias.zero_()
    f = torch.tensor([[3.0, 1.0], [1.0, 3.0]])  # LayerNorm(eps 1e-5) -> about (1, -1) and (-1, 1)
    h = torch.tensor([[5.0, 1.0]])  # LayerNorm -> about (1, -1)
    n = 1 / (1 + 1e-5) ** 0.5
    f1 = torch.tensor([[n, 1 - 2 * n], [-n, 1 + 2 * n]])  # f' = W LN(f) + b
    c = torch.tensor([n, -n])
    want = f1 + (f1 @ c)[:, None] * c  # f' + (f'.c) c: for row 0, (n^2 - n + 2n^2) c
    got = p(f, h, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    assert torch.allclose(p(f), f1, atol=1e-6), "without a control vector the projector is Linear(LayerNorm(f))"


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
def test_one_pass_training_forward_equals_two_passes(vpt_dir, mask_prob):
    model, tok, b = vpt_batch(vpt_dir, mask_prob)
    losses, grads = one_pass_and_two_pass(model, b)
    assert set(grads[0]) == set(grads[1])
    assert any(n.startswith("detection_projector.linear_condition") for n in grads[0]), "the gate must be trained"
    gdiff = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    print(f"mask_prob {mask_prob}: loss {losses[0]:.6f} vs {losses[1]:.6f}, max grad diff {gdiff:.2e}")
    assert abs(losses[0] - losses[1]) <= 1e-5 and gdiff <= 1e-5


def test_mask_modeling_hides_the_first_user_turn(vpt_dir):
    """With the mask on, everything from the end of the first user turn on sees its question and image only
    through the control vector: given the same control vector, changed question or image tokens change nothing."""
    model, tok, a = vpt_batch(vpt_dir, mask_prob=1.0)
    row = 0  # a re-encoding sample
    span = model.first_user_turn(a["input_ids"])[row]
    b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()}
    q = span & (a["input_ids"][row] != tok.image_pad_id) & (a["input_ids"][row] < 300)  # question text tokens
    b["input_ids"][row, q] = (b["input_ids"][row, q] + 7) % 300
    n0 = int(a["image_grid_thw"][0].prod())
    b["pixel_values"] = a["pixel_values"].clone()
    b["pixel_values"][:n0] = torch.randn(n0, a["pixel_values"].size(1))  # the first image, seen by row 0 only
    losses = {}
    with torch.no_grad():
        control = model.prefix(a).control
        for name, batch, with_mask in (("a", a, True), ("b", b, True), ("b unmasked", b, False)):
            batch = {**batch, "mask_modeling": batch["mask_modeling"] & with_mask}
            pre = model.prefix(batch)._replace(control=control)  # the control vector of batch a throughout
            hidden = model.suffix(batch, pre)
            logits = model.lm_head(hidden[row])
            losses[name] = F.cross_entropy(logits, a["targets"][row], ignore_index=-100).item()
    print(f"answer loss: {losses}")
    assert abs(losses["a"] - losses["b"]) <= 1e-6, "the masked answer must not see the question or image"
    assert abs(losses["a"] - losses["b unmasked"]) > 1e-5, "without the mask the change must show (non-vacuous)"


def write_authors_checkpoint(src_dir, dst, encoder="dino", shards=1, tied_extra_head=False):
    """Rewrites one of our checkpoints in the authors' layout: pytorch_model*.bin, a flat 4.45-style config with
    model_type qwen2_vl_vpt and vision_encoder_ls, no DINOv2 config, and for clip the projector's unused layers."""
    sd = load_file(os.path.join(src_dir, "model.safetensors"))
    cfg = json.loads(open(os.path.join(src_dir, "config.json")).read())
    del cfg["vpt"]
    cfg["rope_scaling"] = {"mrope_section": cfg["rope_scaling"]["mrope_section"], "rope_type": "default",
                           "type": "default"}
    if encoder == "clip":
        sd = {k: v for k, v in sd.items() if not k.startswith(("detection_", "detection_model."))}
        H = cfg["hidden_size"]
        for name, shape in (("layernorm_feature.weight", (H,)), ("layernorm_feature.bias", (H,)),
                            ("linear_feature.weight", (H, H)), ("linear_feature.bias", (H,)),
                            ("layernorm_condition.weight", (H,)), ("layernorm_condition.bias", (H,)),
                            ("linear_condition.weight", (H, H)), ("linear_condition.bias", (H,))):
            sd["clip_projector." + name] = torch.randn(shape) * 0.05
        cfg.update(vision_encoder_ls=["clip"], detection_image_token_id=None, detection_action_id=None,
                   detection_action_start_id=None)
    if tied_extra_head:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 0.01
    os.makedirs(dst, exist_ok=True)
    keys = sorted(sd)
    chunks = [keys[i::shards] for i in range(shards)]
    names = ["pytorch_model.bin"] if shards == 1 else [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
                                                        for i in range(shards)]
    for name, ks in zip(names, chunks):
        torch.save({k: sd[k] for k in ks}, os.path.join(dst, name))
    if shards > 1:
        json.dump({"weight_map": {k: n for n, ks in zip(names, chunks) for k in ks}},
                  open(os.path.join(dst, "pytorch_model.bin.index.json"), "w"))
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    tok = Tokenizer(src_dir)
    if encoder == "clip":
        vpt.add_tokens(tok, "clip")  # their clip tokenizer holds <|clip_image_pad|> and <|clip_action*|>
    tok.save(dst)
    return sd


def test_authors_checkpoints_load_strictly(vpt_dir, tmp_path):
    ours, _, _ = vpt.from_pretrained(str(vpt_dir))
    model, tok, b = vpt_batch(vpt_dir)
    with torch.no_grad():
        ref = ours(b)[0]
    for shards in (1, 3):
        d = tmp_path / f"det-{shards}"
        write_authors_checkpoint(vpt_dir, d, shards=shards)
        theirs, _, _ = vpt.from_pretrained(str(d))
        assert theirs.vcfg.dino == ours.vcfg.dino, "DINOv2 config read off the tensors"
        with torch.no_grad():
            diff = (theirs(b)[0] - ref).abs().max().item()
        assert diff == 0.0, f"{shards} shard(s): logits differ by {diff}"
    # tied 2B with a separate lm_head tensor: the authors' strict=False load leaves that matrix in place
    d = tmp_path / "tied-extra-head"
    sd = write_authors_checkpoint(vpt_dir, d, tied_extra_head=True)
    theirs, _, _ = vpt.from_pretrained(str(d))
    assert torch.equal(theirs.model.embed_tokens.weight, sd["lm_head.weight"])
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    # clip: its projector's feature layers exist in the file and are ignored, everything else loads
    d = tmp_path / "clip"
    write_authors_checkpoint(vpt_dir, d, encoder="clip")
    clip, ctok, _ = vpt.from_pretrained(str(d))
    assert clip.vcfg.encoder == "clip" and not hasattr(clip, "detection_model")
    assert clip.tokens.pad == ctok.token_to_id("<|clip_image_pad|>")
    # a missing key is an error naming it
    d = tmp_path / "broken"
    write_authors_checkpoint(vpt_dir, d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    del sd["detection_projector.linear_condition.weight"]
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(KeyError, match="missing.*detection_projector.linear_condition.weight"):
        vpt.from_pretrained(str(d))


def test_save_load_round_trip_and_plain_checkpoint_refused(vpt_dir, tmp_path, chat_dir):
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    vpt.save(model, tok, img_cfg, tmp_path / "again")
    again, tok2, img2 = vpt.from_pretrained(str(tmp_path / "again"))
    assert img2 == img_cfg and len(tok2) == len(tok) and again.tokens == model.tokens
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not [f for f in os.listdir(tmp_path / "again") if f.endswith(".tmp")], "temporary files left behind"
    with pytest.raises(ValueError, match="not a VPT checkpoint"):
        vpt.from_pretrained(str(chat_dir))


def test_new_vpt_model_from_base(vpt_dir, chat_dir, dino_dir):
    model, tok, _ = vpt.from_base(str(chat_dir), "dino", str(dino_dir))
    base = M.from_pretrained(str(chat_dir))
    assert len(tok) == model.cfg.vocab_size > base.cfg.vocab_size or len(tok) <= base.cfg.vocab_size
    n = base.cfg.vocab_size
    assert torch.equal(model.model.embed_tokens.weight[:n], base.model.embed_tokens.weight)
    if model.cfg.vocab_size > n:  # grown rows start at the mean embedding
        assert torch.allclose(model.model.embed_tokens.weight[n:], base.model.embed_tokens.weight.mean(0).expand(
            model.cfg.vocab_size - n, -1), atol=1e-6)
    dino = encoders.dino_from_pretrained(str(dino_dir))
    assert all(torch.equal(a, b) for a, b in zip(model.detection_model.parameters(), dino.parameters()))


# -----------------------------------------------------------------------------
# vpt.py: the engine (a batch of questions on one KV cache, constrained regions)


def transcript_logits(model, img_cfg, res):
    """A fresh prefill of a result's whole transcript through the training forward: last position's logits."""
    ids = torch.tensor([res.transcript])
    views = [data.limit_side(res.original, model.vcfg.image_resolution)]
    views += [data.limit_side(res.original.crop(r.box), model.vcfg.image_resolution)
              for r in res.rounds if r.kind == "region"]
    pv, grid = process_images(views, img_cfg)
    extra = None
    if any(r.kind == "reencode" for r in res.rounds):
        extra = process_dino_image(views[0], model.vcfg.image_resolution)[None]
    pos, _ = M.get_rope_index(ids, grid, None, model.cfg.image_token_id)
    batch = dict(input_ids=ids, padding_mask=torch.ones_like(ids), position_ids=pos, pixel_values=pv,
                 image_grid_thw=grid, extra=extra,
                 extra_rows=torch.zeros(1 if extra is not None else 0, dtype=torch.long))
    with torch.no_grad():
        return model(batch)[0][0, -1]


@pytest.mark.parametrize("mode", ["region", "reencode"])
def test_engine_cache_equals_fresh_prefill(vpt_dir, mode):
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    res = vpt.answer(model, tok, img_cfg, vpt_dir / "a.png", "Where is the dog?", mode=mode, max_new_tokens=12)
    out, T = res.ids, model.tokens
    assert [r.kind for r in res.rounds] == [mode]
    if mode == "region":
        assert out[0] == T.region_start and out[5] == T.region_end
        xs, ys = res.rounds[0].cells
        assert xs[0] <= xs[1] and ys[0] <= ys[1]
    else:
        assert out[0] == T.act_start and T.act in res.transcript and T.pad in res.transcript
    diff = (transcript_logits(model, img_cfg, res) - res.logits).abs().max().item()
    print(f"{mode}: cached vs fresh-prefill logits {diff:.2e}")
    assert diff <= 1e-5, f"{mode}: the continued cache differs from a fresh prefill by {diff}"


def six_requests(vpt_dir):
    """Six questions that mix a region round, a re-encoding, no round and a text-only question, on images of three
    sizes (so prompts, crops and rounds differ in length)."""
    for name, (h, w) in {"wide.png": (90, 300), "tall.png": (260, 120)}.items():
        if not (vpt_dir / name).exists():
            Image.fromarray(_rgb(h, w, seed=h)).save(vpt_dir / name)
    R = vpt.Request
    return [R(vpt_dir / "a.png", "Where is the dog?", mode="region"), R(vpt_dir / "wide.png", "What is it?",
            mode="reencode"), R(vpt_dir / "tall.png", "Describe this image.", mode="off"),
            R(None, "Name a colour.", mode="free"), R(vpt_dir / "tall.png", "Where is the cat?", mode="region"),
            R(vpt_dir / "a.png", "How many boats?", mode="reencode")]


def test_engine_batch_equals_one_at_a_time(vpt_dir):
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    reqs = six_requests(vpt_dir)
    engine = vpt.Engine(model, tok, img_cfg, max_new_tokens=14)
    batched = engine.answer(reqs)
    alone = [engine.answer([r])[0] for r in reqs]
    assert [[r.kind for r in b.rounds] for b in batched] == [["region"], ["reencode"], [], [], ["region"],
                                                               ["reencode"]]
    for i, (b, a) in enumerate(zip(batched, alone)):
        assert b.ids == a.ids and b.text == a.text, f"request {i}: batched {b.ids} vs alone {a.ids}"
        assert b.rounds == a.rounds and b.transcript == a.transcript
    worst = 0.0
    for i, (req, b) in enumerate(zip(reqs, batched)):
        if req.image is None:  # text only: the plain forward of the transcript
            ids = torch.tensor([b.transcript])
            pos, _ = M.get_rope_index(ids, None)
            with torch.no_grad():
                fresh = model.lm_head(model.model(model.embed(ids), pos))[0, -1]
        else:
            fresh = transcript_logits(model, img_cfg, b)
        worst = max(worst, (fresh - b.logits).abs().max().item())
    print(f"batched final logits vs a fresh prefill of each transcript: max abs diff {worst:.2e}")
    assert worst <= 1e-5


def boosted(head, tokens, by=30.0):
    """head with `by` added to the logits of `tokens`: makes a path likely in a random model."""
    class Boosted(torch.nn.Module):
        weight = head.weight

        def forward(self, h):
            logits = head(h)
            logits[..., tokens] += by
            return logits

    return Boosted()


def test_engine_several_regions_in_one_turn(vpt_dir):
    """With max_regions 2 a forced region answer may open a second group; the turn then holds both crops as
    "Region i: <image>" lines (generate_region_item in the authors' evaluation/evaluation.py)."""
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    T = model.tokens
    head = model.lm_head
    model.lm_head = boosted(head, T.region_start)  # a second group is likely after the first closes
    res = vpt.answer(model, tok, img_cfg, vpt_dir / "a.png", "Where?", mode="region", max_regions=2,
                     max_new_tokens=16)
    assert [r.kind for r in res.rounds] == ["region", "region"]
    # the second group reaches max_regions, so its <|region_token_end|> closes the turn at once
    assert res.ids[:12].count(T.region_start) == 2 and res.ids[11] == T.region_end
    text = tok.decode(res.transcript[res.prompt_len:])
    assert "Region 0: <|vision_start|>" in text and "Region 1: <|vision_start|>" in text, text
    diff = (transcript_logits(model, img_cfg, res) - res.logits).abs().max().item()
    assert diff <= 1e-5, f"two crops in one turn: cache vs fresh prefill {diff}"
    model.lm_head = boosted(head, T.im_end)  # after one group the model closes the turn itself with <|im_end|>
    res = vpt.answer(model, tok, img_cfg, vpt_dir / "a.png", "Where?", mode="region", max_regions=2,
                     max_new_tokens=8)
    assert [r.kind for r in res.rounds] == ["region"] and res.ids[5:7] == [T.region_end, T.im_end]
    assert "Region 0" not in tok.decode(res.transcript[res.prompt_len:]), "one crop is a plain <image>"


def test_engine_prompt_with_image_is_verbatim(vpt_dir):
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    prompt = "<image>Where is the dog? Identify the region that can help you answer the question"
    res = vpt.answer(model, tok, img_cfg, vpt_dir / "a.png", prompt, mode="free", max_new_tokens=2)
    messages = [{"role": "user", "content": prompt}]
    _, grid = process_images([Image.open(vpt_dir / "a.png").convert("RGB")], img_cfg)
    want, _ = data.encode_chat(tok, messages, grid, True)
    assert res.transcript[:res.prompt_len] == want


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA graph of the compiled step needs a GPU"))])
def test_engine_compiled_decode_gives_the_same_tokens(vpt_dir, device):
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir), device=device)
    reqs = six_requests(vpt_dir)[:3] if device == "cpu" else six_requests(vpt_dir)
    eager = vpt.Engine(model, tok, img_cfg, max_new_tokens=10).answer(reqs)
    torch._dynamo.reset()
    engine = vpt.Engine(model, tok, img_cfg, max_new_tokens=10, compile=True)
    compiled = engine.answer(reqs)
    # the logits too: a random model's tokens barely depend on the cache, so a step that read stale lengths (a
    # graph's copy of lens) kept every token here and moved the logits by 0.09
    worst = lambda a, b: max((x.logits - y.logits).abs().max().item() for x, y in zip(a, b))
    assert [r.ids for r in compiled] == [r.ids for r in eager] and worst(compiled, eager) <= 1e-4
    # the next batch of the same shape reuses the emptied cache (a CUDA graph is captured at its addresses)
    again = engine.answer(reqs[::-1])
    assert [r.ids for r in again] == [r.ids for r in eager[::-1]] and len(engine.caches) == 1
    assert worst(again, eager[::-1]) <= 1e-4
    if device == "cuda":  # one graph, replayed for both batches
        assert len(engine.decode_step.graphs) == 1


def test_kv_cache_tensors_keep_their_addresses():
    # a CUDA graph captured over a decode step reads lens and writes k, v at the addresses they had at capture
    cfg = M.QwenConfig(**M.PRESETS["tiny"])
    cache = M.KVCache(cfg, 3, 16, "cpu", torch.float32, static=True)
    addresses = lambda: [t.data_ptr() for t in [cache.lens, *cache.k, *cache.v]]
    before = addresses()
    lengths = lambda: (cache.lens.tolist(), cache.lengths)  # the device copy and the host's
    cache.advance(4)  # an int: one in-place add
    assert lengths() == ([4, 4, 4], [4, 4, 4])
    cache.row(1).advance(5)  # a row's view adds to its row in place, then the parent copies its lengths in
    assert lengths() == ([4, 9, 4], [4, 9, 4])
    cache.advance([1, 0, 2])  # a list: copied in
    assert lengths() == ([5, 9, 6], [5, 9, 6])
    cache.advance(3)  # an int again, on rows of different lengths
    assert lengths() == ([8, 12, 9], [8, 12, 9]) and addresses() == before
    cache.reset()
    assert cache.lens.tolist() == [0, 0, 0] and addresses() == before


def test_free_sampling_never_emits_an_invalid_group(vpt_dir):
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    T = model.tokens
    # the round-starting tokens made likely, so that many groups are sampled
    model.lm_head = boosted(model.lm_head, [T.region_start, T.act_start], 8.0)
    seen = 0
    engine = vpt.Engine(model, tok, img_cfg, "free", max_rounds=1, max_new_tokens=8, temperature=1.5,
                        generator=torch.Generator().manual_seed(0))
    for res in engine.answer([vpt.Request(vpt_dir / "a.png", "Where is the dog?")] * 12):
        out = res.ids
        assert len(res.rounds) <= 1
        assert T.act not in out and T.act_end not in out and T.pad not in out, "forced tokens are never sampled"
        for r in res.rounds:
            seen += r.kind == "region"
            if r.kind == "region":
                (x0, x1), (y0, y1) = r.cells
                assert x0 <= x1 and y0 <= y1 and r.box[0] < r.box[2] and r.box[1] < r.box[3]
        if T.region_start in out and not res.rounds:  # cut off by max_new_tokens inside the group: no round
            assert T.region_end not in out
    assert seen > 0, "no region was sampled: the test checked nothing"


def test_engine_off_mode_and_incomplete_group(vpt_dir):
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    T = model.tokens
    res = vpt.answer(model, tok, img_cfg, vpt_dir / "a.png", "Where?", mode="off", max_new_tokens=10)
    assert not set(res.ids) & T.perception() and not res.rounds
    res = vpt.answer(model, tok, img_cfg, vpt_dir / "a.png", "Where?", mode="region", max_new_tokens=3)
    assert res.ids[0] == T.region_start and len(res.ids) == 3 and not res.rounds



# -----------------------------------------------------------------------------
# train.py


def train_cfg(vpt_dir, out, *extra):
    return train.parse_config([
        f"--init_from={vpt_dir}", f"--train_data={vpt_dir / 'records.jsonl'}",
        f"--val_data={vpt_dir / 'records.jsonl'}",
        f"--out_dir={out}", "--batch_size=2", "--grad_accum=2", "--max_iters=4", "--lr=3e-3", "--stage=all",
        "--eval_interval=0", "--eval_iters=2", "--log_interval=1", "--num_workers=0", "--device=cpu",
        "--warmup_frac=0.1", *extra])


def test_train_overfits_a_handful_of_records(vpt_dir, tmp_path, capsys):
    # from scratch (random init) on the 4 records: chance is ln(vocab) = ln(397) = 6.0 nats per token, and the
    # first logged loss is about 5; memorising 4 short answers and their perception tokens takes it below 1.0
    # (0.2 to 0.6 measured, depending on the thread count's rounding)
    cfg = train_cfg(vpt_dir, tmp_path / "o", "--init_from=scratch", f"--tokenizer={vpt_dir}", "--max_iters=60",
                    "--batch_size=4", "--grad_accum=1", "--max_pixels=12544", "--mask_prob=0.0", "--log_interval=5")
    train.main(cfg)
    out = capsys.readouterr().out
    first = float(out.split("loss ")[1].split(",")[0])
    final = float(out.split("val loss ")[-1].split(",")[0])
    print(out)
    assert first > 3.0 and final < 1.0, f"no overfit: val loss {final} (first logged {first})"
    assert "perception-token accuracy 1.000" in out
    model, _, _ = vpt.from_pretrained(str(tmp_path / "o"))  # the checkpoint loads as a VPT model


def test_alignment_stage_trains_only_the_projector(vpt_dir, tmp_path):
    before, _, _ = vpt.from_pretrained(str(vpt_dir))
    after = train.main(train_cfg(vpt_dir, tmp_path / "o", "--stage=align", "--max_iters=2"))
    changed = [n for (n, a), b in zip(before.state_dict().items(), after.state_dict().values())
               if not torch.equal(a, b)]
    assert changed and all(n.startswith("detection_projector.") for n in changed), changed


def test_resume_continues_bit_for_bit(vpt_dir, tmp_path):
    full = train.main(train_cfg(vpt_dir, tmp_path / "full", "--max_iters=4"))
    train.main(train_cfg(vpt_dir, tmp_path / "half", "--max_iters=2"))
    resumed = train.main(train_cfg(vpt_dir, tmp_path / "half", "--max_iters=4", "--init_from=resume"))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{n} differs after resume"


def test_two_process_ddp_matches_one_process(vpt_dir, tmp_path):
    one = train.main(train_cfg(vpt_dir, tmp_path / "one", "--max_iters=2"))  # 1 process x 2 micro-batches
    args = [f"--{k}={v}" for k, v in dataclasses_items(train_cfg(vpt_dir, tmp_path / "two", "--max_iters=2",
                                                                  "--grad_accum=1"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(os.path.dirname(__file__), "train.py"), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two, _, _ = vpt.from_pretrained(str(tmp_path / "two"))
    diff = max((a - b).abs().max().item() for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    print(f"1 process x grad_accum 2 vs 2 processes x grad_accum 1: max parameter diff {diff:.2e}")
    assert diff <= 1e-5


def dataclasses_items(cfg):
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(vpt_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    train.main(train_cfg(vpt_dir, out, "--max_iters=2"))
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    real = vpt.VPT.forward

    def nan_forward(model, batch, targets=None):
        logits, loss = real(model, batch, targets)
        return logits, loss * float("nan")

    monkeypatch.setattr(vpt.VPT, "forward", nan_forward)
    with pytest.raises(RuntimeError, match="loss is nan at step 2.*untouched"):
        train.main(train_cfg(vpt_dir, out, "--max_iters=4", "--init_from=resume"))
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before, "the last good checkpoint changed"


def test_mask_modeling_rate():
    cfg = train.parse_config(["--mask_prob=0.3"])
    batch = {"input_ids": torch.zeros(50, 3)}
    draws = torch.cat([train.mask_draw(batch, cfg, k) for k in range(200)])
    rate = draws.float().mean().item()
    assert abs(rate - 0.3) < 0.02, rate  # 10000 draws: the standard error is 0.005
    assert torch.equal(train.mask_draw(batch, cfg, 7), train.mask_draw(batch, cfg, 7)), "reproducible per micro-batch"


def test_bad_config_and_bad_record_errors(vpt_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        train.parse_config(["--learning_rate=1e-3"])
    with pytest.raises(ValueError, match="max_iters must be int"):
        train.parse_config(["--max_iters=ten"])
    f = tmp_path / "c.py"
    f.write_text("lr = 1e-3\nimport os\n")
    with pytest.raises(ValueError, match="c.py:2: only `key = literal`"):
        train.parse_config([str(f)])
    bad = tmp_path / "bad.jsonl"
    good = (vpt_dir / "records.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:2] + ['{"messages": [{"role": "user", "content": "<image> hi"}], "images": []}']))
    with pytest.raises(ValueError, match="bad.jsonl: record 2"):
        data.read_records(bad)
    bad.write_text("\n".join(good[:2] + ["", good[0][:14]]))  # a cut-off 4th line, after an empty 3rd
    with pytest.raises(ValueError, match=r"bad.jsonl: line 4: not valid JSON: .* \(column 15\)"):
        data.read_records(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(good[0].replace('"a.png"', '"nope.png"'))
    _, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    with pytest.raises(ValueError, match="missing.jsonl: record 0.*nope.png"):
        data.VPTDataset(str(missing), tok, img_cfg)[0]


# -----------------------------------------------------------------------------
# sample.py end to end


def test_sample_cli_matches_transformers_generate(chat_dir, capsys):
    image = str(chat_dir / "cat.png")
    got = sample.main(["--init_from", str(chat_dir), "--image", image, "--prompt", "Describe this image.",
                       "--max_new_tokens", "12", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert "prefill:" in err and "tokens/s" in err, f"timings missing from stderr: {err!r}"
    tok = Tokenizer(chat_dir)
    assert out.strip() == tok.decode(got).strip(), "stdout must be exactly the streamed completion"
    pv, grid = process_images([image], ImageConfig())
    ids, _ = encode_chat(tok, [{"role": "user", "content": "<image>Describe this image."}], grid, True)
    ids = torch.tensor([ids])
    with torch.no_grad():
        ref = load_hf(str(chat_dir)).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == tok.image_pad_id).int(),
            pixel_values=pv, image_grid_thw=grid, do_sample=False, repetition_penalty=1.0, max_new_tokens=12,
            eos_token_id=[tok.im_end_id, tok.endoftext_id], pad_token_id=tok.endoftext_id)[0, ids.size(1):].tolist()
    stop = {tok.im_end_id, tok.endoftext_id}
    ref = ref[:next((i for i, t in enumerate(ref) if t in stop), len(ref))]
    assert got == ref, f"sample.py {got} vs transformers {ref}"


def test_sample_cli_vpt_region_with_viz(vpt_dir, tmp_path, capsys):
    viz = tmp_path / "viz.png"
    sample.main(["--init_from", str(vpt_dir), "--image", str(vpt_dir / "a.png"), "--prompt", "Where is the dog?",
                 "--vpt", "region", "--max_new_tokens", "10", "--device", "cpu", "--save_viz", str(viz)])
    out, err = capsys.readouterr()
    assert "<|region_token_start|>" in err and "region: x cells" in err and "<|region_token" not in out
    img = np.array(Image.open(viz))
    assert ((img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 0)).sum() > 50, "no red box drawn"


def test_demo_runs_offline_from_the_shipped_checkpoint(tmp_path, monkeypatch, capsys):
    """python sample.py with no arguments (the README's third command): the quick start's model shipped in
    assets/synth answers the demo question about assets/demo.png right, prints its region tokens and draws the
    region. The scene was drawn before the model was trained (synth.make_scene with a seed of its own), and the
    truth comes from it: the region must be the asked shape's quadrant and stdout that shape's digit alone."""
    img, shapes, _ = synth.make_scene(random.Random(2033), "shapes")
    asked, = [s for s in shapes if f"on the {s['colour']} {s['shape']}?" in sample.DEMO_QUESTION]
    shipped = np.asarray(Image.open(os.path.join(sample.ASSETS, "demo.png")).convert("RGB"))
    assert np.array_equal(np.asarray(img), shipped), "assets/demo.png is not the scene the demo question is about"
    assert len(shapes) > 1, "the demo scene must make the model choose among shapes"
    monkeypatch.chdir(tmp_path)
    sample.main([])
    out, err = capsys.readouterr()
    (xs, ys), = vpt.parse_regions(err)  # one region group, printed on stderr as it was sampled
    x1, y1, x2, y2 = vpt.cells_to_box(xs, ys, synth.CANVAS, synth.CANVAS, synth.GRID, synth.MARGIN)
    assert vpt.box_to_cells(asked["box"], synth.CANVAS, synth.CANVAS, synth.GRID) == (xs[0], ys[0], xs[-1], ys[-1])
    assert out == asked["digit"] + "\n", f"stdout must hold the asked shape's digit alone: {out!r} ({asked})"
    assert f"question: {sample.DEMO_QUESTION}" in err, "the question is shown on stderr"
    viz = np.asarray(Image.open(tmp_path / "demo_region.png").convert("RGB")).astype(int)
    s = viz.shape[1] // synth.CANVAS  # the drawing is the scene enlarged by a whole factor, text below it
    assert s >= 2 and viz.shape[0] > s * synth.CANVAS, f"viz of {viz.shape} is not enlarged with a text band"
    red = (255, 0, 0)
    assert (viz[y1 * s, x1 * s:x2 * s] == red).all() and (viz[y2 * s - 1, x1 * s:x2 * s] == red).all(), "region box"
    assert (viz[s * synth.CANVAS:] < 128).any(), "the question and answer are written under the image"


def test_demo_model_and_image_are_the_defaults(tmp_path, monkeypatch, capsys):
    """Any flag without --init_from / --image keeps the demo's model and image (offline), with the question asked."""
    monkeypatch.chdir(tmp_path)
    sample.main(["--prompt", "What number is on the red circle?", "--save_viz", "x.png"])
    out, err = capsys.readouterr()
    assert "question: What number is on the red circle?" in err and out.strip().isdigit(), (out, err)
    assert (tmp_path / "x.png").exists() and not (tmp_path / "demo_region.png").exists()
    # a re-encoding round: its token ends its stderr line, and the answer alone reaches stdout
    sample.main(["--prompt", "How many checkered squares are there?", "--vpt", "reencode", "--save_viz", "y.png"])
    out, err = capsys.readouterr()
    assert "<|detection_action_start|>\n" in err and "re-encode: dino features" in err and out.strip().isdigit()


def test_streamer_prints_the_answer_without_special_tokens(vpt_dir, capsys):
    tok = Tokenizer(vpt_dir)
    streamer = sample.Streamer(tok)
    for t in [tok.token_to_id("<|im_start|>")] + tok.encode("A boat.") + [tok.vision_start_id]:
        streamer.put(t)
    streamer.close()
    assert capsys.readouterr().out == tok.decode(tok.encode("A boat.")) + "\n"


# -----------------------------------------------------------------------------
# synth.py: the synthetic set, and the quick start end to end


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synth.make_synth(d, n_train_images=6, n_val_images=2, n_ground_images=4, seed=1337)
    return d


def test_synth_is_deterministic_and_well_formed(synth_dir, tmp_path):
    synth.make_synth(tmp_path / "again", 6, 2, 4, seed=1337)
    synth.make_synth(tmp_path / "other", 6, 2, 4, seed=7)
    for name in ("train.jsonl", "val.jsonl", "train_baseline.jsonl", "tokenizer.json"):
        assert (synth_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), f"{name} not reproducible"
    assert (synth_dir / "train.jsonl").read_bytes() != (tmp_path / "other" / "train.jsonl").read_bytes()
    tok = Tokenizer(synth_dir)
    ids = vpt.Tokens.of(tok, "dino", synth.GRID)  # every perception token is there, and each is one id
    for name in ("<|region_token_start|>", f"<|x_{synth.GRID - 1}|>", "<|detection_action|>",
                 "<|detection_image_pad|>"):
        assert len(tok.encode(f"a{name}7")) == 3
    records = data.read_records(synth_dir / "train.jsonl")
    base = data.read_records(synth_dir / "train_baseline.jsonl")
    answered = [r for r in records if len(r["messages"]) == 4]  # the rest: "Where is ...?", answered by a region
    assert len(answered) == len(base) and len(records) > len(base) and any("detection_images" in r for r in records)
    assert all(r["messages"][0]["content"].startswith("<image>\nWhere is") for r in records if r not in answered)
    for r, b in zip(answered, base):
        assert b["messages"][-1]["content"] == r["messages"][-1]["content"].removeprefix(data.ANSWER_PREFIX)
    for r in records:
        if "box" in r:
            (xs, ys), = vpt.parse_regions(r["messages"][1]["content"])
            x1, y1, x2, y2 = r["box"]
            assert vpt.box_to_cells(r["box"], synth.CANVAS, synth.CANVAS, synth.GRID) == (xs[0], ys[0], xs[1], ys[1])
            _, crop = data.parse_image_ref(r["images"][-1], "")  # a "Where is" record: the whole image
            assert crop is None if len(r["images"]) == 1 else (
                crop[0] <= x1 and crop[1] <= y1 and x2 <= crop[2] and y2 <= crop[3]), "the crop must hold the box"
    assert ids.region_start in tok.encode(records[0]["messages"][1]["content"]) or ids.act_start in tok.encode(
        records[0]["messages"][1]["content"])


def test_synth_labels_vanish_in_the_global_view_only():
    """The design claim: all ten digits look alike at the global view's 1/2 scale and differ clearly in a crop (full
    resolution), with the plate where the set puts it (on the token grid, so at an even pixel phase: only the font
    cells' corners leave up to 4 grey levels at 1/2, under the objects' noise of std 12). The counting family's
    checkered and plain squares, at even pixels too: alike at 1/2, different in the DINOv2 view (224 -> 256)."""
    def view(pixels, x, scale):
        canvas = np.full((112, 112), synth.GREY, np.uint8)
        h, w = pixels.shape
        canvas[synth.PLATE_Y[0]:synth.PLATE_Y[0] + h, x:x + w] = pixels
        side = round(112 * scale)
        return np.asarray(Image.fromarray(canvas).resize((side, side), Image.BICUBIC), np.float32)
    for x in synth.PLATE_X:
        views = [view(synth.label_pixels(str(d)), x, 1 / 2) for d in range(10)]
        pairs = [np.abs(a - b) for i, a in enumerate(views) for b in views[i + 1:]]
        assert max(p.max() for p in pairs) <= 4 and max(p.mean() for p in pairs) <= 0.05, f"x {x}: digits show at 1/2"
        views = [view(synth.label_pixels(str(d)), x, 1.0) for d in range(10)]
        assert min(np.abs(a - b).max() for i, a in enumerate(views) for b in views[i + 1:]) >= 40
    plain, checkered = np.full((synth.TILE, synth.TILE), synth.GREY, np.uint8), synth.checker(synth.TILE, synth.TILE)
    assert np.abs(view(checkered, 16, 1 / 2) - view(plain, 16, 1 / 2)).max() <= 4
    assert np.abs(view(checkered, 16, 256 / 224) - view(plain, 16, 256 / 224)).max() >= 40


def test_synth_plates_sit_on_the_token_grid():
    """Every label plate starts on the 28-px token grid (so in a quadrant crop each ViT patch is all checkerboard or
    all grey, and a digit always fills the same tokens) and lies inside its shape, which lies inside its own
    quadrant."""
    for seed in range(50):
        _, shapes, _ = synth.make_scene(random.Random(seed), "shapes")
        for s in shapes:
            x, y = synth.label_origin(s["box"])
            x1, y1, x2, y2 = s["box"]
            assert x % synth.TOKEN_PX == 0 and y % synth.TOKEN_PX == 0, (seed, s)
            assert x1 <= x and x + synth.LABEL_W <= x2 and y1 <= y and y + synth.LABEL_H <= y2, (seed, s)
            assert x1 // synth.CELL == (x2 - 1) // synth.CELL and y1 // synth.CELL == (y2 - 1) // synth.CELL, (seed, s)
            if s["shape"] == "circle":  # the plate's corners inside the circle PIL draws (radius (size - 1) / 2)
                r, cx, cy = (x2 - x1 - 1) / 2, (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2
                assert max(abs(px - cx) for px in (x, x + synth.LABEL_W - 1)) ** 2 + \
                    max(abs(py - cy) for py in (y, y + synth.LABEL_H - 1)) ** 2 <= r ** 2, (seed, s)


def test_synth_pipeline_end_to_end(synth_dir, tmp_path, capsys):
    """A few steps of the quick start's two runs on a tiny synthetic set, then sample.py --eval on each (the
    pipeline, not the accuracy)."""
    common = [f"--tokenizer={synth_dir / 'tokenizer.json'}", "--model_preset=tiny", "--max_iters=2",
              "--batch_size=4", "--eval_interval=0", "--eval_iters=1", "--num_workers=0", "--device=cpu",
              "--max_pixels=12544", "--stage=all", "--lr=1e-3"]
    train.main(train.parse_config([f"--train_data={synth_dir / 'train.jsonl'}", f"--val_data={synth_dir / 'val.jsonl'}",
                                   f"--out_dir={tmp_path / 'vpt'}", *common]))
    train.main(train.parse_config([f"--train_data={synth_dir / 'train_baseline.jsonl'}",
                                   f"--val_data={synth_dir / 'val_baseline.jsonl'}", f"--out_dir={tmp_path / 'base'}",
                                   "--use_vpt=False", *common]))
    # the grounding stage, then a VPT run that continues from it (config/synth_ground.py, then --init_from)
    train.main(train.parse_config([f"--train_data={synth_dir / 'ground.jsonl'}", "--grid=2",
                                   f"--val_data={synth_dir / 'ground_val.jsonl'}", f"--out_dir={tmp_path / 'ground'}",
                                   *common]))
    grounded = train.main(train.parse_config([f"--train_data={synth_dir / 'train.jsonl'}", "--grid=2",
                                              f"--val_data={synth_dir / 'val.jsonl'}", f"--out_dir={tmp_path / 'g'}",
                                              *common, f"--init_from={tmp_path / 'ground'}"]))
    assert grounded.vcfg.grid == 2 and grounded.tokens.act is not None
    gb = tmp_path / "gb"
    base = train.main(train.parse_config([f"--train_data={synth_dir / 'train_baseline.jsonl'}", "--use_vpt=False",
                                          f"--val_data={synth_dir / 'val_baseline.jsonl'}", f"--out_dir={gb}",
                                          *common, f"--init_from={tmp_path / 'ground'}"]))  # the baseline, from it too
    assert type(base) is M.Qwen2VL, "the baseline continues as a plain Qwen2-VL, without DINOv2 and the projector"
    saved = gb / (gb / "latest").read_text().strip() / "config.json"
    assert json.loads(saved.read_text())["model_type"] == "qwen2_vl"
    n = len(data.read_records(synth_dir / "val.jsonl"))
    r = sample.main(["--init_from", str(tmp_path / "vpt"), "--eval", str(synth_dir / "val.jsonl"), "--vpt", "region",
                     "--max_new_tokens", "12", "--device", "cpu"])
    assert r["region"] == 1.0 and 0.0 <= r["iou"] <= 1.0, r  # forced: every answer selected a region
    records = data.read_records(synth_dir / "val.jsonl")
    kinds = {rec["kind"] for rec in records}
    assert set(r["kinds"]) == kinds and len(kinds) >= 2, r["kinds"]  # the fixture's few scenes give two or more
    for kind, k in r["kinds"].items():  # digits have a box and a region per answer; counts neither
        assert (k["cells"] is None) == (kind == "counts") and 0.0 <= k["accuracy"] <= 1.0, (kind, k)
    r = sample.main(["--init_from", str(tmp_path / "base"), "--eval", str(synth_dir / "val_baseline.jsonl"), "--vpt",
                     "off", "--max_new_tokens", "4", "--device", "cpu"])
    assert r["region"] == 0.0 and 0.0 <= r["accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert f"({n} records, --vpt region): exact match" in out and "region IoU" in out
    assert all(f"\n  {kind} (" in out for kind in kinds) and "region cells right" in out, "a line per record kind"


# -----------------------------------------------------------------------------
# --- SAM (issue 15): the image encoder (encoders.py), its preprocessing (data.py), the sam VPT model (vpt.py), and
# the re-encode equalities held over all three encoders (dino, clip, sam)

# SAM-sized tiny encoders: one windowed block (window 14 pads the 64x64 grid to 70x70) and one global block, at the
# real 1024 pad size and at a non-default 160 px (a 10x10 grid, window 4 padded to 12x12)
TINY_SAM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, output_channels=32,
                global_attn_indexes=[1])
SAM_SIZES = {"1024": {}, "160": dict(image_size=160, window_size=4)}


def _write_hf_sam(path, **vision):
    """A tiny full SamModel (vision encoder, prompt encoder, mask decoder) written by transformers' save_pretrained."""
    torch.manual_seed(0)
    cfg = HFSamConfig(vision_config={**TINY_SAM, **vision}, prompt_encoder_config=dict(hidden_size=32),
                      mask_decoder_config=dict(hidden_size=32, num_hidden_layers=1, mlp_dim=64,
                                               num_attention_heads=2, iou_head_hidden_dim=32))
    return _save_noisy(SamModel(cfg), path)


@pytest.fixture(scope="module")
def sam_dirs(tmp_path_factory):
    return {name: _write_hf_sam(tmp_path_factory.mktemp(f"sam{name}"), **kw) for name, kw in SAM_SIZES.items()}


@pytest.mark.parametrize("size", list(SAM_SIZES))
def test_sam_image_embeddings_match_transformers(sam_dirs, size):
    hf = SamModel.from_pretrained(sam_dirs[size], dtype=torch.float32, attn_implementation="eager").eval()
    ours = encoders.sam_from_pretrained(str(sam_dirs[size]))
    assert ours.config.global_attn_indexes == (1,) and ours.config.window_size > 0, "windowed and global blocks"
    S = ours.config.image_size
    pixel_values = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = hf.get_image_embeddings(pixel_values), ours(pixel_values)
    assert out.shape == ref.shape == (1, 32, S // 16, S // 16), (out.shape, ref.shape)
    diff = (out - ref).abs().max().item()
    print(f"sam {S}x{S}: max|diff| = {diff:.3g}")
    assert diff <= 1e-4, f"image embeddings differ by {diff} at {S}"


def test_sam_config_from_state_dict_and_unused_keys(sam_dirs):
    for path in sam_dirs.values():
        from_hf = encoders.SamConfig.from_hf(json.loads((path / "config.json").read_text()))
        sd = load_file(path / "model.safetensors")
        assert {k.split(".")[0] for k in sd} >= {"prompt_encoder", "mask_decoder"}, "a full SAM checkpoint"
        seg = {"seg_model." + k: v for k, v in encoders.sam_vision_weights(sd).items()}  # the VPT-Seg layout
        assert encoders.SamConfig.from_state_dict(seg, prefix="seg_model.") == from_hf
    with pytest.raises(KeyError, match="unexpected keys stray.weight"):
        encoders.sam_vision_weights({**sd, "stray.weight": torch.zeros(1)})


def _hf_sam_pixels(img):
    return SamImageProcessorPil()(img, return_tensors="pt")["pixel_values"][0]  # sam-vit-* Hub values


SAM_IMAGES = {"square": (300, 300, "RGB"), "wide": (640, 427, "RGB"), "tall": (333, 700, "RGB"),
              "tiny": (7, 5, "RGB"), "RGBA": (250, 180, "RGBA"), "L": (200, 260, "L"), "odd": (1023, 511, "RGB")}


@pytest.mark.parametrize("name", list(SAM_IMAGES))
def test_process_sam_image_matches_sam_processor(name):
    w, h, mode = SAM_IMAGES[name]
    a = np.random.default_rng(4).integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    img = Image.fromarray(a[..., 0] if mode == "L" else a, mode)
    ours, ref = data.process_sam_image(img), _hf_sam_pixels(img)
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape == (3, 1024, 1024)
    diff = (ours - ref).abs().max().item()
    print(f"process_sam_image {name} {w}x{h}: max|diff| = {diff:.3g}")
    assert diff == 0.0, f"pixel values differ by {diff} for a {w}x{h} {mode} image"


def test_process_sam_image_nearest_downscale_first():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (900, 1500, 3), dtype=np.uint8))
    small = img.resize((1024, int(900 * 1024 / 1500)), resample=Image.NEAREST)  # LLaMA-Factory's limit at 1024
    ours = data.process_sam_image(img)
    assert torch.equal(ours, _hf_sam_pixels(small)), "the NEAREST pre-downscale, then SamImageProcessor"
    assert not torch.equal(ours, _hf_sam_pixels(img)), "the pre-downscale must change the result"


REENCODERS = ["dino", "clip", "sam"]


@pytest.fixture(scope="module")
def reencode_dirs(chat_dir, dino_dir, tmp_path_factory):
    """One tiny VPT checkpoint per re-encoder, each started with vpt.from_base, with the same records (the
    re-encoding ones use that encoder's tokens and placeholder). The SAM takes the real 1024 px input with windowed
    blocks only, to stay fast (the global block is held to transformers above)."""
    sam_dir = _write_hf_sam(tmp_path_factory.mktemp("sam_vpt"), global_attn_indexes=[])
    dirs = {}
    for enc in REENCODERS:
        model, tok, _ = vpt.from_base(str(chat_dir), enc, dino=str(dino_dir), sam=str(sam_dir))
        torch.manual_seed(3)
        with torch.no_grad():  # a larger std, so that every detail of the wiring shows in the numbers
            for p in model.parameters():
                p.normal_(0, 0.1)
        d = tmp_path_factory.mktemp(f"vpt_{enc}")
        vpt.save(model, tok, ImageConfig(max_pixels=112 * 112), d)
        Image.fromarray(_rgb(200, 260, seed=5)).save(d / "a.png")
        p, (ph, key) = vpt.PREFIX[enc], data.EXTRA_PLACEHOLDERS[enc]
        act = f"<|{p}_action_start|><|{p}_action|><|{p}_action_end|>"
        answer = "Now answer the question.\n"
        records = [
            {"messages": [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                          {"role": "assistant", "content": act}, {"role": "user", "content": ph},
                          {"role": "assistant", "content": answer + "A small boat."}],
             "images": ["a.png"], key: ["a.png"]},
            {"messages": [{"role": "user", "content": "<image>\nWhere is the dog?"},
                          {"role": "assistant", "content": vpt.region_text((1, 2, 3, 4))},
                          {"role": "user", "content": "<image>"},
                          {"role": "assistant", "content": answer + "In the top left corner."}],
             "images": ["a.png", "a.png_20,30,120,150"]},
            {"messages": [{"role": "user", "content": "<image>\nHow many people are there?"},
                          {"role": "assistant", "content": act}, {"role": "user", "content": ph},
                          {"role": "assistant", "content": answer + "There are 12 people."}],
             "images": ["a.png"], key: ["a.png_10,10,150,190"]},
        ]
        (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        dirs[enc] = d
    dirs["sam_hub"] = sam_dir
    return dirs


def _reencode_batch(d, mask_prob=0.0):
    model, tok, img_cfg = vpt.from_pretrained(str(d))
    T = model.tokens
    ds = data.VPTDataset(str(d / "records.jsonl"), tok, img_cfg, model.vcfg.encoder, T.pad, T.act)
    b = data.collate([ds[i] for i in range(len(ds))], tok.endoftext_id, tok.image_pad_id, 2)
    b["mask_modeling"][:] = mask_prob > 0
    return model, tok, b


def test_sam_vpt_model_from_base(reencode_dirs, chat_dir):
    model, tok, b = _reencode_batch(reencode_dirs["sam"])
    T = model.tokens
    assert tok.token_to_id("<|seg_image_pad|>") == T.pad and tok.token_to_id("<|seg_action|>") == T.act
    assert b["extra"].shape == (2, 3, 1024, 1024), "one SAM view per re-encoding record, padded to 1024"
    assert int((b["input_ids"] == T.pad).sum()) == 2 * data.SAM_TOKENS == 512
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert {"seg_model", "seg_projector"} <= names and not {"detection_model", "clip_projector"} & names
    fresh, _, _ = vpt.from_base(str(chat_dir), "sam", sam=str(reencode_dirs["sam_hub"]))
    sam = encoders.sam_from_pretrained(str(reencode_dirs["sam_hub"]))
    assert all(torch.equal(a, b) for a, b in zip(fresh.seg_model.parameters(), sam.parameters()))
    assert fresh.seg_projector.conv_feature.weight.shape == (64, 32, 4, 4) and not hasattr(fresh.seg_projector,
                                                                                            "linear_feature")
    with torch.no_grad():  # the projector's conv: 4x4 cells of the 64x64 map, row-major, each LayerNormed first
        f = torch.randn(1, 32, 64, 64)
        got = fresh.seg_projector(f)
        cell = F.layer_norm(f[0, :, 4:8, 8:12].permute(1, 2, 0), (32,))  # row 1, column 2 -> token 16 + 2
        p = fresh.seg_projector
        want = torch.einsum("ijc,ocij->o", cell, p.conv_feature.weight) + p.conv_feature.bias
    assert got.shape == (256, 64) and torch.allclose(got[18], want, atol=1e-5)


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
@pytest.mark.parametrize("enc", REENCODERS)
def test_reencode_one_pass_equals_two_passes(reencode_dirs, enc, mask_prob):
    model, tok, b = _reencode_batch(reencode_dirs[enc], mask_prob)
    for name in ("detection_model", "seg_model"):  # frozen, as in training (and SAM's backward at 1024 px is slow)
        if hasattr(model, name):
            getattr(model, name).requires_grad_(False)
    losses, grads = one_pass_and_two_pass(model, b)
    assert set(grads[0]) == set(grads[1])
    assert any(n.startswith(f"{vpt.PREFIX[enc]}_projector.linear_condition") for n in grads[0]), "gate untrained"
    gdiff = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    print(f"{enc} mask_prob {mask_prob}: loss {losses[0]:.6f} vs {losses[1]:.6f} "
          f"(diff {abs(losses[0] - losses[1]):.2e}), max grad diff {gdiff:.2e}")
    assert abs(losses[0] - losses[1]) <= 1e-5 and gdiff <= 1e-5


def _reencode_transcript_logits(model, img_cfg, s):
    """A fresh prefill of a re-encode answer's whole transcript through the training forward: last logits."""
    ids = torch.tensor([s.transcript])
    view = data.limit_side(s.original, model.vcfg.image_resolution)
    pv, grid = process_images([view], img_cfg)
    extra = {"dino": lambda: process_dino_image(view, model.vcfg.image_resolution)[None],
             "sam": lambda: data.process_sam_image(s.original)[None],  # from the original, long side 1024
             "clip": lambda: (pv, grid)}[model.vcfg.encoder]()
    pos, _ = M.get_rope_index(ids, grid, None, model.cfg.image_token_id)
    batch = dict(input_ids=ids, padding_mask=torch.ones_like(ids), position_ids=pos, pixel_values=pv,
                 image_grid_thw=grid, extra=extra, extra_rows=torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        return model(batch)[0][0, -1]


@pytest.mark.parametrize("enc", REENCODERS)
def test_reencode_sampler_cache_equals_fresh_prefill(reencode_dirs, enc):
    d = reencode_dirs[enc]
    model, tok, img_cfg = vpt.from_pretrained(str(d))
    s = vpt.answer(model, tok, img_cfg, d / "a.png", "Where is the dog?", mode="reencode", max_new_tokens=10)
    out, T = s.ids, model.tokens
    assert out[0] == T.act_start and [r.kind for r in s.rounds] == ["reencode"]
    assert T.act in s.transcript and T.pad in s.transcript and len(out) > 1, "the answer goes on after the round"
    diff = (_reencode_transcript_logits(model, img_cfg, s) - s.logits).abs().max().item()
    print(f"{enc} reencode: cached vs fresh-prefill logits {diff:.2e}")
    assert diff <= 1e-5, f"{enc}: the continued cache differs from a fresh prefill by {diff}"


def _write_seg_layout(src, dst):
    """Our sam checkpoint rewritten as the authors' class writes a Seg model: pytorch_model.bin, a flat 4.45-style
    config without a SAM config, and MinimalSamProjector's unused linear_feature."""
    sd = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["vpt"]
    cfg["rope_scaling"] = {"mrope_section": cfg["rope_scaling"]["mrope_section"], "rope_type": "default",
                           "type": "default"}
    cfg.update({f"{p}_{k}": None for p in ("detection", "clip") for k in ("image_token_id", "action_id",
                                                                           "action_start_id")})
    H, Co = cfg["hidden_size"], sd["seg_projector.layernorm_feature.weight"].shape[0]
    sd["seg_projector.linear_feature.weight"] = torch.randn(H, Co) * 0.05  # Linear(256 -> H) in theirs
    sd["seg_projector.linear_feature.bias"] = torch.zeros(H)
    os.makedirs(dst, exist_ok=True)
    torch.save(sd, dst / "pytorch_model.bin")
    (dst / "config.json").write_text(json.dumps(cfg))
    Tokenizer(src).save(dst)
    ImageConfig.from_dir(src).save(dst)
    return sd


def test_authors_seg_layout_loads_strictly(reencode_dirs, tmp_path, capsys):
    src = reencode_dirs["sam"]
    ours, tok, b = _reencode_batch(src)
    seg = tmp_path / "seg"
    _write_seg_layout(src, seg)
    theirs, ttok, _ = vpt.from_pretrained(str(seg))
    assert theirs.vcfg.encoder == "sam" and theirs.vcfg.sam == ours.vcfg.sam, "SAM config read off the tensors"
    assert theirs.tokens == ours.tokens
    with torch.no_grad():
        diff = (theirs(b)[0] - ours(b)[0]).abs().max().item()
    assert diff == 0.0, f"logits differ by {diff}"
    # sample.py answers with a SAM round from the Seg layout
    sample.main(["--init_from", str(seg), "--image", str(src / "a.png"), "--prompt", "Where is the dog?",
                 "--vpt", "reencode", "--max_new_tokens", "4", "--device", "cpu"])
    assert "re-encode: sam features" in capsys.readouterr().err
    # a missing key is an error naming it
    sd = torch.load(seg / "pytorch_model.bin", weights_only=True)
    del sd["seg_model.layers.1.attn.rel_pos_w"]
    torch.save(sd, seg / "pytorch_model.bin")
    with pytest.raises(KeyError, match="missing.*seg_model.layers.1.attn.rel_pos_w"):
        vpt.from_pretrained(str(seg))


def test_sam_training_stages(reencode_dirs):
    """The Seg recipes' freezing: align trains the projector's feature path only (LayerNorm + conv), finetune all
    but the vision encoders (the authors' freefreeze_frozen_modules: visual,seg_model)."""
    model, _, _ = vpt.from_pretrained(str(reencode_dirs["sam"]))
    for stage in ("align", "finetune"):
        train.param_groups(model, train.parse_config(["--encoder=sam", f"--stage={stage}"]))
        trained = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
        if stage == "align":
            assert trained == {"seg_projector.layernorm_feature", "seg_projector.conv_feature"}, trained
        else:
            assert {"seg_projector.conv_feature", "seg_projector.linear_condition", "model.norm"} <= trained
            assert not any(n.startswith(("seg_model.", "visual.")) for n in trained), trained


def test_sam_recipes_parse():
    here = os.path.dirname(os.path.abspath(__file__))
    align = train.parse_config([os.path.join(here, "config", "align_2b_sam.py")])
    seg = train.parse_config([os.path.join(here, "config", "vpt_2b_seg.py")])
    assert (align.encoder, align.stage, align.lr, align.batch_size * align.grad_accum) == ("sam", "align", 2e-3, 64)
    assert (seg.encoder, seg.stage, seg.lr, seg.batch_size * seg.grad_accum, seg.mask_prob) == ("sam", "finetune",
                                                                                              2e-5, 32, 0.5)
    assert seg.init_from == align.out_dir, "stage 2 starts from stage 1's checkpoint"


# -----------------------------------------------------------------------------
# --- faults and bad input (issue 12): every row of the issue as a small generated input and the expected sentence

class Killed(BaseException):
    """A simulated SIGKILL: no `except Exception` in the code under test catches it, so nothing cleans up."""


@pytest.fixture(scope="module")
def saved_run(vpt_dir, tmp_path_factory):
    """One 4-step run saving at steps 3 and 4: its out_dir ("full"), a copy as it was after step 3 ("after3"), the
    final model, and the arguments and RNG state of the step-4 save, to replay that save elsewhere (nothing changes
    the model or optimizer after it)."""
    d = tmp_path_factory.mktemp("crash")
    real, saves = train.save_checkpoint, {}

    def save(*a):
        real(*a)
        saves[a[4]] = a, torch.get_rng_state()
        if a[4] == 3:
            shutil.copytree(d / "full", d / "after3", ignore=shutil.ignore_patterns("train.lock"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_checkpoint", save)
        full = train.main(train_cfg(vpt_dir, d / "full", "--eval_interval=3", "--eval_iters=1"))
    return d, full, saves[4]


def replay_save(saved_run, out_dir):
    """The run's step-4 save, into another out_dir."""
    (model, tok, img_cfg, optimizer, it, best, cfg), rng = saved_run[2]
    torch.set_rng_state(rng)
    train.save_checkpoint(model, tok, img_cfg, optimizer, it, best, dataclasses.replace(cfg, out_dir=str(out_dir)))


def files_of(d):
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_checkpoint_survives_a_kill_after_every_rename(vpt_dir, saved_run, monkeypatch):
    d, full, _ = saved_run
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: the killed run's lock file names it
    step_sd = {3: vpt.from_pretrained(str(d / "after3"))[0].state_dict(),
               4: vpt.from_pretrained(str(d / "full"))[0].state_dict()}
    real_replace, seen, k = os.replace, set(), 0
    while True:  # kill the step-4 save after its k-th rename, for k = 0, 1, ... until a save completes
        out = d / f"kill{k}"
        shutil.copytree(d / "after3", out)
        (out / "train.lock").write_text(f"{dead.pid} on {os.uname().nodename}\n")
        calls = []

        def replace(a, b):  # k = 0: killed before the first rename; k > 0: right after the k-th
            if k == 0:
                raise Killed
            real_replace(a, b)
            calls.append(b)
            if len(calls) == k:
                raise Killed

        monkeypatch.setattr(os, "replace", replace)
        try:
            replay_save(saved_run, out)
            completed = True
        except Killed:
            completed = False
        monkeypatch.setattr(os, "replace", real_replace)
        step = json.loads((Path(M.checkpoint_dir(str(out))) / M.MANIFEST).read_text())["step"]
        seen.add(step)
        loaded = vpt.from_pretrained(str(out))[0].state_dict()
        assert all(torch.equal(loaded[n], t) for n, t in step_sd[step].items()), f"kill {k}: not step {step}'s weights"
        resumed = train.main(train_cfg(vpt_dir, out, "--eval_interval=3", "--eval_iters=1", "--init_from=resume"))
        for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), f"kill after rename {k}: {n} differs from the uninterrupted run after resume"
        if completed:
            break
        k += 1
    print(f"{k} kill points (before the first rename and after each of the {k - 1} renames of a save); out_dir "
          f"loaded steps {sorted(seen)}; every resume bit-identical to the uninterrupted run")
    assert k >= 9 and seen == {3, 4}, (k, seen)


def test_mixed_checkpoint_is_refused(saved_run, tmp_path):
    d = saved_run[0]
    mixed = tmp_path / "mixed"
    shutil.copytree(d / "after3", mixed)
    ckpt = Path(M.checkpoint_dir(str(mixed)))
    shutil.copy(Path(M.checkpoint_dir(str(d / "full"))) / "model.safetensors", ckpt / "model.safetensors")
    with pytest.raises(M.UserError, match="model.safetensors is not the file checkpoint.json lists.*mixed"):
        vpt.from_pretrained(str(mixed))
    with pytest.raises(M.UserError, match="mixed"):
        train.parse_config([f"--out_dir={mixed}", "--init_from=resume"])
    (mixed / "latest").write_text("ckpt-000009\n")
    with pytest.raises(M.UserError, match="latest names .*ckpt-000009, which is not a complete checkpoint"):
        M.open_checkpoint(str(mixed))


@pytest.mark.parametrize("failure", ["ENOSPC", "torch short write"])
def test_disk_full_during_a_save_keeps_the_last_checkpoint(failure, saved_run, tmp_path, monkeypatch):
    out = tmp_path / "o"
    shutil.copytree(saved_run[0] / "after3", out)
    before = files_of(out)
    real = torch.save

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # what a write cut short leaves
        if failure == "ENOSPC":
            raise OSError(28, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 50")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(M.UserError, match=r"no space left on the device writing .*optimizer.pt; the checkpoint of "
                                          r"step 3 in .*ckpt-000003 is intact and the temporary files are removed"):
        replay_save(saved_run, out)
    monkeypatch.setattr(torch, "save", real)
    assert files_of(out) == before, "the previous checkpoint changed, or temporary files were left"


def test_new_run_refuses_an_out_dir_holding_a_checkpoint(saved_run, tmp_path, monkeypatch, vpt_dir):
    out = tmp_path / "o"
    shutil.copytree(saved_run[0] / "after3", out)
    with pytest.raises(M.UserError, match=f"{out} already holds a checkpoint; continue it with --init_from=resume, "
                                          f"choose another --out_dir, or replace it with --overwrite=True"):
        train.main(train_cfg(vpt_dir, out))
    monkeypatch.setattr(train, "run", lambda cfg: "ran")
    assert train.main(train_cfg(vpt_dir, out, "--overwrite=True")) == "ran"
    assert not (out / "train.lock").exists(), "the lock outlived its run"


def test_a_second_run_into_one_out_dir_names_the_holder(vpt_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "train.lock").write_text(f"{os.getpid()} on {os.uname().nodename}\n")  # a live process holds it
    with pytest.raises(M.UserError, match=f"in use by another run \\(pid {os.getpid()} on {os.uname().nodename}"):
        train.main(train_cfg(vpt_dir, out))
    monkeypatch.setattr(train, "run", lambda cfg: (out / "train.lock").read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / "train.lock").write_text(f"{dead.pid} on {os.uname().nodename}\n")  # left by a killed run: taken over
    assert train.main(train_cfg(vpt_dir, out)).startswith(f"{os.getpid()} on")


def test_resume_restores_the_saved_settings(saved_run, tmp_path):
    out = saved_run[0] / "after3"
    cfg = train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=8", "--eval_iters=3"])
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.stage, cfg.max_iters, cfg.eval_iters) == \
        (3e-3, 2, 2, "all", 8, 3), "the saved settings, with the changeable ones given"
    with pytest.raises(M.UserError, match=r"lr=0.001 \(saved 0.003\), batch_size=8 \(saved 2\) differ; only "
                                          r"init_from, out_dir, .*max_iters"):
        train.parse_config([f"--out_dir={out}", "--init_from=resume", "--lr=1e-3", "--batch_size=8"])
    with pytest.raises(M.UserError, match=f"{tmp_path} holds no checkpoint to continue"):
        train.parse_config([f"--out_dir={tmp_path}", "--init_from=resume"])


@pytest.mark.parametrize("arg, message", [
    ("--max_iters=-5", "--max_iters=-5: must be at least 1"), ("--grad_accum=0", "--grad_accum=0: must be at least 1"),
    ("--dtype=foo", "--dtype='foo': must be one of float32, bfloat16"),
    ("--model_preset=huge", "--model_preset='huge': must be one of qwen2-vl-2b, qwen2-vl-7b, synth, tiny"),
    ("--encoder=nope", "--encoder='nope': must be one of dino, clip"), ("--mask_prob=1.5", "must be in \\[0, 1\\]"),
    ("--device=gpu", "--device='gpu': must be cpu, cuda or cuda:N")])
def test_train_options_are_checked_at_parse_time(arg, message):
    with pytest.raises(M.UserError, match=message):
        train.parse_config([arg])


def test_train_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(M.UserError, match="--device='cuda': must be cpu: this machine has no CUDA device"):
        train.parse_config(["--device=cuda"])


def test_config_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "c.py"
    f.write_text('lr = 1e-3\nmax_iters = __import__("os").system("echo hi")\n')
    with pytest.raises(M.UserError, match=r"c.py:2: max_iters = __import__\('os'\).system\('echo hi'\) is not a "
                                          r"literal .* never run"):
        train.parse_config([str(f)])
    f.write_text("lr = (1e-3\n")
    with pytest.raises(M.UserError, match="c.py:1: '\\(' was never closed"):
        train.parse_config([str(f)])


def test_checkpoint_files_honour_the_umask(saved_run):
    ckpt = Path(M.checkpoint_dir(str(saved_run[0] / "full")))
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in ckpt.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def write_records(d, *records):
    """Records as JSON lines in d, beside a 260x200 image a.png; returns the file."""
    d.mkdir(exist_ok=True)
    Image.fromarray(_rgb(200, 260, seed=5)).save(d / "a.png")
    f = d / "records.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f


GOOD = {"messages": [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                     {"role": "assistant", "content": "A boat."}], "images": ["a.png"]}


def with_(**kw):
    return {**GOOD, **kw}


@pytest.mark.parametrize("bad, message", [
    (with_(messages=[{"role": r, "content": c} for r, c in [("assistant", "x"), ("user", "<image>"), ("user", "y"),
                                                            ("assistant", "z")]]),
     "record 1: messages: roles assistant, user, user, assistant are out of order"),
    (with_(images="a.png"), "record 1: images: must be a list of image file names, not 'a.png'"),
    (with_(images=["a.png_1,2,3"]), r"record 1: images\[0\] 'a.png_1,2,3': crop suffix _1,2,3 must be _x1,y1,x2,y2"),
    (with_(images=["a.png_112,0,0,112"]), r"record 1: images\[0\] 'a.png_112,0,0,112': .*x1 < x2 and y1 < y2"),
    (with_(images=["a.png_200,150,400,400"]),
     r"record 1: images\[0\] 'a.png_200,150,400,400': crop box \(200, 150, 400, 400\) is outside the 260x200 image"),
    (with_(images=["nope.png"]), r"record 1: images\[0\] 'nope.png': image file not found"),
    (with_(images=["big.png"]), r"record 1: images\[0\] 'big.png': cannot read image .*big.png: Image size"),
    (with_(messages=[{"role": "user", "content": "<image><seg_image>\nWhat is in the picture?"},
                     {"role": "assistant", "content": "A boat."}], seg_images=["nope.png"]),
     r"record 1: seg_images\[0\] 'nope.png': image file not found"),  # every image list is checked, SAM's too
])
def test_record_errors_name_file_record_and_field(bad, message, tmp_path, vpt_dir, monkeypatch):
    f = write_records(tmp_path, GOOD, bad)
    Image.new("RGB", (400, 400)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60000)  # 400x400 is over twice that: a decompression bomb
    tok = Tokenizer(vpt_dir)
    with pytest.raises(M.UserError, match=f"{f}: {message}"):
        data.VPTDataset(str(f), tok, ImageConfig())  # at construction: when the run starts, every image header once


def test_a_bad_val_image_stops_the_run_before_any_step(vpt_dir, tmp_path):
    val = write_records(tmp_path / "v", GOOD, with_(images=["a.png_0,0,300,100"]))
    with pytest.raises(M.UserError, match=r"records.jsonl: record 1: images\[0\] .* is outside the 260x200 image"):
        train.main(train_cfg(vpt_dir, tmp_path / "o", f"--val_data={val}"))
    assert not (tmp_path / "o" / "latest").exists()


def test_eval_asks_the_first_user_turn_with_its_system_message(vpt_dir, chat_dir, tmp_path, monkeypatch, capsys):
    system = {"role": "system", "content": "Answer in one word."}
    f = write_records(tmp_path, {**GOOD, "messages": [system, *GOOD["messages"]]},
                      {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]})
    asked, real = [], vpt.Engine.answer

    def answer(self, requests, on_token=None):
        asked.extend((r.image is not None, r.prompt, r.system) for r in requests)
        return real(self, requests, on_token)

    monkeypatch.setattr(vpt.Engine, "answer", answer)
    sample.main(["--init_from", str(vpt_dir), "--eval", str(f), "--max_new_tokens", "3", "--device", "cpu"])
    assert asked == [(True, "What is in the picture?", "Answer in one word."), (False, "Say hi.", None)], asked
    prompts, real_gen = [], M.generate
    monkeypatch.setattr(M, "generate", lambda m, ids, *a: prompts.append(ids) or real_gen(m, ids, *a))
    sample.main(["--init_from", str(chat_dir), "--eval", str(f), "--vpt", "off", "--max_new_tokens", "3",
                 "--device", "cpu"])
    tok = Tokenizer(chat_dir)
    text = [tok.decode(p[0].tolist()) for p in prompts]
    assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in text[0] and "What is in the picture?" in text[0]
    assert "<|vision_start|>" not in text[1] and "Say hi." in text[1], text[1]
    assert "exact match" in capsys.readouterr().out


def test_thin_images_stay_legal_and_too_thin_ones_say_their_size(vpt_dir, tmp_path):
    Image.fromarray(_rgb(10, 1990, seed=1)).save(tmp_path / "thin.png")  # ratio 199: Qwen2-VL takes it
    Image.new("RGB", (10000, 10)).save(tmp_path / "wide.png")
    assert data.limit_side(Image.open(tmp_path / "thin.png"), 512).size == (512, 3)
    model, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    res = vpt.answer(model, tok, img_cfg, str(tmp_path / "thin.png"), "What is written?", mode="region",
                     max_new_tokens=8)  # a region round on a 1990x10 image
    assert [r.kind for r in res.rounds] == ["region"]
    with pytest.raises(M.UserError, match=r"--image .*wide.png: image of 10000x10 \(WxH\) has aspect ratio 1000, "
                                          r"above the 200 that Qwen2-VL's image processor takes"):
        sample.main(["--init_from", str(vpt_dir), "--image", str(tmp_path / "wide.png"), "--device", "cpu"])


def test_loader_errors_name_the_file(vpt_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(vpt_dir, d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "added_tokens": [')
    with pytest.raises(M.UserError, match=f"{d / 'tokenizer.json'}: not a valid tokenizer.json .*EOF"):
        vpt.from_pretrained(str(d))
    (d / "preprocessor_config.json").write_text('{\n  "min_pixels": 3136,\n  "max_pixels":\n}')
    with pytest.raises(M.UserError, match=f"{d / 'preprocessor_config.json'}:4: not valid JSON"):
        ImageConfig.from_dir(d)
    (d / "config.json").write_text("{")
    with pytest.raises(M.UserError, match=f"{d / 'config.json'}:1: not valid JSON"):
        M.open_checkpoint(str(d))


@pytest.mark.parametrize("argv, message", [
    (["--max_rounds", "-1"], "--max_rounds -1: must be 0 \\(no perception round\\) or more"),
    (["--max_rounds", "0", "--vpt", "region"], "--max_rounds 0: must be at least 1 with --vpt region"),
    (["--top_p", "2"], "--top_p 2.0: must be in \\[0, 1\\]"), (["--top_k", "-1"], "--top_k -1: must be 0"),
    (["--temperature", "-1"], "--temperature -1.0: must be 0 \\(greedy\\) or more"),
    (["--device", "cuda"], "--device cuda: must be cpu: this machine has no CUDA device"),
    (["--vpt", "maybe"], "argument --vpt: invalid choice: 'maybe'"),
    (["--eval", "missing.jsonl"], "--eval missing.jsonl: no such records file")])
def test_sampler_options_are_checked_at_parse_time(argv, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(M.UserError, match=message):
        sample.parse_args(["--init_from", "x", "--device", "cpu", *argv])


def test_top_k_0_is_no_filter_and_top_p_0_the_best_token():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert len({M.sample_next(logits, 1.0, top_k=0, generator=g).item() for _ in range(300)}) == 5
    assert {M.sample_next(logits, 1.0, top_p=0.0, generator=g).item() for _ in range(50)} == {0}


def test_prompt_longer_than_max_positions_warns(chat_dir, tmp_path, capsys):
    d = tmp_path / "short"
    shutil.copytree(chat_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    sample.main(["--init_from", str(d), "--prompt", "hello " * 20, "--max_new_tokens", "2", "--device", "cpu"])
    assert "more than the model's max_position_embeddings (16); the answer may be unreliable" in \
        capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    for cmd, line in [(["sample.py", "--max_rounds", "-1", "--device", "cpu"],
                       "sample.py: error: --max_rounds -1: must be 0 (no perception round) or more"),
                      (["train.py", "--max_iters=-5", "--device=cpu"], "train.py: error: --max_iters=-5: must be at "
                                                                       "least 1")]:
        r = subprocess.run([sys.executable, os.path.join(here, cmd[0]), *cmd[1:]], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 1 and r.stderr == line + "\n", (r.returncode, r.stderr)


# --- train.py at scale (issue 13): exact gradient accumulation, FLOPs, logging, one compiled graph, LoRA, memory

SHORT, LONG = "A boat.", "The cat sits on the red mat, next to 3 dogs. " * 3 + "A small boat."  # 4 and 49 tokens


@pytest.fixture(scope="module")
def uneven_dir(vpt_dir, tmp_path_factory):
    """Two text records beside the tiny VPT checkpoint whose answers have 4 and 49 supervised tokens."""
    d = tmp_path_factory.mktemp("uneven")
    recs = [{"messages": [{"role": "user", "content": "Describe this image."}, {"role": "assistant", "content": a}]}
            for a in (SHORT, LONG)]
    (d / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def scale_cfg(vpt_dir, data_file, out, *extra):
    return train.parse_config([
        f"--init_from={vpt_dir}", f"--train_data={data_file}", f"--val_data={data_file}", f"--out_dir={out}",
        "--max_iters=2", "--lr=3e-4", "--stage=all", "--eval_interval=0", "--eval_iters=1", "--log_interval=1",
        "--num_workers=0", "--device=cpu", "--mask_prob=0.0", *extra])


def max_param_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_schedule_draws_each_epoch_once_and_walks_it_in_order(monkeypatch):
    class Lengths:  # a dataset as micro_batches sees it: a length per sample
        def __len__(self):
            return 70

        def length_estimate(self, i):
            return 40 * (i % 5)

    cfg = train.TrainConfig(batch_size=4, seed=3)
    drawn = []
    draw = train.micro_batches
    monkeypatch.setattr(train, "micro_batches", lambda d, c, e: drawn.append(e) or draw(d, c, e))
    schedule = train.Schedule(Lengths(), cfg, rank=0, world=1)
    n = schedule.per_epoch
    assert n == 18, n  # 70 samples in micro-batches of 4
    walked = [schedule.global_batch(k) for k in range(3 * n)]
    assert drawn == [0, 1, 2], drawn  # a step costs no re-draw: each epoch's order is drawn once
    assert walked == [b for e in range(3) for b in draw(Lengths(), cfg, e)]
    assert sorted(i for b in walked[:n] for i in b) == list(range(70))  # an epoch holds every sample once


def test_every_split_of_the_global_batch_gives_the_same_step(vpt_dir, uneven_dir, tmp_path, capsys):
    f = uneven_dir / "two.jsonl"
    _, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    counts = [sum(t != IGNORE_INDEX for t in s["labels"]) for s in data.VPTDataset(str(f), tok, img_cfg)]
    assert counts == [4, 49], counts
    one_batch = train.main(scale_cfg(vpt_dir, f, tmp_path / "a", "--batch_size=2", "--grad_accum=1"))
    logged_a = capsys.readouterr().out
    two_micro = train.main(scale_cfg(vpt_dir, f, tmp_path / "b", "--batch_size=1", "--grad_accum=2"))
    logged_b = capsys.readouterr().out
    args = [f"--{fl.name}={getattr(c, fl.name)}" for c in [scale_cfg(vpt_dir, f, tmp_path / "c", "--batch_size=1",
                                                                   "--grad_accum=1")] for fl in dataclasses.fields(c)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(os.path.dirname(__file__), "train.py"), *args],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two_procs, _, _ = vpt.from_pretrained(str(tmp_path / "c"))
    d_accum, d_ddp = max_param_diff(one_batch, two_micro), max_param_diff(two_micro, two_procs)
    print(f"2x1 vs 1x2 micro-batches: max parameter diff {d_accum:.2e}; 1 process x 2 vs 2 processes x 1: {d_ddp:.2e}")
    assert d_accum <= 1e-6 and d_ddp <= 1e-6
    losses = [[float(x.split("loss ")[1].split(",")[0]) for x in out.splitlines() if "loss" in x and "val" not in x]
              for out in (logged_a, logged_b, r.stdout)]
    assert np.allclose(losses[0], losses[1], atol=1e-4) and np.allclose(losses[0], losses[2], atol=1e-4), losses


def test_batch_flops_equal_a_hand_count(vpt_dir):
    model, _, _ = vpt.from_pretrained(str(vpt_dir))
    train.param_groups(model, train.parse_config(["--stage=finetune"]))  # ViT and DINOv2 frozen, the rest trained
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0, 3] = model.tokens.act
    targets = torch.full((2, 10), IGNORE_INDEX)
    targets[0, 5:8] = 1
    targets[1, :2] = 1
    batch = dict(input_ids=ids, padding_mask=torch.tensor([[1] * 10, [1] * 6 + [0] * 4]), targets=targets,
                 image_grid_thw=torch.tensor([[1, 4, 4], [1, 2, 4]]), extra=torch.zeros(1, 3, 224, 224))
    # the tiny checkpoint: LLM C 64, MLP 128, 4 heads of 16 (2 kv), 2 layers, vocabulary 512; ViT D 32, 2 blocks, MLP
    # 128, merger 128 -> 64; DINOv2 128 wide, 2 layers, MLP 512, patch 14; projector 128 -> 64 and 64 -> 64
    llm_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    llm = 6 * 2 * llm_layer * 16 + 12 * 2 * 64 * (10 ** 2 + 6 ** 2) + 6 * 64 * 512 * 5  # 16 tokens, 5 supervised
    vit_per_patch = 32 * 1176 + 2 * (32 * 96 + 32 * 32 + 2 * 32 * 128)
    vit = 2 * (vit_per_patch * 24 + 2 * 2 * 32 * (16 ** 2 + 8 ** 2) + (128 * 128 + 128 * 64) * 6)  # frozen: forward
    dino = 2 * (128 * 3 * 14 * 14 * 256 + 2 * (4 * 128 * 128 + 2 * 128 * 512) * 257 + 2 * 2 * 128 * 257 ** 2)
    projector = 4 * 128 * 64 * 256 + 6 * 64 * 64 * 1  # feature path: no gradient into the frozen DINOv2
    assert train.batch_flops(model, batch) == llm + vit + dino + projector


def test_logs_metrics_file_plot_and_baseline_eval(chat_dir, vpt_dir, uneven_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "base"
    cfg = scale_cfg(chat_dir, uneven_dir / "two.jsonl", out, "--use_vpt=False", "--batch_size=1", "--max_iters=3",
                    "--log_interval=2", "--eval_interval=2")
    train.main(cfg)
    printed = capsys.readouterr().out
    assert "nan" not in printed and "perception-token" not in printed, printed  # the baseline has no such tokens
    step = next(line for line in printed.splitlines() if line.startswith("step 2/3: loss"))
    assert all(w in step for w in ("smoothed", "ms/step", "tokens/s", "ETA")), step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r, "val_loss" in r) for r in rows] == \
        [(2, True, False), (2, False, True), (3, True, False), (3, False, True)], rows
    assert rows[0]["flops_per_s"] > 0 and rows[2]["ms_per_step"] > 0
    try:
        import matplotlib  # noqa: F401 (optional: with it, a picture; without it, a one-line error)
        assert train.plot(str(out)) == str(out / "curves.png") and (out / "curves.png").stat().st_size > 0
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(M.UserError, match="pip install matplotlib"):
        train.plot(str(out))
    with pytest.raises(M.UserError, match="no metrics.jsonl"):
        train.plot(str(tmp_path))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match="pip install wandb"):
        train.main(dataclasses.replace(cfg, wandb_project="p", overwrite=True))  # a second run into out_dir


def deep_tiny_vpt(vpt_dir, layers):
    """The tiny VPT checkpoint's config and tokens with more decoder layers, freshly initialised."""
    small, _, _ = vpt.from_pretrained(str(vpt_dir))
    torch.manual_seed(0)
    return vpt.VPT(dataclasses.replace(small.cfg, num_hidden_layers=layers), small.vcfg, small.tokens)


def vpt_train_batch(vpt_dir, rows=(0, 2, 3), mask=(True, False, False)):
    """A collated batch of the tiny records: control tokens (one mask-modeled), a plain answer."""
    _, tok, img_cfg = vpt.from_pretrained(str(vpt_dir))
    T = vpt.Tokens.of(tok)
    ds = data.VPTDataset(str(vpt_dir / "records.jsonl"), tok, img_cfg, "dino", T.pad, T.act)
    batch = data.collate([ds[i] for i in rows], tok.endoftext_id, tok.image_pad_id, img_cfg.merge_size)
    batch["mask_modeling"] = torch.tensor(mask)
    return batch


def test_compiled_layers_make_one_graph_per_pass_on_the_vpt_path(vpt_dir):
    # 12 layers, the prefix and the suffix of the one-pass forward: one graph each, shared by every layer (a cache
    # shared by all layers made dynamo guard on how many had written and recompile each layer until its limit of 8).
    # backend aot_eager: dynamo's capture and guards and AOT autograd's forward/backward split, without inductor's
    # minutes of CPU code generation (inductor gives the same 2 graphs)
    from torch._dynamo.utils import counters
    model, batch = deep_tiny_vpt(vpt_dir, 12), vpt_train_batch(vpt_dir)
    _, eager = model(batch, batch["targets"])
    torch._dynamo.reset()
    counters.clear()
    for layer in model.model.layers:
        layer.compile(backend="aot_eager")
    for _ in range(2):  # a second step with the same shapes reuses both graphs
        _, loss = model(batch, batch["targets"])
        loss.backward()
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    print(f"12 layers x (prefix, suffix) x 2 steps: {graphs} graphs, {frames - graphs} recompiles beyond them, "
          f"|compiled - eager| loss {(loss - eager).abs().item():.1e}")
    assert graphs == 2 and frames == 2, dict(counters["stats"])
    assert (loss - eager).abs().item() <= 1e-5
    torch._dynamo.reset()


def test_activation_checkpointing_on_the_vpt_path(vpt_dir):
    # recomputing a layer in the backward pass updates its GradCache entry again: that must change nothing
    model, batch = deep_tiny_vpt(vpt_dir, 2), vpt_train_batch(vpt_dir)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.model.checkpointing = checkpointing
        model(batch, batch["targets"])[1].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_lora_starts_at_the_base_model_and_saves_merged_weights(vpt_dir, tmp_path):
    model, batch = vpt.from_pretrained(str(vpt_dir))[0], vpt_train_batch(vpt_dir)
    with torch.no_grad():
        base_logits = model(batch)[0]
        lora.add_lora(model.model, 4, 8.0)
        assert torch.equal(model(batch)[0], base_logits), "B = 0: LoRA must start at the base model exactly"
    assert len(lora.lora_layers(model)) == 7 * model.cfg.num_hidden_layers  # q k v o gate up down of every layer
    out = tmp_path / "lora"
    trained = train.main(scale_cfg(vpt_dir, vpt_dir / "records.jsonl", out, "--lora_rank=4", "--stage=finetune",
                                   "--lr=3e-2", "--batch_size=2"))
    before = vpt.from_pretrained(str(vpt_dir))[0].state_dict()
    changed = {n for n, p in trained.state_dict().items() if n in before and not torch.equal(p, before[n])}
    trained_fully = ("model.embed_tokens.", "lm_head.", "detection_projector.")
    assert changed and all(n.startswith(trained_fully) for n in changed), changed
    assert all(m.lora_B.abs().max() > 0 for _, m in lora.lora_layers(trained)), "the adapters trained"
    merged, _, _ = vpt.from_pretrained(str(out))  # what sample.py loads: plain names, no adapters
    with torch.no_grad():
        diff = (trained(batch)[0] - merged(batch)[0]).abs().max().item()
    print(f"LoRA merged vs unmerged logits: max diff {diff:.1e}")
    assert diff <= 1e-5 and (Path(M.checkpoint_dir(str(out))) / lora.ADAPTERS).exists()
    resumed = train.main(scale_cfg(vpt_dir, vpt_dir / "records.jsonl", out, "--lora_rank=4", "--stage=finetune",
                                   "--lr=3e-2", "--batch_size=2", "--init_from=resume", "--max_iters=3"))
    adapters = torch.load(Path(M.checkpoint_dir(str(out))) / lora.ADAPTERS, weights_only=True)
    assert not torch.equal(adapters["model.layers.0.self_attn.q_proj.lora_B"],
                           dict(trained.named_parameters())["model.layers.0.self_attn.q_proj.lora_B"])
    assert resumed is not None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_plan_matches_measured_peak(checkpointing):
    # measured by torch's MemTracker (parameters, gradients, optimizer state, activations and temporaries of every
    # tensor on the CPU) over a steady-state step, the optimizer state already there; 3 % and 13 % over, measured
    from torch.distributed._tools.mem_tracker import MemTracker
    vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=128)
    cfg = M.QwenConfig(**{**M.PRESETS["tiny"], "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                          "num_attention_heads": 8, "vision": vision})
    torch.manual_seed(0)
    model = M.Qwen2VL(cfg)
    model.model.checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, T = 4, 256
    ids = torch.randint(0, 500, (B, T))
    batch = dict(input_ids=ids, padding_mask=torch.ones(B, T, dtype=torch.long), pixel_values=None,
                 image_grid_thw=None, position_ids=torch.arange(T)[None, None].expand(3, B, T))
    targets = ids.masked_fill(torch.arange(T) < 200, IGNORE_INDEX)  # 56 supervised tokens per row

    def step():
        model(batch, targets)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    estimate = sum(train.memory_plan(model, B, T, 4 * 56, 4).values())
    print(f"memory plan {estimate / 2**20:.1f} MiB vs measured peak {measured / 2**20:.1f} MiB "
          f"(checkpointing {checkpointing})")
    assert abs(estimate / measured - 1) <= 0.25


# --- train.py command line (issue 13)

def test_train_key_space_value_parses_as_key_equals_value(tmp_path):
    spaced = train.parse_config(["--max_iters", "7", "--lr", "1e-3", "--device", "cpu", "--use_vpt", "False"])
    equals = train.parse_config(["--max_iters=7", "--lr=1e-3", "--device=cpu", "--use_vpt=False"])
    assert spaced == equals and spaced.max_iters == 7 and spaced.use_vpt is False, spaced
    with pytest.raises(M.UserError, match="--max_iters: max_iters must be int, got 'x'"):
        train.parse_config(["--max_iters", "x"])
    with pytest.raises(M.UserError, match="--lr: write --key=value or --key value"):
        train.parse_config(["--lr"])


def test_train_help_shows_the_values_in_force_and_the_source_comments(tmp_path, capsys):
    f = tmp_path / "c.py"
    f.write_text("max_iters = 42\nlr = 1e-3\n")
    with pytest.raises(SystemExit) as e:
        train.parse_config([str(f), "--help", "--lr", "5e-4", "--max_iters=-1"])  # shown even when out of range
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "  --max_iters=-1\n" in out and "  --lr=0.0005  # LLM and everything else trained\n" in out, out
    assert "  # optimization\n  --stage=" in out, out  # the section comments of TrainConfig head their settings
    comments, _ = train.setting_comments()
    assert comments["mask_prob"] == "VPT §3.2 mask modeling, per sample with a control token", comments


def test_train_user_error_is_reported_by_rank_0_only(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    for rank, stderr in [("0", "train.py: error: --max_iters=-5: must be at least 1\n"), ("1", "")]:
        r = subprocess.run([sys.executable, script, "--max_iters", "-5", "--device=cpu"], capture_output=True,
                           text=True, cwd=tmp_path, timeout=120, env={**os.environ, "RANK": rank})
        assert r.returncode == 1 and r.stderr == stderr, (rank, r.returncode, r.stderr)


def test_train_checks_the_data_files_before_it_builds_the_model(tmp_path, monkeypatch):
    def build(cfg):
        raise AssertionError("build() ran before the records files were checked")
    monkeypatch.setattr(train, "build", build)
    base = ["--device=cpu", f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(FileNotFoundError, match="no-such.jsonl"):
        train.main(train.parse_config([*base, f"--train_data={tmp_path / 'no-such.jsonl'}"]))
    good, bad = write_records(tmp_path / "good", GOOD), write_records(tmp_path / "bad", {**GOOD, "images": ["b.png"]})
    with pytest.raises(M.UserError, match="record 0: images\\[0\\] 'b.png': image file not found"):  # the val file too
        train.main(train.parse_config([*base, f"--train_data={good}", f"--val_data={bad}"]))


# -----------------------------------------------------------------------------
# issue 11: evaluation (sample.py --eval in batches, --out predictions, VQA normalisation and ANLS, --image_root)


@pytest.mark.parametrize("text, normal", [
    ("Two dogs.", "2 dogs"), ("2 dogs", "2 dogs"),  # a period before no digit goes; number words -> digits
    ("The cat", "cat"), ("an apple", "apple"),  # articles dropped, after lower case
    ("Hello, world!", "hello world"),  # ", " touches a space: dropped; "!" touches none: a space
    ("yes/no", "yes no"), ("dogs?", "dogs"),
    ("1,000 people", "1000 people"),  # a digit,digit comma: every mark dropped
    ("3.5", "3.5"), ("Room 2.", "room 2"),  # vqaEval.py's periodStrip keeps "3.5" and strips "2."
    ("none", "0"), ("Ten\tapples", "10 apples"), ("eleven", "eleven"),  # zero..ten only
    ("I dont know", "i don't know"), ("couldnt've", "couldn't've"), ("twas", "'twas")])  # contractions restored
def test_vqa_normalisation_hand_computed(text, normal):
    assert sample.vqa_normalize(text) == normal, (text, sample.vqa_normalize(text))


def test_anls_and_levenshtein_hand_computed():
    assert sample.levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert sample.levenshtein("", "abc") == 3 and sample.levenshtein("abc", "abc") == 0
    assert sample.anls("Denver Bronkos", ["Denver Broncos"]) == pytest.approx(13 / 14)  # one typo in 14 characters
    assert sample.anls("dear  DR. lobo", ["Dear Dr. Lobo"]) == 1.0  # case and runs of spaces do not count
    assert sample.anls("12/15/89", ["Dear Dr. Lobo", "12/15/88"]) == pytest.approx(7 / 8)  # the best truth counts
    assert sample.anls("abc", ["abd"]) == pytest.approx(2 / 3)  # NL 1/3, under the threshold
    assert sample.anls("ab", ["ax"]) == 0.0  # NL 0.5: at the threshold, scored 0
    assert sample.anls("Denver", ["Denver Broncos"]) == 0.0  # 8 of 14 characters missing: NL 0.57
    assert sample.anls("", [""]) == 1.0 and sample.anls("", ["a"]) == 0.0


def test_box_overlap_hand_computed():
    iou, iogt = sample.box_overlap((0, 0, 10, 10), (5, 5, 15, 15))  # a 5x5 overlap of two 10x10 boxes
    assert iou == pytest.approx(25 / 175) and iogt == pytest.approx(25 / 100)


EVAL_RECORDS = [  # images, text-only and a system message mixed, prompts of different lengths: a batch is padded
    {**GOOD, "box": [20, 30, 120, 150]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "<image>\nHow many people are there?"},
                  {"role": "assistant", "content": "There are 12 people."}], "images": ["a.png_20,30,120,150"]},
    {"messages": [{"role": "user", "content": "<image>\nWhere is the dog? It is in the top left corner of the mat."},
                  {"role": "assistant", "content": "Now answer the question.\nThe top left corner."}],
     "images": ["a.png"]},
    {"messages": [{"role": "user", "content": "Describe this image."}, {"role": "assistant", "content": "A cat."}]}]


def read_predictions(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_eval_batches_a_plain_model_with_the_greedy_answers_of_batch_1(chat_dir, tmp_path, monkeypatch):
    f = write_records(tmp_path / "r", *EVAL_RECORDS)
    masks, real_generate = [], M.generate
    monkeypatch.setattr(M, "generate", lambda m, ids, mask, *a: masks.append(mask.tolist()) or
                        real_generate(m, ids, mask, *a))
    sampled, real_answer = [], sample.PlainEngine.answer

    def answer(self, requests):  # keeps the sampled token ids of every answer
        results = real_answer(self, requests)
        sampled.extend(r.ids for r in results)
        return results

    monkeypatch.setattr(sample.PlainEngine, "answer", answer)
    ids, answers = {}, {}
    for bs in (1, 3):
        out = tmp_path / f"p{bs}.jsonl"
        sample.main(["--init_from", str(chat_dir), "--eval", str(f), "--vpt", "off", "--batch_size", str(bs),
                     "--max_new_tokens", "8", "--device", "cpu", "--out", str(out)])
        ids[bs], answers[bs] = sampled[:], [p["answer"] for p in read_predictions(out)]
        sampled.clear()
    assert [len(m) for m in masks] == [1] * 5 + [3, 2], "5 records: batches of 1, then 3 + 2"
    for m in masks[5:]:  # the longest prompt of a batch fills it, the others are padded on the left
        assert min(row.count(0) for row in m) == 0 and max(row.count(0) for row in m) > 0, m
        assert all(row == sorted(row) for row in m), "padding on the left"
    assert ids[3] == ids[1] and answers[3] == answers[1], (ids[3], ids[1])
    assert len({tuple(row) for row in ids[1]}) >= 3, f"the comparison needs answers that differ: {ids[1]}"


def test_eval_writes_a_prediction_per_record_with_rounds_and_scores(vpt_dir, tmp_path, capsys):
    f = write_records(tmp_path / "r", *EVAL_RECORDS)
    out = tmp_path / "predictions.jsonl"
    common = ["--init_from", str(vpt_dir), "--vpt", "region", "--max_new_tokens", "8", "--device", "cpu"]
    s = sample.main([*common, "--eval", str(f), "--batch_size", "2", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert "eval: 100%" in err and "5/5" in err, f"no progress bar on stderr: {err!r}"
    assert stdout.count("\n") == 1 and "(5 records, --vpt region): exact match" in stdout and "ANLS" in stdout
    rows = read_predictions(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert set(rows[0]) == {"index", "question", "answer", "truth", "rounds", "exact", "normalised", "anls",
                            "correct", "cells_right"}, "record 0 has a box: whether the first region is its cells"
    assert "cells_right" not in rows[2]
    assert rows[3]["question"] == "Where is the dog? It is in the top left corner of the mat."
    assert rows[3]["truth"] == "The top left corner.", "the truth loses the authors' answer prefix"
    model, _, _ = vpt.from_pretrained(str(vpt_dir))
    grid, margin = model.vcfg.grid, model.vcfg.region_margin
    for r, size in zip(rows, [(260, 200), None, (100, 120), (260, 200), None]):  # record 2's image is a crop
        assert [rd["kind"] for rd in r["rounds"]] == (["region"] if size else []), r  # forced; none without image
        assert r["correct"] == r["exact"] == (r["answer"] == r["truth"])
        assert r["normalised"] == (sample.vqa_normalize(r["answer"]) == sample.vqa_normalize(r["truth"]))
        assert r["anls"] == sample.anls(r["answer"], [r["truth"]])
        if size:
            rd = r["rounds"][0]
            assert list(vpt.cells_to_box(*rd["cells"], *size, grid, margin)) == rd["box"], rd
    iou, iogt = sample.box_overlap(vpt.cells_to_box(*rows[0]["rounds"][0]["cells"], 260, 200, grid, margin=0),
                                   (20, 30, 120, 150))
    assert (rows[0]["rounds"][0]["iou"], rows[0]["rounds"][0]["iogt"]) == (iou, iogt), "record 0 has a box"
    (x0, *_, x1), (y0, *_, y1) = rows[0]["rounds"][0]["cells"]
    assert rows[0]["cells_right"] == ((x0, y0, x1, y1) == vpt.box_to_cells((20, 30, 120, 150), 260, 200, grid))
    assert all("iou" not in r["rounds"][0] for r in rows[2:4]), "records without a box have no IoU"
    assert s["region"] == 3 / 5 and s["iou"] == iou and s["accuracy"] == sum(r["exact"] for r in rows) / 5
    # the answer equals the one sample.py prints for the same question (the streaming path, not the engine)
    sample.main([*common, "--image", str(f.parent / "a.png"), "--prompt", "Where is the dog? It is in the top left "
                 "corner of the mat."])
    assert capsys.readouterr().out.strip() == rows[3]["answer"]


def test_eval_interrupted_leaves_no_half_predictions_file(vpt_dir, tmp_path, monkeypatch):
    f = write_records(tmp_path / "r", *EVAL_RECORDS)
    out = tmp_path / "predictions.jsonl"
    out.write_text("an earlier run's predictions\n")
    real, calls = vpt.Engine.answer, []

    def answer(self, requests, on_token=None):  # the second batch is interrupted (Ctrl-C)
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, requests, on_token)

    monkeypatch.setattr(vpt.Engine, "answer", answer)
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--init_from", str(vpt_dir), "--eval", str(f), "--batch_size", "2", "--max_new_tokens", "3",
                     "--device", "cpu", "--out", str(out)])
    assert calls == [2, 2] and out.read_text() == "an earlier run's predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl", "r"], "no temporary file left"


def test_eval_records_copied_elsewhere_resolve_images_with_image_root(vpt_dir, tmp_path):
    src = write_records(tmp_path / "data", *EVAL_RECORDS[:3])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = elsewhere / "val2.jsonl"  # head -2 val.jsonl > elsewhere/val2.jsonl
    copy.write_text("".join(src.read_text().splitlines(keepends=True)[:2]))
    common = ["--init_from", str(vpt_dir), "--max_new_tokens", "3", "--device", "cpu"]
    with pytest.raises(M.UserError, match=rf"val2.jsonl: record 0: images\[0\] 'a.png': no image file "
                                          rf"{elsewhere / 'a.png'} \(paths resolve against the records file's "
                                          rf"folder\); pass --image_root DIR"):
        sample.main([*common, "--eval", str(copy)])
    with pytest.raises(M.UserError, match=r"\(paths resolve against --image_root .*elsewhere\); pass --image_root"):
        sample.main([*common, "--eval", str(copy), "--image_root", str(elsewhere)])
    got = sample.main([*common, "--eval", str(copy), "--image_root", str(tmp_path / "data")])
    head = write_records(tmp_path / "data2", *EVAL_RECORDS[:2])  # the same two records beside their image
    assert got == sample.main([*common, "--eval", str(head)]), "the same records, the same scores"


def test_eval_refuses_an_alignment_record_before_loading_the_model(vpt_dir, tmp_path, monkeypatch):
    """A record whose question holds the re-encoded view itself (an alignment-stage record, as synth.py's stage-1
    counting records) cannot be asked as a VPT question: one sentence naming the record, before any model loads."""
    align = {"messages": [{"role": "user", "content": "<image><detection_image>\nHow many?"},
                          {"role": "assistant", "content": "2"}], "images": ["a.png"], "detection_images": ["a.png"]}
    f = write_records(tmp_path, EVAL_RECORDS[0], align)
    monkeypatch.setattr(vpt, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(M.UserError, match=r"records.jsonl: record 1: its question holds <detection_image> "
                                          r"\(detection_images in the user turn"):
        sample.main(["--init_from", str(vpt_dir), "--eval", str(f), "--device", "cpu"])


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--out", "no/such/p.jsonl"], "--out no/such/p.jsonl: no such folder .*no/such$"),
    (["--image_root", "nowhere"], "--image_root nowhere: no such folder")])
def test_eval_options_are_checked_at_parse_time(argv, message):
    with pytest.raises(M.UserError, match=message):
        sample.parse_args(["--init_from", "x", "--device", "cpu", *argv])


# -----------------------------------------------------------------------------
# issue 13: FSDP


def fsdp_args(vpt_dir, out, *extra):
    """train.py flags for a few steps on the tiny VPT records: stage finetune, the recipe (ViT and DINOv2 frozen, so
    replicated under FSDP), one record a micro-batch, so that in a step one process may have a control token (a
    prefix and a suffix pass) and the other none."""
    records = vpt_dir / "records.jsonl"
    return [f"--init_from={vpt_dir}", f"--train_data={records}", f"--val_data={records}", f"--out_dir={out}",
            "--batch_size=1", "--lr=3e-3", "--stage=finetune", "--eval_interval=0", "--eval_iters=1",
            "--log_interval=1", "--num_workers=0", "--device=cpu", "--warmup_frac=0.1", *extra]


def torchrun_train(args, nproc=2):
    """train.py under torchrun on the CPU (gloo), one thread a process; returns its stdout."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        os.path.join(os.path.dirname(__file__), "train.py"), *args],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_fsdp_two_processes_match_one_process_and_resume(vpt_dir, tmp_path):
    one = {n: train.main(train.parse_config(fsdp_args(vpt_dir, tmp_path / f"one{n}", "--grad_accum=2",
                                                      f"--max_iters={n}"))) for n in (2, 3)}
    fsdp = fsdp_args(vpt_dir, tmp_path / "fsdp", "--grad_accum=1", "--fsdp=True", "--checkpointing=True")
    assert "memory plan per process (FSDP over 2)" in torchrun_train([*fsdp, "--max_iters=2"])
    two, _, _ = vpt.from_pretrained(str(tmp_path / "fsdp"))  # the consolidated model loads as it is
    torchrun_train([*fsdp, "--max_iters=3", "--init_from=resume"])  # the optimizer's shards from optimizer/ (DCP)
    ckpt = Path(M.checkpoint_dir(str(tmp_path / "fsdp")))  # the manifest checks every file, the shards too
    assert (ckpt / "optimizer" / ".metadata").exists() and not (ckpt / "optimizer.pt").exists()
    resumed, _, _ = vpt.from_pretrained(str(ckpt))
    d2, d3 = [max((a - b).abs().max().item() for a, b in zip(x.state_dict().values(), y.state_dict().values()))
              for x, y in ((one[2], two), (one[3], resumed))]
    print(f"1 process x grad_accum 2 vs FSDP 2 processes x 1: max parameter diff {d2:.2e} after 2 steps, {d3:.2e} "
          f"after resuming the FSDP checkpoint for a third")
    assert d2 <= 1e-5 and d3 <= 1e-5


def test_fsdp_needs_torchrun_and_a_stage_that_trains_the_llm(monkeypatch):
    with pytest.raises(M.UserError, match="--fsdp=True: must be False outside torchrun"):
        train.parse_config(["--fsdp=True"])
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(M.UserError, match="--fsdp=True: must be False with --stage=align"):
        train.parse_config(["--fsdp=True", "--stage=align"])
    assert train.parse_config(["--fsdp=True", "--lora_rank=8", "--compile=True", "--checkpointing=True"]).fsdp


def test_fsdp_memory_plan_divides_what_is_sharded(vpt_dir):
    model, _, _ = vpt.from_pretrained(str(vpt_dir))
    train.set_trainable(model, train.parse_config(["--stage=finetune"]))
    whole = {n for n, p in model.named_parameters() if p in train.replicated(model)}
    assert whole == {n for n, _ in model.named_parameters() if n.startswith(("visual.", "detection_model."))}, whole
    one, eight = (train.memory_plan(model, 2, 64, 16, 4, shards) for shards in (1, 8))
    size = {n: p.numel() * 4 for n, p in model.named_parameters()}  # fp32 bytes
    frozen = sum(b for n, b in size.items() if n in whole)
    root = sum(b for n, b in size.items() if n not in whole and not n.startswith("model.layers."))
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert eight["parameters"] == pytest.approx(frozen + (one["parameters"] - frozen) / 8 + root + 2 * layer)
    assert (eight["gradients"], eight["optimizer"]) == pytest.approx((one["gradients"] / 8, one["optimizer"] / 8))
    assert eight["activations"] == one["activations"]


# -----------------------------------------------------------------------------
# issue 11: speed (the timings themselves are bench.py's: `python bench.py infer`)


def test_vit_attention_runs_on_sdpa_fused_kernel():
    # 3-D (nh, Np, hs) inputs sent SDPA to its math path, 3x slower on CPU; with the fused kernel forced, a layout it
    # refuses raises "No available kernel" instead of falling back
    torch.manual_seed(0)
    vit = M.VisionTransformer(M.QwenConfig(**M.PRESETS["tiny"]).vision).eval()
    # three images, two of one size: a run of equal images is one batched call, then one of another size
    grid = torch.tensor([[1, 4, 8], [1, 4, 8], [1, 6, 4]])
    pv = torch.randn(int(grid.prod(-1).sum()), vit.cfg.patch_dim)
    with torch.no_grad():
        free = vit(pv, grid)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fused = vit(pv, grid)
        alone = torch.cat([vit(p, g[None]) for p, g in zip(pv.split(grid.prod(-1).tolist()), grid)])
    assert torch.equal(fused, free), "the fused kernel is not the one SDPA chose"
    # each image attends only to itself: the batch equals the images one at a time (max abs diff 0 here, 1e-6 allowed)
    torch.testing.assert_close(free, alone, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# issue 16: quick start


def test_quick_start_configs_chain_from_stage_one_and_compare_fairly():
    """The quick start's configs: the VPT run and the baseline both continue from stage 1's output and train the same
    steps on twin records (same images, questions and answers; the baseline without perception tokens)."""
    names = ("synth_ground", "synth", "synth_baseline")
    ground, vpt_run, base = (train.parse_config([f"config/{n}.py"]) for n in names)
    assert vpt_run.init_from == base.init_from == ground.out_dir and ground.init_from == "scratch"
    assert ground.use_vpt and vpt_run.use_vpt and not base.use_vpt
    for key in ("batch_size", "grad_accum", "max_iters", "lr", "beta2", "warmup_frac", "min_lr_ratio", "weight_decay",
                "mask_prob", "seed"):
        assert getattr(vpt_run, key) == getattr(base, key), key
    assert base.train_data == vpt_run.train_data.replace(".jsonl", "_baseline.jsonl")
    assert base.val_data == vpt_run.val_data.replace(".jsonl", "_baseline.jsonl")


def test_synth_ground_records_point_list_read_and_align():
    """The grounding stage's records of a shapes scene: "Where is the X?" per shape, answered by the region of its
    box; one list of every shape in palette order, each name followed by its region; one shape's digit read from its
    quadrant's crop alone. Of a tiles scene: the count read from the DINOv2 view, with no control token."""
    for seed in range(20):
        rng = random.Random(seed)
        _, shapes, _ = synth.make_scene(rng, "shapes")
        records = synth.ground_records("a.png", shapes, 0, rng)
        assert len(records) == len(shapes) + 2
        for s, r in zip(shapes, records):
            assert r["messages"][0]["content"] == f"<image>\nWhere is the {s['colour']} {s['shape']}?"
            (xs, ys), = vpt.parse_regions(r["messages"][1]["content"])
            assert vpt.box_to_cells(s["box"], synth.CANVAS, synth.CANVAS, synth.GRID) == (xs[0], ys[0], xs[1], ys[1])
        listed = records[-2]["messages"][1]["content"]
        assert records[-2]["messages"][0]["content"] == f"<image>\n{synth.LIST_QUESTION}"
        by_palette = sorted(shapes, key=lambda s: list(synth.PALETTE).index(s["colour"]))
        names = [f"{s['colour']} {s['shape']} " for s in by_palette]
        at = [listed.index(name) for name in names]
        assert at == sorted(at), listed  # palette order
        for name, s in zip(names, by_palette):
            region = vpt.region_text(vpt.box_to_cells(s["box"], synth.CANVAS, synth.CANVAS, synth.GRID))
            assert name + region in listed, (name, listed)  # the region right after its name
        read = records[-1]
        s, = [s for s in shapes if read["messages"][0]["content"] == f"<image>\nWhat number is on the {s['colour']} "
              f"{s['shape']}?"]
        crop = tuple(map(int, read["images"][0].split("_")[-1].split(",")))
        x1, y1, x2, y2 = s["box"]
        assert read["messages"][1]["content"] == s["digit"] and read["images"][0].startswith("a.png_")
        assert crop[0] <= x1 and crop[1] <= y1 and x2 <= crop[2] and y2 <= crop[3], (crop, s["box"])
        assert (crop[2] - crop[0], crop[3] - crop[1]) == (synth.CELL, synth.CELL)  # a quadrant, as the VPT crop
    _, shapes, n = synth.make_scene(random.Random(0), "tiles")
    align, = synth.ground_records("t.png", shapes, n, random.Random(0))
    assert align["messages"][0]["content"] == f"<image><detection_image>\n{synth.TILES_QUESTION}"
    assert align["messages"][1]["content"] == str(n) and align["detection_images"] == ["t.png"]
    assert not any(t in align["messages"][1]["content"] for t in vpt.token_strings("dino", synth.GRID)[1])


def test_synth_counting_squares_one_per_quadrant_inside_the_dino_view():
    """The counting family: one square per quadrant, at even pixels (so the global view's 1/2 scale averages the
    checkers to grey), inside the DINOv2 centre crop and GAP/2 from the quadrant's edges; every count 0-4 occurs."""
    counts = set()
    for seed in range(40):
        img, shapes, n = synth.make_scene(random.Random(seed), "tiles")
        a = np.asarray(img).astype(int)  # (H, W, 3)
        grey = (a[..., 0] == a[..., 1]) & (a[..., 1] == a[..., 2])  # the squares; no background tint is grey
        checkered = 0
        for cell in range(synth.GRID * synth.GRID):
            x0, y0 = cell % synth.GRID * synth.CELL, cell // synth.GRID * synth.CELL
            ys, xs = np.nonzero(grey[y0:y0 + synth.CELL, x0:x0 + synth.CELL])
            x1, y1, x2, y2 = x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1
            assert (x2 - x1, y2 - y1, len(xs)) == (synth.TILE, synth.TILE, synth.TILE ** 2), (seed, cell)
            assert x1 % 2 == 0 and y1 % 2 == 0, (seed, cell, x1, y1)
            assert min(x1, y1) >= max(synth.DINO_BORDER, synth.GAP // 2) and \
                max(x2, y2) <= synth.CANVAS - synth.DINO_BORDER, (seed, cell)
            assert x1 // synth.CELL == (x2 - 1) // synth.CELL and y1 // synth.CELL == (y2 - 1) // synth.CELL
            square = a[y1:y2, x1:x2, 0]
            checkered += np.abs(np.diff(square, axis=1)).mean() > 100  # neighbours differ by LIGHT - DARK, noisy
        assert shapes == [] and checkered == n, (seed, checkered, n)
        counts.add(n)
    assert counts == set(range(synth.N_TILES + 1)), counts

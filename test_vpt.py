"""
nanoVPT tests: pytest, CPU, offline. transformers is the oracle: tiny random checkpoints are built in it, saved in
the Hub file layout, loaded into ours, and the numbers must agree. Without transformers this file fails to import,
which fails the suite (it must never be skipped).
"""
import json
import os

import pytest
import torch
import transformers  # the parity oracle: a hard requirement of the test suite
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import model as M

# ids of the tiny test vocabulary: the Qwen specials sit at the top of a 512-row embedding
VOCAB, VS, VE, IMG = 512, 509, 510, 511
LOGIT_TOL = 1e-4  # fp32; the reference reports 0 to 3e-6 for an independent reimplementation


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


def load_hf(path):
    return Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


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
        return model(ids, pos, pv, grid, mask=M.causal_mask(mask, ids.size(1)))[0]


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


def test_rope_index_reference_example():
    # qwen2vl.md section 3.5: 15 text tokens, a 1x4x8 image (2x4 tokens), 13 text tokens
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
    new = list(M.generate(ours, ids, mask, pv, grid, max_new_tokens=6))
    full = torch.cat([ids, torch.stack(new[:-1], dim=1)], dim=1)  # prompt + the 5 tokens fed back
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], dim=1)
    # the no-cache path: positions of the decoded tokens follow the rope delta (section 3.6 step 5)
    pos, delta = M.get_rope_index(ids, grid, mask, IMG)
    dec = M.decode_positions(mask, delta, T=5)
    with torch.no_grad():
        h = ours.model(ours.embed(full, pv, grid), torch.cat([pos, dec], dim=2), M.causal_mask(full_mask, full.size(1)))
        ref = ours.lm_head(h[:, ids.size(1) - 1:])  # logits that chose each of the 6 tokens
        cache = M.KVCache(ours.cfg, 2, full.size(1), "cpu", torch.float32)
        steps = [ours.model(ours.embed(ids, pv, grid), pos, M.causal_mask(mask, ids.size(1)), cache)[:, -1]]
        for t in range(5):
            m = M.causal_mask(full_mask[:, :ids.size(1) + t + 1], 1, start=cache.pos)
            steps.append(ours.model(ours.model.embed_tokens(new[t][:, None]), dec[:, :, t:t + 1], m, cache)[:, -1])
        got = ours.lm_head(torch.stack(steps, dim=1))
    diff = (got - ref).abs().max().item()
    print(f"KV-cache vs no-cache logits: {diff:.2e}")
    assert diff <= 1e-5, f"cached decode differs from the full forward by {diff}"


def flat_hub_config(nested):
    """Rewrites transformers 5's nested config.json into the flat pre-v5 layout the Hub checkpoints ship."""
    d = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    d.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
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
    from safetensors.torch import load_file, save_file
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


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local directory"):
        M.from_pretrained("nobody/no-such-model-here")


def test_config_presets_parse_the_reference_configs():
    ref = os.path.join(os.path.dirname(__file__), "..", "shared", "reference")
    for name, preset in (("qwen2vl_2b_instruct.json", "qwen2-vl-2b"), ("qwen2vl_7b_instruct.json", "qwen2-vl-7b")):
        path = os.path.join(ref, name)
        if not os.path.exists(path):  # shared/ sits beside the checkout in CI and here
            pytest.fail(f"reference config {path} not found")
        cfg = M.QwenConfig.from_hf(json.load(open(path)))
        assert cfg == M.QwenConfig(**M.PRESETS[preset]), f"{name} parses differently from preset {preset}"
    with torch.device("meta"):
        n2b = sum(p.numel() for p in M.Qwen2VL(M.QwenConfig()).parameters())
        n7b = sum(p.numel() for p in M.Qwen2VL(M.QwenConfig(**M.PRESETS["qwen2-vl-7b"])).parameters())
    assert (n2b, n7b) == (2_208_985_600, 8_291_375_616), "parameter counts of the reference (section 1)"

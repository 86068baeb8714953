"""
nanoVPT tests: pytest, CPU, offline. transformers is the oracle: tiny random checkpoints are built in it, saved in
the Hub file layout, loaded into ours, and the numbers must agree. Without transformers this file fails to import,
which fails the suite (it must never be skipped).
"""
import json
import os

import numpy as np
import pytest
import torch
import transformers  # the parity oracle: a hard requirement of the test suite
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import data
import model as M
from model import DinoConfig
from data import (IMAGENET_MEAN, IMAGENET_STD, process_dino_image)
from data import (IGNORE_INDEX, ImageConfig, Tokenizer, encode_chat, load_image, process_image, process_images,
                  render_chat, smart_resize)

# -----------------------------------------------------------------------------
# model.py: Qwen2-VL against transformers

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


# -----------------------------------------------------------------------------
# data.py: images, tokenizer, chat template

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = ["You are a helpful assistant.", "Describe this image.", "The cat sits on the red mat, next to 3 dogs.",
          "What is in the picture? A small boat on a lake.", "Where is the dog? It is in the top left corner.",
          "How many people are there?\nThere are 12 people."]


def make_tiny_tokenizer(dirpath):
    """A ~400-token byte-level BPE with the Qwen2 pre-tokenizer and Qwen specials -> dirpath/tokenizer.json."""
    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_special_tokens(QWEN_SPECIALS)
    path = str(dirpath / "tokenizer.json")
    tk.save(path)
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def hf_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**{"min_pixels": 3136, "max_pixels": 12845056, **kw})  # Hub values


# -----------------------------------------------------------------------------
# images

def _rgb(h, w, seed=0):
    """Smooth gradients plus noise, so resizing has real structure to get right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), 128 + 0 * xx], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


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
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
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


# -----------------------------------------------------------------------------
# tokenizer and chat template

# chat_template.json of Qwen2-VL-2B/7B-Instruct, verbatim (reference §1)
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
    from transformers.utils.chat_template_utils import render_jinja_template
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
# sample.py end to end


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


def test_sample_cli_matches_transformers_generate(chat_dir, capsys):
    import sample
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


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert M.sample_next(logits, 0).item() == 0
    assert {M.sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)} == {0, 1}
    # softmax mass: 0.64, 0.23, 0.09, ... so top_p 0.8 keeps the first two tokens only
    assert {M.sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(200)} == {0, 1}
    assert {M.sample_next(logits, 1.0, top_p=0.1, generator=g).item() for _ in range(50)} == {0}


# -----------------------------------------------------------------------------
# DINOv2 (model.py) and its preprocessing (data.py)

# head size 64 like every facebook/dinov2-*, so that from_state_dict's heads = width // 64 holds
TINY_DINO = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=518, patch_size=14)


def _write_hf_dino(path, **overrides):
    from transformers import Dinov2Config
    from transformers import Dinov2Model as HFDinov2Model
    torch.manual_seed(0)
    model = HFDinov2Model(Dinov2Config(**TINY_DINO, **overrides))
    with torch.no_grad():  # a large std everywhere (lambdas, position table, cls, mask) so that every detail shows
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return _write_hf_dino(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def dino_swiglu_dir(tmp_path_factory):
    return _write_hf_dino(tmp_path_factory.mktemp("dino_swiglu"), use_swiglu_ffn=True)


def _load_dino(path):
    return M.dino_from_pretrained(str(path))


def _hf_last_hidden_state(path, pixel_values):
    from transformers import Dinov2Model as HFDinov2Model
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


def _hf_dino_pixels(img):
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
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

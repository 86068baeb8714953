"""
Qwen2-VL from scratch: configs, rotary embeddings, the vision tower (ViT with 2-D RoPE and a 2x2 patch merger), the
Qwen2 language model with M-RoPE and a preallocated KV cache, M-RoPE position ids, the model that joins them,
sampling with generate, and loading/saving of Hub checkpoints. Module names equal the Hub checkpoint keys, so loading
is a near-identity copy. Each block mirrors the transformers 5.23 class or function named at it
(models/qwen2_vl/modeling_qwen2_vl.py unless said), and the tests hold it to that.

Shape legend: B batch, T new tokens, S keys (cached + new), C LLM width, nh / nkv query / key-value heads,
hs head size, Np image patches (rows of pixel_values), D vision width, V vocabulary.
"""
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


class UserError(ValueError):
    """A problem with the user's settings, inputs or files, said in one sentence that names the thing to fix; the
    command-line entry points print it as one line, without a traceback (tracebacks stay for bugs)."""


class CheckpointError(UserError, KeyError):
    """A checkpoint that does not match what loads it (a KeyError too: a key is missing or unexpected)."""

# -----------------------------------------------------------------------------
# configs


@dataclass
class VisionConfig:  # defaults: Qwen2-VL-2B-Instruct's ViT (identical for 7B except hidden_size)
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: int = 4
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_size: int = 1536  # merger output = LLM width
    rope_theta: float = 10000.0  # the ViT's RoPE base, not the LLM's 1e6

    def __post_init__(self):
        assert self.embed_dim % self.num_heads == 0
        assert (self.embed_dim // self.num_heads) % 4 == 0, \
            "2-D RoPE splits the head into h and w halves of cos/sin pairs"

    @property
    def patch_dim(self):  # length of one pixel_values row: (c, t, py, px)
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass
class QwenConfig:  # defaults: the Hub config.json of Qwen/Qwen2-VL-2B-Instruct
    vocab_size: int = 151936  # embedding rows; the tokenizer has 151657 tokens, the rest are spare rows
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple = (16, 24, 24)  # (t, h, w) frequency pairs per head, sum = head_dim // 2
    tie_word_embeddings: bool = True  # 2B ties lm_head to embed_tokens, 7B does not
    max_position_embeddings: int = 32768
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        self.mrope_section = tuple(self.mrope_section)
        assert self.hidden_size % self.num_attention_heads == 0
        assert self.num_attention_heads % self.num_key_value_heads == 0
        assert sum(self.mrope_section) == self.head_dim // 2, "mrope_section must cover every frequency of a head"
        assert self.vision.hidden_size == self.hidden_size, "the patch merger must output the LLM width"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d):
        """Reads a Hub config.json dict: the flat pre-v5 layout or the nested text_config one transformers 5 writes."""
        text = d.get("text_config") or d  # nested (v5) or flat (Hub)
        rope = text.get("rope_parameters") or d.get("rope_scaling") or {}
        try:
            kw = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads")}
            kw["mrope_section"] = tuple(rope["mrope_section"])
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r}, which a Qwen2-VL text config must set") from None
        kw["rms_norm_eps"] = text.get("rms_norm_eps", 1e-6)
        kw["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta", 1e6)))
        kw["tie_word_embeddings"] = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        kw["max_position_embeddings"] = text.get("max_position_embeddings", 32768)
        for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if k in d:
                kw[k] = d[k]
        eos = d.get("eos_token_id", text.get("eos_token_id", 151645))
        kw["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
        v = d.get("vision_config", {})
        vrope = v.get("rope_parameters", {})
        kw["vision"] = VisionConfig(
            depth=v.get("depth", 32), embed_dim=v.get("embed_dim", 1280), num_heads=v.get("num_heads", 16),
            mlp_ratio=v.get("mlp_ratio", 4), in_channels=v.get("in_channels", v.get("in_chans", 3)),
            patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            hidden_size=v.get("hidden_size", 3584),  # transformers' class default, which the 7B Hub config relies on
            rope_theta=vrope.get("rope_theta", 10000.0))
        return cls(**kw)

    def to_hf(self):
        """The flat Hub layout (what Qwen/Qwen2-VL-*-Instruct ship), readable by from_hf and by transformers."""
        nested = ("vision", "mrope_section", "rope_theta")  # written below in the Hub's own form
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
        vision = {f.name: getattr(self.vision, f.name) for f in fields(self.vision) if f.name != "rope_theta"}
        d.update(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_act="silu",
                 rope_theta=self.rope_theta, rope_scaling={"type": "mrope", "mrope_section": list(self.mrope_section)},
                 vision_config=vision)
        return d


PRESETS = {
    "qwen2-vl-2b": dict(),
    "qwen2-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False, vision=dict(hidden_size=3584)),
    # the synthetic quick start's model (config/synth.py): ~3M parameters. rope_theta 10, not Qwen's 1e6: with 32-wide
    # heads 1e6 leaves the h and w sections of M-RoPE 3e-2..2e-6 rad per position, no spatial signal at all
    "synth": dict(vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, mrope_section=(4, 6, 6), rope_theta=10.0,
                  vision=dict(depth=4, embed_dim=128, num_heads=4, hidden_size=192)),
    # CPU-sized model for tests: same wiring, ~0.4M parameters
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=(2, 3, 3),
                 vision=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64)),
}

# -----------------------------------------------------------------------------
# rotary embeddings


def cos_sin(emb):
    """Rotary angles (..., hs), both halves of a head turned by the same angles -> cos and a signed sin whose first
    half is negated, the tables apply_rope takes."""
    half = emb.size(-1) // 2
    sin = emb.sin()
    return emb.cos(), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x, cos, sin):
    """x rotated by cos_sin's tables: transformers' x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1),
    here as a roll times the signed sin (the same floats; 2 ops fewer, half the time of a small decode step's
    rotation). Computed in the tables' dtype, then cast back to x's: fp32 tables give the ViT's fp32 rotation
    (apply_rotary_pos_emb_vision); the LLM's come in its residual stream's dtype (Qwen2.forward), so bf16 weights
    rotate in bf16, and under bf16 autocast (fp32 stream) bf16 q and k rotate in fp32 and are cast back, the numbers
    transformers' type promotion gives (apply_rotary_pos_emb)."""
    same = x.dtype == cos.dtype  # the LLM outside autocast: no casts (a no-op cast still costs ~1 us on a CPU thread)
    xr = x if same else x.to(cos.dtype)
    y = xr * cos + xr.roll(x.size(-1) // 2, dims=-1) * sin
    return y if same else y.to(x.dtype)


@functools.lru_cache
def inv_freq(dim, theta, device):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


@functools.lru_cache
def mrope_selector(head_dim, theta, section, device):
    """(3, 1, 1, hs) float32: the inverse frequency of each of a head's dimensions on the position axis (t, h or w)
    whose section it lies in, 0 on the other two axes, twice over (the two halves that rotate together)."""
    f = inv_freq.__wrapped__(head_dim, theta, device)  # (hs/2,) uncached: this table is cached itself
    axis = torch.cat([torch.full((n,), i % 3, device=device) for i, n in enumerate(section)])  # (hs/2,)
    sel = torch.stack([torch.where(axis == a, f, 0.0) for a in range(3)])  # (3, hs/2)
    return torch.cat((sel, sel), dim=-1)[:, None, None]  # (3, 1, 1, hs)


def mrope_cos_sin(position_ids, head_dim, theta, section):
    """M-RoPE, as Qwen2VLRotaryEmbedding.forward: frequency chunks of sizes `section` cycle through the t, h, w
    position axes. Returns cos_sin's tables (B, 1, T, hs) in float32."""
    # each angle is one axis' position times its frequency plus exact zeros from the other two: the same floats as
    # picking the axis per chunk, in three ops instead of a split, a gather and two concatenations
    # a compiled step traces the table's few ops into its graph (once per compile), where the cache has no use
    table = mrope_selector.__wrapped__ if torch.compiler.is_compiling() else mrope_selector
    sel = table(head_dim, theta, tuple(section), position_ids.device)
    return cos_sin((position_ids[..., None].float() * sel).sum(0)[:, None])  # 2 x (B, 1, T, hs)


def vision_positions(grid_thw, merge):
    """(h, w) of every patch in the merge-block-major row order of pixel_values (data.process_image); mirrors
    vision_utils.get_vision_position_ids."""
    pos = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h)[:, None].expand(h, w)
        wpos = torch.arange(w)[None, :].expand(h, w)
        hw = torch.stack([hpos, wpos], dim=-1)  # (h, w, 2)
        hw = hw.reshape(h // merge, merge, w // merge, merge, 2)  # (h/m, m, w/m, m, 2)
        hw = hw.permute(0, 2, 1, 3, 4).reshape(-1, 2)  # (h*w, 2), one m x m block after another
        pos.append(hw.repeat(t, 1))
    return torch.cat(pos)  # (Np, 2)


# -----------------------------------------------------------------------------
# vision tower: mirrors Qwen2VisionTransformerPretrainedModel


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x):
        # a Conv3d whose kernel covers the whole patch is a matmul with the flattened kernel
        w = self.proj.weight.view(self.cfg.embed_dim, -1)  # (D, 1176)
        return x.to(w.dtype) @ w.t()  # (Np, D)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x, cos, sin, seqlens):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.nh, D // self.nh).unbind(1)  # 3 x (Np, nh, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # 3 x (nh, Np, hs)
        # each image attends only to itself (block-diagonal, cu_seqlens in transformers): one SDPA call per run of
        # images of one size, the run as its batch (a training batch of 32 equal images is one call, not 32), in 4-D:
        # SDPA's fused kernels take (B, nh, T, hs) only, and 3-D falls back to the math path (3x slower on CPU)
        ys, start = [], 0
        for L, run in itertools.groupby(seqlens):
            n = len(list(run))
            qkv = (t[:, start:start + n * L].unflatten(1, (n, L)).transpose(0, 1) for t in (q, k, v))  # (n, nh, L, hs)
            ys.append(F.scaled_dot_product_attention(*qkv).transpose(0, 1).flatten(1, 2))  # (nh, n * L, hs)
            start += n * L
        return self.proj(torch.cat(ys, 1).transpose(0, 1).reshape(N, D))  # (Np, D)


class VisionMlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.embed_dim * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.embed_dim * cfg.mlp_ratio, cfg.embed_dim)

    def forward(self, x):
        x = self.fc1(x)  # (Np, 4D)
        if x.requires_grad:  # autograd keeps x and the sigmoid for the backward
            return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU, as CLIP's ViT
        # no gradient (inference, a frozen ViT): the same floats with one (Np, 4D) temporary instead of three, each a
        # fresh 20 MB at 2B widths (448 px)
        return self.fc2(x.mul_((1.702 * x).sigmoid_()))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = VisionMlp(cfg)

    def forward(self, x, cos, sin, seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.hidden_size))

    def forward(self, x):
        # rows come in 2x2-block-major order, so 4 consecutive rows are one merged token
        return self.mlp(self.ln_q(x).view(-1, self.width))  # (Np/4, C)


def image_token_counts(grid_thw, merge) -> torch.Tensor:
    """(n, 3) image_grid_thw -> (n,) LLM tokens per image: the merger makes one of each m x m block of patches."""
    return grid_thw.prod(-1) // merge ** 2


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values, grid_thw):
        """(Np, 1176) patches of one or more images -> (Np/4, C) image tokens for the LLM."""
        cfg = self.cfg
        x = self.patch_embed(pixel_values)
        hs = cfg.embed_dim // cfg.num_heads
        pos = vision_positions(grid_thw, cfg.spatial_merge_size).to(x.device)  # (Np, 2)
        freqs = pos[..., None].float() * inv_freq(hs // 2, cfg.rope_theta, x.device)  # (Np, 2, hs/4)
        freqs = freqs.flatten(1)  # (Np, hs/2): h frequencies then w frequencies
        emb = torch.cat((freqs, freqs), dim=-1)  # (Np, hs)
        cos, sin = cos_sin(emb[:, None])  # (Np, 1, hs) broadcast over heads
        seqlens = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).tolist()  # one entry per frame
        for block in self.blocks:
            x = block(x, cos, sin, seqlens)
        return self.merger(x)


# -----------------------------------------------------------------------------
# language model: mirrors Qwen2VLTextModel


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """Qwen2RMSNorm: normalised in float32, cast back to x's dtype, then scaled by the weight."""
        # in float32 F.rms_norm with the weight is the same floats, forward and backward (bit for bit on CPU), in
        # fewer ops (a 64-wide decode step's norm: 11 us against 19 on one CPU thread)
        w = self.weight  # read once: a parameter is looked up through Module.__getattr__, ~0.5 us a time
        if x.dtype == w.dtype == torch.float32:
            return F.rms_norm(x, w.shape, w, self.eps)
        return w * F.rms_norm(x.float(), w.shape, eps=self.eps).to(x.dtype)


class KVCache:
    """Preallocated keys and values of every layer, k[i], v[i] (B, nkv, max_len, hs), and how many slots of each
    row are filled. A forward of T new tokens writes row b's at slots lengths[b] .. lengths[b] + T - 1, and the
    caller then advances each row by the tokens that were real: rows of different lengths share one cache (the
    batched sampler's rows, each at its own round; a chunk shorter than T is right-padded, and the padding is
    overwritten later and never seen). A left-padded batch (generate) keeps all rows equal.
    static=True returns the whole buffer from update, so a decode step has the same shapes at every length (what
    CUDA graphs need; the mask must then hide the unfilled slots, as gpt-fast's and transformers' StaticCache do);
    otherwise update returns slots [0, pos + T), with pos the longest row. Every tensor here keeps its address for
    the cache's life (lens is updated in place), so a CUDA graph captured over a step can read and write them; for
    the same reason it is for inference: a backward through a scatter write would find lens changed (training keeps
    its keys in vpt.GradCache)."""

    def __init__(self, cfg, batch_size, max_len, device, dtype, static=False):
        # one tensor per layer: a compiled step that wrote into a view of one tensor of all layers copied all of it
        # around each write (12 copies of the 2B cache per step)
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len, self.static = max_len, static
        self.lengths = [0] * batch_size  # host copy: no device sync to size a slice or a mask
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) the same, for indexing
        self.pos = 0  # the longest row
        self.uniform = True  # every row as long: one slice of the cache is where the new tokens go
        self.parent = None  # (cache, row) for a row's view

    def row(self, b):
        """Row b alone, on this cache's storage: what a forward writes lands here, and advancing the view advances
        row b here (a long chunk of one row runs without padding every other row to its length)."""
        view = copy.copy(self)
        view.k, view.v = [k[b:b + 1] for k in self.k], [v[b:b + 1] for v in self.v]  # (1, nkv, max_len, hs) views
        view.lengths, view.lens, view.pos = [self.lengths[b]], self.lens[b:b + 1], self.lengths[b]
        view.uniform, view.parent = True, (self, b)
        return view

    def update(self, layer, k, v):
        """k, v (B, nkv, T, hs) of the new tokens -> this layer's keys and values so far (B, nkv, S, hs)."""
        T = k.size(2)
        if not torch.compiler.is_compiling():  # (a compiled step must not read pos: dynamo would recompile for each)
            assert self.pos + T <= self.max_len, f"KV cache full: {self.pos}+{T} > {self.max_len}"
        ks, vs = self.k[layer], self.v[layer]  # (B, nkv, max_len, hs)
        if self.static or not self.uniform:  # rows at different slots: one scatter for all (a copy per run of
            # equal rows was 2 x 28 small copies per run and step at the 2B depth, the batched sampler's overhead)
            slots = self.lens[:, None, None, None]  # (B, 1, 1, 1) the slot of each row's first new token
            if T > 1:
                slots = slots + torch.arange(T, device=k.device)[:, None]  # (B, 1, T, 1)
            ks.scatter_(2, slots.expand_as(k), k)
            vs.scatter_(2, slots.expand_as(v), v)
        else:
            ks.narrow(2, self.pos, T).copy_(k)
            vs.narrow(2, self.pos, T).copy_(v)
        return (ks, vs) if self.static else (ks.narrow(2, 0, self.pos + T), vs.narrow(2, 0, self.pos + T))

    def reset(self):
        """Empties every row; the old keys and values stay, hidden by the mask until they are overwritten."""
        self.lengths = [0] * len(self.lengths)
        self.lens.zero_()
        self.pos, self.uniform = 0, True

    def advance(self, n):
        """Marks n more slots of every row filled (an int), or n[b] of row b (a list)."""
        alike = isinstance(n, int)
        n = [n] * len(self.lengths) if alike else n
        self.lengths = [a + b for a, b in zip(self.lengths, n)]
        assert max(self.lengths) <= self.max_len, f"KV cache full: {max(self.lengths)} > {self.max_len}"
        # in place: a row's view shares lens, a CUDA graph reads it. Every row alike (a decode step) is one add, not
        # a tensor built on the host and copied (5 us against 2.5 a step on a CPU thread)
        if alike:
            self.lens.add_(n[0])
        else:
            self.lens.copy_(torch.tensor(self.lengths))
        self.pos = max(self.lengths)
        self.uniform = len(set(self.lengths)) == 1
        if self.parent:
            cache, b = self.parent
            cache.advance([n[0] if i == b else 0 for i in range(len(cache.lengths))])

    def layer(self, i):
        return LayerCache(self, i)


class LayerCache(NamedTuple):
    """Layer i's part of a KVCache: what that layer's Attention updates. Each layer gets its own cache object
    (vpt.GradCache too), so a compiled decoder layer never sees the layer index."""
    cache: KVCache
    i: int

    def update(self, k, v):
        return self.cache.update(self.i, k, v)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hs)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hs)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hs)
        self.o_proj = nn.Linear(self.nh * self.hs, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, nkv, S, hs)
        if T == 1:
            # one query per head: the heads sharing a key/value head become that head's queries, so each key and
            # value is read once (one CPU thread, 2B's 12 heads on 2 at 1,300 keys: 213 us against enable_gqa's 512)
            q = q.view(B, self.nkv, -1, self.hs)  # (B, nkv, nh/nkv, hs)
            if torch.compiler.is_compiling():
                # a compiled decode step: scores, softmax and sum written out, for inductor to fuse. SDPA's fused
                # kernels are built for blocks of many queries; given these few, cuDNN's took 42 us of a 2B layer's
                # ~100 on an H200. Scores in fp32, as the fused kernels keep them
                s = (q.float() @ k.float().transpose(-1, -2)) * self.hs ** -0.5  # (B, nkv, nh/nkv, S)
                s = s if mask is None else s.masked_fill(~mask, float("-inf"))
                y = s.softmax(-1).to(v.dtype) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            # head h is (h // (nh/nkv), h % (nh/nkv)), so the heads are already in order; reshape, not view: CUDA's
            # SDPA kernels may return the (nh/nkv) queries of a head outermost in memory
            y = y.reshape(B, 1, C)  # (B, 1, nh * hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.nkv != self.nh)  # (B, nh, T, hs)
            y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh * hs)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2(nn.Module):
    """The decoder-only LLM; Hub prefix `model.`."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.checkpointing = False  # activation checkpointing per layer, set by train.py

    def rope(self, position_ids):
        """M-RoPE position ids (3, B, T) -> their rotary tables (cos, sin), each (B, 1, T, hs) float32; those of
        tokens a..b-1 alone are the slice [:, :, a:b]."""
        cfg = self.cfg
        return mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def forward(self, x, position_ids, mask=None, kv_cache=None):
        """(B, T, C) input embeddings at M-RoPE positions -> (B, T, C) final-normed hidden states.
        position_ids: (3, B, T), or their tables self.rope(position_ids): a decode loop makes every step's tables
        in one call and passes each step its slice (generate; ~20 us a token less on a CPU thread).
        mask: bool (B, 1, T, S), True = may attend; None = plain causal over the new tokens (and all cached ones).
        kv_cache: the new keys and values are written after each row's cached ones; the caller advances it by the
        tokens that are real (KVCache.advance)."""
        T = x.size(1)
        if mask is None and kv_cache is not None and kv_cache.pos > 0 and T > 1:
            # SDPA's is_causal aligns the triangle top-left; a chunk after cached tokens needs it bottom-right
            mask = causal_mask(torch.ones(x.size(0), kv_cache.pos + T, device=x.device), T, start=kv_cache.pos)
        cos, sin = self.rope(position_ids) if torch.is_tensor(position_ids) else position_ids
        if cos.dtype != x.dtype:  # cast once for every layer, as Qwen2VLRotaryEmbedding.forward returns them
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            cache = kv_cache.layer(i) if kv_cache is not None else None
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def causal_mask(padding_mask, T, start=0):
    """Causal mask for T new tokens at slots start..start+T-1 over S = start+T keys, with padded keys hidden.
    padding_mask: (B, S) 1 = real token. Each query also sees itself, so a padded row stays finite (it is
    ignored anyway). Returns bool (B, 1, T, S)."""
    S = padding_mask.size(1)
    qpos = torch.arange(start, start + T, device=padding_mask.device)[:, None]  # (T, 1)
    kpos = torch.arange(S, device=padding_mask.device)[None, :]  # (1, S)
    causal = kpos <= qpos  # (T, S)
    return (causal & padding_mask.bool()[:, None, None, :]) | (kpos == qpos)


# -----------------------------------------------------------------------------
# M-RoPE positions


def get_rope_index(input_ids, image_grid_thw, padding_mask=None, image_token_id=151655, merge=2):
    """Mirrors Qwen2VLModel.get_rope_index: text runs advance all three axes by one per token; a run of image
    tokens gets (t, h, w) = start + grid index and then advances by max(h, w) / merge. Padded slots get 0.
    Returns position_ids (3, B, T) and rope_delta (B, 1) = max position + 1 - real length: decode step n of a
    row (0-based, after its real prompt of length L) sits at L + n + rope_delta on all three axes."""
    B, T = input_ids.shape
    if padding_mask is None:
        padding_mask = torch.ones_like(input_ids)
    position_ids = torch.zeros(3, B, T, dtype=torch.long, device=input_ids.device)
    deltas = []
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(B):
        real = padding_mask[b].bool()
        ids = input_ids[b][real].tolist()
        pos, cur, i = [], 0, 0
        while i < len(ids):
            if ids[i] == image_token_id:
                t, h, w = next(grids)
                h, w = h // merge, w // merge
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                pos.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)  # (3, t*h*w)
                i += t * h * w
                cur += max(h, w)
            else:
                j = i
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                pos.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
                i = j
        pos = torch.cat(pos, dim=1) if pos else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, real] = pos.to(input_ids.device)
        deltas.append((pos.max() + 1 if pos.numel() else 0) - len(ids))
    return position_ids, torch.tensor(deltas, device=input_ids.device).view(B, 1)


def decode_positions(padding_mask, rope_delta, T=1):
    """M-RoPE ids (3, B, T) of the next T tokens: real length so far + rope_delta, as the decode branch of
    Qwen2VLModel.compute_3d_position_ids."""
    start = padding_mask.sum(1, keepdim=True) + rope_delta  # (B, 1)
    pos = start + torch.arange(T, device=padding_mask.device)[None]  # (B, T)
    return pos[None].expand(3, -1, -1)


# -----------------------------------------------------------------------------
# the full vision-language model


def init_weights(module):
    """From-scratch init (training a tiny model; checkpoints overwrite it): N(0, 0.02) weights and zero biases, as
    Qwen2's initializer_range. Norms keep their ones/zeros."""
    if isinstance(module, (nn.Linear, nn.Conv3d, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class Qwen2VL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2(cfg)
        self.visual = VisionTransformer(cfg.vision)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(init_weights)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings with the image features written over the <|image_pad|> slots, in order (mirrors
        Qwen2VLModel.forward: get_placeholder_mask, then masked_scatter)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if pixel_values is not None:
            feats = self.visual(pixel_values, image_grid_thw).to(x.dtype)  # (sum Np/4, C)
            slots = input_ids == self.cfg.image_token_id
            if int(slots.sum()) != feats.size(0):
                raise ValueError(f"{int(slots.sum())} <|image_pad|> tokens but {feats.size(0)} image features")
            x = x.masked_scatter(slots[..., None], feats)
        return x

    def forward(self, batch, targets=None):
        """A collated batch (data.collate: input_ids and padding_mask (B, T), position_ids (3, B, T), pixel_values,
        image_grid_thw) -> (logits, loss), the calling convention vpt.VPT shares. targets (B, T): the token each
        position must predict (already shifted), -100 = none. With targets, logits are computed only at the
        supervised positions (N, V): the full (B, T, V) tensor of a 150k vocabulary is the largest activation in
        training. Without targets, logits are (B, T, V). Decoding calls embed, model and lm_head itself."""
        ids = batch["input_ids"]
        x = self.embed(ids, batch["pixel_values"], batch["image_grid_thw"])  # (B, T, C)
        h = self.model(x, batch["position_ids"], causal_mask(batch["padding_mask"], ids.size(1)))
        return self.head(h, targets)

    def hub_config(self):
        """The config.json of this model's checkpoints: the flat Hub layout (vpt.VPT adds its own fields)."""
        return self.cfg.to_hf()

    def head(self, h, targets=None):
        if targets is None:
            return self.lm_head(h), None
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(h[keep])  # (N, V)
        loss = F.cross_entropy(logits.float(), targets[keep]) if keep.any() else logits.sum() * 0.0
        return logits, loss


# -----------------------------------------------------------------------------
# sampling


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy; top_k keeps the k best (0 or None: no filter);
    top_p keeps the smallest set whose probability reaches p, always at least the best token, so top_p 0 is the
    best token alone (as TopKLogitsWarper and TopPLogitsWarper in transformers' generate)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        drop[:, 0] = False  # the best token always stays (min_tokens_to_keep=1)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, padding_mask=None, pixel_values=None, image_grid_thw=None, max_new_tokens=64,
             temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None):
    """Prefill once, then decode one token a step from the KV cache; yields (B,) ids until every row has produced
    a stop id or max_new_tokens. Batches are left-padded (padding_mask (B, T), 1 = real token)."""
    cfg = model.cfg
    B, T = input_ids.shape
    if padding_mask is None:
        padding_mask = torch.ones_like(input_ids)
    pos, rope_delta = get_rope_index(input_ids, image_grid_thw, padding_mask, cfg.image_token_id,
                                     cfg.vision.spatial_merge_size)
    padded = bool((padding_mask == 0).any())
    cache = KVCache(cfg, B, T + max_new_tokens, input_ids.device, model.lm_head.weight.dtype)
    mask = causal_mask(padding_mask, T) if padded else None
    h = model.model(model.embed(input_ids, pixel_values, image_grid_thw), pos, mask, cache)
    cache.advance(T)
    logits = model.lm_head(h[:, -1])  # (B, V): only the last position is needed to sample
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    # every step's rotary tables from one call, in the activations' dtype, not a step's ~8 small ops each time
    # (gpt-fast's freqs_cis table)
    tables = model.model.rope(decode_positions(padding_mask, rope_delta, max_new_tokens))  # 2 x (B, 1, N, hs)
    cos, sin = (t.to(model.model.embed_tokens.weight.dtype) for t in tables)
    rope = list(zip(cos.split(1, dim=2), sin.split(1, dim=2)))  # step n's: 2 x (B, 1, 1, hs) views
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if step + 1 == max_new_tokens:  # no forward whose logits nobody would sample
            return
        if stop.numel():
            done |= torch.isin(nxt, stop)
            if done.all():
                return
        if padded:  # a left-padded batch hides its padding from the new token; otherwise plain causal, no mask
            padding_mask = torch.cat([padding_mask, torch.ones_like(padding_mask[:, :1])], dim=1)
            mask = causal_mask(padding_mask, 1, start=cache.pos)
        h = model.model(model.model.embed_tokens(nxt[:, None]), rope[step], mask, cache)
        cache.advance(1)
        logits = model.lm_head(h[:, -1])


# -----------------------------------------------------------------------------
# checkpoints: Hub layout in, Hub layout out


HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]  # configs, weights, tokenizer, preprocessor
# transformers >= 5 can keep its in-memory prefixes in a checkpoint; map them back to the Hub names
KEY_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


LATEST = "latest"  # in a training out_dir: the name of its one complete checkpoint directory (train.save_checkpoint)
MANIFEST = "checkpoint.json"  # in a checkpoint directory train.py wrote: its step and a fingerprint of every file


def resolve_dir(path_or_id, patterns=HUB_PATTERNS):
    """A local directory (a training out_dir: the checkpoint its `latest` file names, checked against its
    manifest), or a Hub repo id downloaded (config, weights, tokenizer files only)."""
    if os.path.isdir(path_or_id):
        return checkpoint_dir(path_or_id)
    if os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")) or path_or_id.count("/") > 1:
        raise UserError(f"{path_or_id}: no such directory (a path, so not a Hugging Face Hub repo id)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_id, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, no permission: one sentence, not a stack of retries
        raise OSError(f"'{path_or_id}' is not a local directory and could not be fetched from the Hugging Face Hub "
                      f"({type(e).__name__}); check the path, or the repo id and your network.") from None


def checkpoint_dir(path) -> str:
    """A directory -> the checkpoint to load from it: in a training out_dir the directory its `latest` file names,
    otherwise path itself. A checkpoint with a manifest must match it file by file, so a mixed or incomplete one
    (files of different saves, a file cut short or missing) is refused, never loaded."""
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        path = os.path.join(path, Path(pointer).read_text().strip())
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise UserError(f"{pointer} names {path}, which is not a complete checkpoint (no {MANIFEST})")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        want = read_json(os.path.join(path, MANIFEST))["files"]
        for name, fp in want.items():
            file = os.path.join(path, name)
            if not os.path.isfile(file) or fingerprint(file) != fp:
                what = "missing" if not os.path.isfile(file) else f"not the file {MANIFEST} lists"
                raise UserError(f"{file} is {what}: the checkpoint in {path} is mixed or incomplete; load another")
    return path


def fingerprint(file, samples=16, chunk=1 << 16) -> str:
    """Size and a SHA-256 of 16 chunks of 64 KiB spread evenly over the file (all of a small one): 1 MiB read from
    a 16 GB optimizer state, and two saves of a run differ in it wherever trained weights lie, frozen ones aside."""
    size = os.path.getsize(file)
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for i in range(samples):
            f.seek(i * max(0, size - chunk) // (samples - 1))
            h.update(f.read(chunk))
    return f"{size}:{h.hexdigest()[:32]}"


def read_json(file) -> dict:
    """A JSON file; invalid JSON is an error that names the file and line."""
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None


def open_checkpoint(path_or_id, patterns=HUB_PATTERNS) -> tuple[str, dict]:
    """The start of every load: the checkpoint's local directory (a Hub id is downloaded first) and its config.json."""
    path = resolve_dir(path_or_id, patterns)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is not a checkpoint directory: it has no config.json")
    return path, read_json(os.path.join(path, "config.json"))


def _weight_files(dirpath, index, suffix, prefix="") -> list[str]:
    """The shards a checkpoint's index names, else every prefix*suffix file in the directory."""
    index = os.path.join(dirpath, index)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return sorted(f for f in os.listdir(dirpath) if f.startswith(prefix) and f.endswith(suffix))


def read_weights(dirpath, allow_bin=False) -> dict:
    """All tensors of a checkpoint directory, sharded or not, memory-mapped, under their Hub key names: *.safetensors,
    or (allow_bin, the VPT authors' checkpoints) pytorch_model*.bin, read with weights_only=True so that a pickle
    from the Hub never runs code here."""
    from safetensors.torch import load_file
    files, load = _weight_files(dirpath, "model.safetensors.index.json", ".safetensors"), load_file
    if not files and allow_bin:
        files, load = _weight_files(dirpath, "pytorch_model.bin.index.json", ".bin", "pytorch_model"), _load_bin
    if not files:
        kinds = "*.safetensors or pytorch_model*.bin" if allow_bin else "*.safetensors"
        raise FileNotFoundError(f"no {kinds} weights in {dirpath}")
    sd = {}
    for name in files:
        sd.update(load(os.path.join(dirpath, name)))
    return {_rename(k): v for k, v in sd.items()}


def _rename(key):
    """A checkpoint key under its Hub name (KEY_RENAMES)."""
    for old, new in KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _load_bin(file):
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def load_state_dict_strict(model, sd, dtype, device):
    """Moves every checkpoint tensor into `model` (built on the meta device), in `dtype` on `device`.
    Raises, naming the keys, if any parameter is missing, any key is unexpected or any shape differs.
    A tied parameter is listed once, under its first name (embed_tokens, not lm_head)."""
    params = dict(model.named_parameters())
    unexpected = sorted(set(sd) - set(params))
    missing = sorted(set(params) - set(sd))
    bad = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(params[k].shape)}"
                 for k in set(params) & set(sd) if sd[k].shape != params[k].shape)
    if missing or unexpected or bad:
        lines = [f"\n  {what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"  # the first 8 of each kind
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)) if keys]
        raise CheckpointError("checkpoint does not match the model:" + "".join(lines))
    for k, p in params.items():
        mod_name, _, p_name = k.rpartition(".")
        t = sd.pop(k).to(device=device, dtype=dtype)  # the converted tensor replaces the meta one; the source can go
        setattr(model.get_submodule(mod_name), p_name, nn.Parameter(t, requires_grad=p.requires_grad))


@contextlib.contextmanager
def no_init():
    """torch.nn.init's initialisers as no-ops, as transformers' no_init_weights makes them: for a model built on the
    meta device and then filled from a checkpoint there is nothing to initialise, and the first random initialiser
    run on a meta tensor imports torch._dynamo (1.1 s of the 3.0 s that `python sample.py` took)."""
    saved = {name: f for name, f in vars(nn.init).items() if name.endswith("_") and not name.startswith("_")}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, f in saved.items():
            setattr(nn.init, name, f)


def build_loaded(make, sd, dtype, device):
    """make() builds a Qwen2VL (or subclass) on the meta device without initialising it, the state dict fills it
    strictly, and a tied lm_head is tied again (loading replaced the embedding Parameter it shared)."""
    with torch.device("meta"), no_init():
        model = make()
    load_state_dict_strict(model, sd, dtype, device)
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def from_pretrained(path_or_id, dtype=torch.float32, device="cpu"):
    """Qwen2-VL from a local directory or a Hub id (e.g. Qwen/Qwen2-VL-2B-Instruct). Built on the meta device and
    filled tensor by tensor, so peak memory stays near one copy of the weights."""
    path, d = open_checkpoint(path_or_id)
    cfg = QwenConfig.from_hf(d)
    return build_loaded(lambda: Qwen2VL(cfg), read_weights(path), dtype, device)


def save_pretrained(model, path, cfg_dict, state_dict=None):
    """Weights as model.safetensors (Hub key names; a tied lm_head is not written) and config.json, each written
    to a temporary name first and renamed, so a crash never leaves a half-written file under the real name.
    state_dict: the weights to write when they are not model.state_dict() (train.py gathers an FSDP model's)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    save_json(os.path.join(path, "config.json"), cfg_dict)


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside path, which then replaces path (os.replace, atomic on one
    filesystem): a crash never leaves a half-written file under the real name. The file gets the mode open() gives
    under the umask (safetensors writes 0600, which keeps a shared checkpoint from other users)."""
    tmp = f"{path}.tmp"
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_json(path, d):
    """d as indented JSON at path, through atomic_write."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(d, indent=2)))

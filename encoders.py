"""
Extra vision encoders for VPT's re-encoding branch, beside Qwen2-VL's own ViT: DINOv2 (VPT-Det) and SAM's image
encoder (VPT-Seg). Module names equal the Hub checkpoint keys (facebook/dinov2-*: embeddings.*, encoder.layer.N.*,
layernorm.*; facebook/sam-vit-*: vision_encoder.{patch_embed, pos_embed, layers.N, neck}.*), so loading is an
identity copy.

Shape legend: B batch, T tokens (the CLS token plus the Np patches), C width, nh heads, hs head size,
gh x gw patch grid, H x W pixels, w window side, nw windows, Co SAM's output channels.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import load_state_dict_strict, no_init, open_checkpoint, read_weights

# -----------------------------------------------------------------------------
# DINOv2 (facebook/dinov2-*), frozen; mirrors transformers 5.23 models/dinov2/modeling_dinov2.py Dinov2Model


@dataclass
class DinoConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16  # head size 64 in every facebook/dinov2-*
    mlp_ratio: int = 4
    patch_size: int = 14
    image_size: int = 518  # pretraining size: a 37x37 position table (+CLS), interpolated to 16x16 for VPT's 224 crops
    layer_norm_eps: float = 1e-6
    use_swiglu_ffn: bool = False  # True only for dinov2-giant
    num_channels: int = 3

    def __post_init__(self):
        assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must split evenly into heads"
        assert self.image_size % self.patch_size == 0, "the position table must cover a whole patch grid"

    @classmethod
    def from_hf(cls, d: dict) -> "DinoConfig":
        """From a facebook/dinov2-* config.json dict; the Hub files list every field."""
        # the fixed parts of the architecture, which the Hub files all share
        assert d.get("hidden_act", "gelu") == "gelu" and d.get("qkv_bias", True), "only exact GELU with qkv bias"
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "DinoConfig":
        """Infer the config from tensor shapes: the authors' VPT checkpoints hold none in their config.json."""
        hidden_size = sd[prefix + "embeddings.cls_token"].shape[-1]
        _, num_channels, patch_size, _ = sd[prefix + "embeddings.patch_embeddings.projection.weight"].shape
        layer_prefix = prefix + "encoder.layer."
        num_layers = len({k[len(layer_prefix):].split(".")[0] for k in sd if k.startswith(layer_prefix)})
        num_positions = sd[prefix + "embeddings.position_embeddings"].shape[1] - 1  # minus the CLS position
        side = math.isqrt(num_positions)
        assert side * side == num_positions, f"position table of {num_positions} patches is not square"
        use_swiglu_ffn = layer_prefix + "0.mlp.weights_in.weight" in sd
        # SwiGLU stores only its rounded 2/3 width, so the ratio cannot be read back; giant (the only SwiGLU) uses 4
        mlp_ratio = 4 if use_swiglu_ffn else sd[layer_prefix + "0.mlp.fc1.weight"].shape[0] // hidden_size
        assert hidden_size % 64 == 0, f"hidden_size {hidden_size} is not a multiple of the head size 64"
        return cls(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64,
                   mlp_ratio=mlp_ratio, patch_size=patch_size, image_size=side * patch_size,
                   use_swiglu_ffn=use_swiglu_ffn, num_channels=num_channels)


DINO_PRESETS = {
    "dinov2-large": dict(),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1),  # CPU-sized, for tests and quick starts
}


class Dinov2Embeddings(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        C, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        # only used by DINOv2 pretraining (masked patches); it exists so that the Hub key loads
        self.mask_token = nn.Parameter(torch.zeros(1, C))
        self.position_embeddings = nn.Parameter(torch.zeros(1, (config.image_size // p) ** 2 + 1, C))
        self.patch_embeddings = nn.ModuleDict({"projection": nn.Conv2d(config.num_channels, C, p, stride=p)})

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        # mirrors Dinov2Embeddings.interpolate_pos_encoding (transformers 5.23): an exact size=(H//p, W//p), not the
        # scale_factor of older transformers and facebookresearch/dinov2 (1.26 apart on random data)
        pos = self.position_embeddings  # (1, 1 + side*side, C)
        num_positions = pos.shape[1] - 1
        if num_patches == num_positions and height == width:
            return pos
        side, C = math.isqrt(num_positions), pos.shape[-1]
        patch_pos = pos[:, 1:].reshape(1, side, side, C).permute(0, 3, 1, 2)  # (1, C, side, side)
        # bicubic in fp32 then back to the table's dtype: half-precision bicubic shifts the embeddings
        grid = (height // self.patch_size, width // self.patch_size)
        patch_pos = F.interpolate(patch_pos.to(torch.float32), size=grid, mode="bicubic",
                                  align_corners=False).to(pos.dtype)  # (1, C, gh, gw)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, C)  # (1, Np, C), row-major like the patches
        return torch.cat((pos[:, :1], patch_pos), dim=1)  # (1, T, C): the CLS position is kept as is

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        proj = self.patch_embeddings.projection
        x = proj(pixel_values.to(proj.weight.dtype))  # (B, C, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, Np, C)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, T, C)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, H, W)


class Dinov2Attention(nn.Module):
    """Bidirectional multi-head self-attention; the nesting attention.{query,key,value} / output.dense is the Hub's."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        C = config.hidden_size
        self.n_head = config.num_attention_heads
        self.attention = nn.ModuleDict({name: nn.Linear(C, C) for name in ("query", "key", "value")})
        self.output = nn.ModuleDict({"dense": nn.Linear(C, C)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (self.attention[name](x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for name in ("query", "key", "value"))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # default scale hs^-0.5, no mask: every token sees every token
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.output.dense(y)


class Dinov2LayerScale(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class Dinov2MLP(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.hidden_size * config.mlp_ratio)
        self.fc2 = nn.Linear(config.hidden_size * config.mlp_ratio, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Dinov2SwiGLUFFN(nn.Module):
    """dinov2-giant's MLP: one fused (gate, up) projection, as stored on the Hub; mirrors Dinov2SwiGLUFFN."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        # two thirds of the plain MLP width, rounded up to a multiple of 8 (4096 for giant)
        hidden = (int(config.hidden_size * config.mlp_ratio * 2 / 3) + 7) // 8 * 8
        self.weights_in = nn.Linear(config.hidden_size, 2 * hidden)
        self.weights_out = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the first half is the gate: transformers' conversion_mapping chunks weights_in into (gate_proj, up_proj)
        gate, up = self.weights_in(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.weights_out(F.silu(gate) * up)


class Dinov2Layer(nn.Module):
    """Pre-norm ViT block with layer scale; drop-path and dropout are the identity at inference."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov2Attention(config)
        self.layer_scale1 = Dinov2LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov2SwiGLUFFN(config) if config.use_swiglu_ffn else Dinov2MLP(config)
        self.layer_scale2 = Dinov2LayerScale(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Model(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        self.config = config
        self.embeddings = Dinov2Embeddings(config)
        layers = nn.ModuleList(Dinov2Layer(config) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layer": layers})  # Hub keys encoder.layer.N.*
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> last_hidden_state (B, T, C), after the final layernorm."""
        x = self.embeddings(pixel_values)  # (B, T, C)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch tokens without CLS, what VPT feeds its projector: (B, Np, C), Np = 256 for a 224 crop."""
        return self(pixel_values)[:, 1:]


def dino_from_pretrained(path_or_id, dtype=torch.float32, device="cpu"):
    """DINOv2 from a facebook/dinov2-* directory or Hub id (config.json + model.safetensors, no key prefix)."""
    path, d = open_checkpoint(path_or_id)
    with torch.device("meta"), no_init():  # filled from the checkpoint: nothing to initialise
        model = Dinov2Model(DinoConfig.from_hf(d))
    load_state_dict_strict(model, read_weights(path), dtype, device)
    return model.eval()


# -----------------------------------------------------------------------------
# SAM's image encoder (facebook/sam-vit-*), frozen: a plain ViT with windowed and global attention, decomposed
# relative positions and a convolutional neck; mirrors transformers 5.23 models/sam/modeling_sam.py SamVisionEncoder


@dataclass
class SamConfig:  # defaults: facebook/sam-vit-large's vision_config
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16  # head size 64
    mlp_dim: int = 4096
    patch_size: int = 16
    image_size: int = 1024  # the processor pads every image to this square: a 64x64 grid
    window_size: int = 14  # the 64x64 grid is zero-padded to 70x70 in windowed blocks
    global_attn_indexes: tuple = (5, 11, 17, 23)  # blocks that attend over the whole grid
    output_channels: int = 256  # the neck's width, what VPT's projector reads
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self):
        self.global_attn_indexes = tuple(self.global_attn_indexes)  # a list after a round trip through JSON
        assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must split evenly into heads"
        assert self.image_size % self.patch_size == 0, "the position table must cover a whole patch grid"

    @classmethod
    def from_hf(cls, d: dict) -> "SamConfig":
        """From a facebook/sam-vit-* config.json dict (its vision_config), with SamVisionConfig's defaults (those of
        sam-vit-base, not ours) for the fields a file leaves out."""
        v = d.get("vision_config", d)
        hf = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=1024,
                  window_size=14, global_attn_indexes=(2, 5, 8, 11), output_channels=256, layer_norm_eps=1e-6,
                  num_channels=3)
        hf.update({k: v[k] for k in hf if k in v})
        hf["mlp_dim"] = v.get("mlp_dim") or int(hf["hidden_size"] * v.get("mlp_ratio", 4.0))
        # the fixed parts of the architecture, which the Hub files all share
        fixed = dict(hidden_act="gelu", qkv_bias=True, use_abs_pos=True, use_rel_pos=True)
        wrong = {k: v[k] for k, want in fixed.items() if v.get(k, want) != want}
        assert not wrong, f"unsupported SAM vision config values {wrong}"
        return cls(**hf)

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "SamConfig":
        """Infer the config from tensor shapes: the authors' VPT-Seg config.json holds none."""
        hidden_size, num_channels, patch_size, _ = sd[prefix + "patch_embed.projection.weight"].shape
        grid = sd[prefix + "pos_embed"].shape[1]  # (1, gh, gw, C)
        layer_prefix = prefix + "layers."
        num_layers = len({k[len(layer_prefix):].split(".")[0] for k in sd if k.startswith(layer_prefix)})
        # the relative-position tables have 2s-1 rows for a block that attends over s x s tokens: the grid for a
        # global block, the window for a windowed one
        rows = [sd[f"{layer_prefix}{i}.attn.rel_pos_h"].shape[0] for i in range(num_layers)]
        head_size = sd[layer_prefix + "0.attn.rel_pos_h"].shape[1]
        windows = {(r + 1) // 2 for r in rows if r != 2 * grid - 1}
        assert len(windows) <= 1, f"blocks with different window sizes {sorted(windows)}"
        return cls(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_size,
                   mlp_dim=sd[layer_prefix + "0.mlp.lin1.weight"].shape[0], patch_size=patch_size,
                   image_size=grid * patch_size, window_size=windows.pop() if windows else cls.window_size,
                   global_attn_indexes=tuple(i for i, r in enumerate(rows) if r == 2 * grid - 1),
                   output_channels=sd[prefix + "neck.conv1.weight"].shape[0], num_channels=num_channels)


SAM_PRESETS = {
    "sam-vit-large": dict(),
    # CPU-sized, for tests and quick starts: one windowed and one global block at the real 1024 px input
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, global_attn_indexes=(1,),
                 output_channels=32),
}


class SamVisionAttention(nn.Module):
    """Multi-head self-attention over an s x s block of tokens (a window, or the whole grid), with the decomposed
    relative position terms of MViTv2: the logit of query (qy, qx) and key (ky, kx) gains q.Rh[qy-ky] + q.Rw[qx-kx]."""

    def __init__(self, config: SamConfig, size: int):
        super().__init__()
        C, self.n_head = config.hidden_size, config.num_attention_heads
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, C // self.n_head))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, C // self.n_head))

    @staticmethod
    def rel_pos(size: int, table: torch.Tensor) -> torch.Tensor:
        """(s, s, hs): the table row of each (query, key) offset. transformers' get_rel_pos interpolates the table to
        2s-1 rows first, an identity at the size it was trained for, the only size used here."""
        assert table.shape[0] == 2 * size - 1, f"a relative position table of {table.shape[0]} rows for {size} tokens"
        offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1  # (s, s) in [0, 2s-2]
        return table[offsets.to(table.device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, gh, gw, C = x.shape  # B counts windows in a windowed block
        hs = C // self.n_head
        qkv = self.qkv(x).reshape(B, gh * gw, 3, self.n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, gh*gw, hs)
        q, k, v = qkv.unbind(0)  # (B, nh, gh*gw, hs)
        # mirrors SamVisionAttention.get_decomposed_rel_pos: a bias (B, nh, gh, gw, gh, gw) added to the logits
        r = q.reshape(B, self.n_head, gh, gw, hs)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r, self.rel_pos(gh, self.rel_pos_h))  # (B, nh, gh, gw, gh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r, self.rel_pos(gw, self.rel_pos_w))  # (B, nh, gh, gw, gw)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.n_head, gh * gw, gh * gw)
        # transformers' eager path takes the softmax in float32; SDPA does that internally for half inputs
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # scale hs^-0.5
        y = y.transpose(1, 2).reshape(B, gh, gw, C)  # (B, gh, gw, C)
        return self.proj(y)


class SamMLPBlock(nn.Module):
    def __init__(self, config: SamConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))  # exact (erf) GELU


class SamVisionLayer(nn.Module):
    """Pre-norm ViT block. A windowed block (window_size > 0) zero-pads the grid to whole windows after layer_norm1
    and attends within each window, padding included (no mask, as in SamVisionLayer.window_partition)."""

    def __init__(self, config: SamConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        grid = config.image_size // config.patch_size
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SamVisionAttention(config, window_size or grid)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SamMLPBlock(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, gh, gw, C = x.shape
        h, w = self.layer_norm1(x), self.window_size
        if w == 0:
            h = self.attn(h)
        else:
            ph, pw = -gh % w, -gw % w
            h = F.pad(h, (0, 0, 0, pw, 0, ph))  # (B, gh+ph, gw+pw, C): zeros at the bottom and right
            Hp, Wp = gh + ph, gw + pw
            h = h.reshape(B, Hp // w, w, Wp // w, w, C).transpose(2, 3).reshape(-1, w, w, C)  # (B*nw, w, w, C)
            h = self.attn(h)
            h = h.reshape(B, Hp // w, Wp // w, w, w, C).transpose(2, 3).reshape(B, Hp, Wp, C)[:, :gh, :gw]
        x = x + h
        return x + self.mlp(self.layer_norm2(x))


class SamChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (SamLayerNorm with data_format="channels_first")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamVisionNeck(nn.Module):
    def __init__(self, config: SamConfig):
        super().__init__()
        C, Co = config.hidden_size, config.output_channels
        self.conv1 = nn.Conv2d(C, Co, kernel_size=1, bias=False)
        self.layer_norm1 = SamChannelNorm(Co, eps=1e-6)
        self.conv2 = nn.Conv2d(Co, Co, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = SamChannelNorm(Co, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm1(self.conv1(x.permute(0, 3, 1, 2)))  # (B, Co, gh, gw)
        return self.layer_norm2(self.conv2(x))


class SamVisionEncoder(nn.Module):
    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        C, p, grid = config.hidden_size, config.patch_size, config.image_size // config.patch_size
        self.patch_embed = nn.ModuleDict({"projection": nn.Conv2d(config.num_channels, C, p, stride=p)})
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, C))  # absolute, at the one input size
        self.layers = nn.ModuleList(
            SamVisionLayer(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.num_hidden_layers))
        self.neck = SamVisionNeck(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) -> image embeddings (B, Co, gh, gw): (N, 256, 64, 64) for SAM-L at 1024."""
        size = self.config.image_size
        assert pixel_values.shape[-2:] == (size, size), f"SAM takes {size}x{size} pixels (padded), not " \
                                                        f"{tuple(pixel_values.shape[-2:])}"
        proj = self.patch_embed.projection
        x = proj(pixel_values.to(proj.weight.dtype)).permute(0, 2, 3, 1)  # (B, gh, gw, C)
        x = x + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


# a full SAM checkpoint holds the prompt encoder and mask decoder too: VPT reads the image embeddings only
SAM_UNUSED = ("prompt_encoder.", "mask_decoder.", "shared_image_embedding.")


def sam_vision_weights(sd: dict) -> dict:
    """The vision encoder's tensors of a SamModel (or SamVisionModel) checkpoint, without their vision_encoder.
    prefix; the prompt encoder's and mask decoder's are skipped by name, any other key is an error."""
    unknown = sorted(k for k in sd if not k.startswith(("vision_encoder.", *SAM_UNUSED)))
    if unknown:
        raise KeyError(f"not a facebook/sam-vit-* checkpoint: unexpected keys {', '.join(unknown[:8])}")
    return {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}


def sam_from_pretrained(path_or_id, dtype=torch.float32, device="cpu"):
    """SAM's image encoder from a facebook/sam-vit-* directory or Hub id (config.json + model.safetensors)."""
    path, d = open_checkpoint(path_or_id)
    with torch.device("meta"), no_init():  # filled from the checkpoint: nothing to initialise
        model = SamVisionEncoder(SamConfig.from_hf(d))
    load_state_dict_strict(model, sam_vision_weights(read_weights(path)), dtype, device)
    return model.eval()

"""
Extra vision encoders for VPT's re-encoding branch, beside Qwen2-VL's own ViT: DINOv2 now (VPT-Det), SAM next.
Module names equal the Hub checkpoint keys (facebook/dinov2-*: embeddings.*, encoder.layer.N.*, layernorm.*), so
loading is an identity copy.

Shape legend: B batch, T tokens (the CLS token plus the Np patches), C width, nh heads, hs head size,
gh x gw patch grid, H x W pixels.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import load_state_dict_strict, open_checkpoint, read_weights

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
    with torch.device("meta"):
        model = Dinov2Model(DinoConfig.from_hf(d))
    load_state_dict_strict(model, read_weights(path), dtype, device)
    return model.eval()

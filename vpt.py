"""
Everything the VPT paper (Yu, Ma, Wang, arXiv 2502.17425) adds to Qwen2-VL: the perception-token vocabulary, regions
<-> boxes on a k x k grid, the control projector, the VPT model (a training forward with one LLM pass, mask modeling
as an attention mask), the inference engine (a batch of questions, each with its own perception rounds, on one KV
cache), and checkpoints: the authors' layout in, ours (safetensors) out.
Citations: "VPT §n" is a section of the paper. A file or function name is the authors' code,
github.com/yu-rp/VisualPerceptionToken: their model is modeling_qwen2_vl_vpt.py (under
transformers/src/transformers/models/qwen2_vl_vpt/), their harness evaluation/evaluation.py, their trainer a
LLaMA-Factory fork (LLaMA-Factory/src/llamafactory/).

Shape legend: B batch, T tokens, P prefix tokens (up to the control vector), Q suffix tokens, C LLM width,
S re-encoded feature tokens of one image, Cf extra-encoder width, N images.
"""
import re
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

import data
import model as M
from encoders import DinoConfig, Dinov2Model, SamConfig, SamVisionEncoder, sam_vision_weights

# the extra encoder's name in the authors' token and parameter names
PREFIX = {"dino": "detection", "clip": "clip", "sam": "seg"}
REGION_TRIGGER = "Identify the region that can help you answer the question, and then answer the question"
REENCODE_TRIGGER = "Require additional perception features, and then answer the question"

# -----------------------------------------------------------------------------
# vocabulary: the new_special_tokens and new_tokens of the authors' configs/Qwen2-VL-2b-VPT-*.yaml


def token_strings(encoder="dino", k=8):
    """(special pad token, plain tokens) in the order the authors add them, so ids match their checkpoints."""
    p = PREFIX[encoder]
    plain = ["<|region_token_start|>", "<|region_token_end|>", *[f"<|x_{i}|>" for i in range(k)],
             *[f"<|y_{i}|>" for i in range(k)], f"<|{p}_action_start|>", f"<|{p}_action|>", f"<|{p}_action_end|>"]
    return f"<|{p}_image_pad|>", plain


@dataclass
class Tokens:
    """Ids of the perception tokens."""
    pad: int
    region_start: int
    region_end: int
    xs: tuple
    ys: tuple
    act_start: int
    act: int
    act_end: int
    im_start: int  # the chat-turn markers, which mask modeling and the sampler need too
    im_end: int

    @classmethod
    def of(cls, tok, encoder="dino", k=8):
        pad, plain = token_strings(encoder, k)
        ids = [tok.token_to_id(t) for t in plain]  # region start and end, k x cells, k y cells, the 3 action tokens
        xs, ys = tuple(ids[2:2 + k]), tuple(ids[2 + k:2 + 2 * k])
        return cls(tok.token_to_id(pad), ids[0], ids[1], xs, ys, *ids[-3:], tok.im_start_id, tok.im_end_id)

    def perception(self):
        """Every perception token id."""
        return {self.pad, self.region_start, self.region_end, *self.xs, *self.ys, self.act_start, self.act,
                self.act_end}


def add_tokens(tok, encoder="dino", k=8):
    """Adds the 1 + 2k + 5 perception tokens (those not there yet) and returns their ids. With the real Qwen2
    tokenizer they get 151657..151678, which are spare rows of the embedding: the authors' model is never resized
    (LLaMA-Factory's resize_embedding_layer only grows an embedding the tokenizer has outgrown)."""
    pad, plain = token_strings(encoder, k)
    tok.add_tokens([pad], special=True)  # special: skipped when decoding, like <|image_pad|>
    tok.add_tokens(plain)  # plain: they stay in decoded text, where the authors' harness parses them
    return Tokens.of(tok, encoder, k)


# -----------------------------------------------------------------------------
# regions: <|region_token_start|> x y x y <|region_token_end|> on a k x k grid, read as the authors' harness reads them


def box_to_cells(box, W, H, k=8):
    """Pixel box (x1, y1, x2, y2), x2/y2 exclusive -> grid cells (cx1, cy1, cx2, cy2) of its top-left and
    bottom-right pixels."""
    x1, y1, x2, y2 = box
    cell = lambda v, size: min(int(v * k / size), k - 1)
    return cell(x1, W), cell(y1, H), cell(x2 - 1, W), cell(y2 - 1, H)


def cells_to_box(xs, ys, W, H, k=8, margin=1):
    """Cells of one region group -> pixel crop box on the original W x H image: min/max cells widened by `margin`
    cells, clipped to the grid (mirrors region_token_to_new_image_path in evaluation/evaluation.py)."""
    x0, x1 = max(min(xs) - margin, 0), min(max(xs) + margin, k - 1)
    y0, y1 = max(min(ys) - margin, 0), min(max(ys) + margin, k - 1)
    return int(x0 * W / k), int(y0 * H / k), int((x1 + 1) * W / k), int((y1 + 1) * H / k)


def region_text(cells):
    cx1, cy1, cx2, cy2 = cells
    return f"<|region_token_start|><|x_{cx1}|><|y_{cy1}|><|x_{cx2}|><|y_{cy2}|><|region_token_end|>"


REGION_RE = re.compile(r"<\|region_token_start\|>((?:<\|[xy]_\d+\|>)+)<\|region_token_end\|>")


def parse_regions(text):
    """Every complete region group in decoded text -> list of (xs, ys); a group without both an x and a y cell is
    malformed and skipped, an unterminated one never matches (the regex of check_region_tokens in
    evaluation/evaluation.py)."""
    groups = []
    for m in REGION_RE.finditer(text):
        cells = re.findall(r"<\|([xy])_(\d+)\|>", m.group(1))
        xs = [int(v) for a, v in cells if a == "x"]
        ys = [int(v) for a, v in cells if a == "y"]
        if xs and ys:
            groups.append((xs, ys))
    return groups


# -----------------------------------------------------------------------------
# the control projector: the authors' MinimalProjector (DINOv2), MinimalSamProjector (SAM) and MinimalCLIPProjector
# (clip)

SAM_PROJECTOR_STRIDE = 4  # MinimalSamProjector's conv: kernel 4, stride 4, so SAM-L's 64x64 map gives 16x16 tokens


class ControlProjector(nn.Module):
    """Features -> LLM width, modulated by the control vector: f' = Linear(LayerNorm(f)), c = Linear(LayerNorm(h)),
    out = f' + (f'.c) c. The paper calls it cross-attention; with a single key and value (c) a softmax over one key
    would be constant 1, so the score is the raw dot product, as in the authors' code. Without a control vector
    (the alignment stage) out = f'. in_dim None (the clip variant): the features already live in the LLM space and
    f' = f. stride (the sam variant): f is a feature map and f' = Conv(LayerNorm(f)), one token per stride x stride
    cell."""

    def __init__(self, in_dim, dim, stride=None):
        super().__init__()
        if in_dim is not None:
            self.layernorm_feature = nn.LayerNorm(in_dim)
        if stride is not None:  # MinimalSamProjector.conv_feature (its linear_feature is never used)
            self.conv_feature = nn.Conv2d(in_dim, dim, kernel_size=stride, stride=stride)  # PyTorch's init, as theirs
        elif in_dim is not None:
            self.linear_feature = nn.Linear(in_dim, dim)
        self.layernorm_condition = nn.LayerNorm(dim)
        self.linear_condition = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        if hasattr(self, "linear_feature"):
            nn.init.xavier_uniform_(self.linear_feature.weight)  # the authors' init (Projector.reset_parameters)
            nn.init.zeros_(self.linear_feature.bias)
        # near a no-op: |c| ~ 0.1, so the gate moves f' by about 1 %. An exact no-op (c = 0) would never learn: the
        # gate is quadratic in c, so its gradient vanishes there. (The authors' xavier init gives |c| ~ sqrt(C).)
        nn.init.normal_(self.linear_condition.weight, std=0.1 / self.linear_condition.in_features)
        nn.init.zeros_(self.linear_condition.bias)

    def forward(self, f, h=None, owner=None):
        """f (N*S, Cf) feature rows, or for sam (N, Cf, gh, gw) feature maps; h (K, C) control vectors; owner (N*S,)
        the control vector of each feature row, -1 for a row that has none (an image of a sample without a control
        token, as in the alignment stage)."""
        if hasattr(self, "conv_feature"):
            f = self.layernorm_feature(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N, Cf, gh, gw), per position
            f = self.conv_feature(f).flatten(2).transpose(1, 2).flatten(0, 1)  # (N*S, C), S cells row-major
        elif hasattr(self, "linear_feature"):
            f = self.linear_feature(self.layernorm_feature(f))  # (N*S, C)
        if h is None:
            return f
        c = self.linear_condition(self.layernorm_condition(h))  # (K, C)
        c = torch.cat([c, torch.zeros_like(c[:1])])[owner]  # (N*S, C): owner -1 picks the zero row, so out = f'
        return f + (f * c).sum(-1, keepdim=True) * c


# -----------------------------------------------------------------------------
# the VPT model


@dataclass
class VPTConfig:
    encoder: str = "dino"  # "dino": DINOv2 re-encodes the image; "sam": SAM's image encoder; "clip": Qwen's own ViT
    grid: int = 8  # k: region cells per side
    region_margin: int = 1  # cells added around a selected region before cropping (1 in the authors' harness)
    image_resolution: int = 512  # long side of every image fed to the model, NEAREST (the authors' _preprocess_image)
    dino: DinoConfig = field(default_factory=DinoConfig)
    sam: SamConfig = field(default_factory=SamConfig)

    def __post_init__(self):
        if isinstance(self.dino, dict):
            self.dino = DinoConfig(**self.dino)
        if isinstance(self.sam, dict):
            self.sam = SamConfig(**self.sam)
        assert self.encoder in PREFIX, f"encoder must be one of {list(PREFIX)}, not {self.encoder!r}"


class GradCache:
    """A KV cache that autograd can see through (training), for two passes: the first (the prefix) keeps each layer's
    keys and values, the second (the suffix) attends to them followed by its own, where KVCache writes into a
    preallocated buffer for decoding. Each layer gets its own LayerKV (layer(i)), so a compiled decoder layer sees
    the same kind of state at every depth and dynamo makes one graph for all layers of a pass."""

    def __init__(self):
        self.kept = {}

    def layer(self, i):
        if i not in self.kept:  # the first pass over layer i keeps what it computes
            self.kept[i] = LayerKV()
            return self.kept[i]
        return LayerKV(self.kept[i].k, self.kept[i].v)


class LayerKV:
    """One layer's keys and values in a GradCache. Empty, it keeps what update gives it; made from kept ones, it
    returns them followed by the new ones and changes nothing. Either way update can run again with the same result,
    as activation checkpointing does when it recomputes a layer in the backward pass."""

    def __init__(self, k=None, v=None):
        self.k, self.v, self.keep = k, v, k is None

    def update(self, k, v):
        if self.keep:
            self.k, self.v = k, v
            return k, v
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # (B, nkv, S, hs)


class Plan(NamedTuple):
    """Where each row of a batch splits for the one-pass training forward (VPT.plan)."""
    act: torch.Tensor  # (B,) index of the row's <|*_action|>, T for a row without one
    has_act: torch.Tensor  # (B,) bool: the row has a control token
    P: int  # the prefix window [0, P) that every row runs first
    split: torch.Tensor  # (B,) where the row's suffix starts
    span: torch.Tensor  # (B, T) bool: keys the row's suffix may not see (its mask-modeled first user turn)


class Prefix(NamedTuple):
    """The prefix piece of the one-pass forward, which the suffix continues (VPT.prefix)."""
    plan: Plan
    x: torch.Tensor  # (B, T, C) input embeddings, re-encoded features not yet conditioned
    f: torch.Tensor  # (N*S, Cf) re-encoded feature rows, None without re-encoded images
    owner: torch.Tensor  # (N*S,) control-vector index of each feature row, -1: none
    h: torch.Tensor  # (B, P, C) hidden states of the prefix window
    cache: GradCache  # its keys and values
    control: torch.Tensor  # (K, C) the hidden state at each <|*_action_start|>, in row order


class VPT(M.Qwen2VL):
    """Qwen2-VL + an extra encoder and its control projector. Parameter names are the authors': detection_model.*,
    detection_projector.* (DINOv2), seg_model.*, seg_projector.* (SAM) or clip_projector.* (clip)."""

    def __init__(self, cfg, vcfg, tokens):
        super().__init__(cfg)  # initialises the Qwen2-VL weights; the projector initialises its own
        self.vcfg, self.tokens = vcfg, tokens
        # set by train.py under FSDP: the suffix pass runs even when no row continues past the prefix (an empty
        # window), so every process calls each decoder layer twice and FSDP's per-layer collectives pair up
        self.always_suffix = False
        if vcfg.encoder == "dino":
            self.detection_model = Dinov2Model(vcfg.dino)
            self.detection_model.apply(M.init_weights)
            self.detection_projector = ControlProjector(vcfg.dino.hidden_size, cfg.hidden_size)
        elif vcfg.encoder == "sam":
            self.seg_model = SamVisionEncoder(vcfg.sam)
            self.seg_model.apply(M.init_weights)
            self.seg_projector = ControlProjector(vcfg.sam.output_channels, cfg.hidden_size, SAM_PROJECTOR_STRIDE)
        else:  # Qwen's own ViT re-encodes: its features already have the LLM's width
            self.clip_projector = ControlProjector(None, cfg.hidden_size)

    @property
    def projector(self):
        """The one projector, whichever its checkpoint name."""
        return getattr(self, f"{PREFIX[self.vcfg.encoder]}_projector")

    def hub_config(self):
        """config.json: the flat Qwen2-VL config, the fields the authors' VPT_Qwen2VLConfig writes, ours under "vpt"."""
        p, T = PREFIX[self.vcfg.encoder], self.tokens
        return {**super().hub_config(), "model_type": "qwen2_vl_vpt",
                "architectures": ["VPT_Qwen2VLForConditionalGeneration"], "vision_encoder_ls": [self.vcfg.encoder],
                f"{p}_image_token_id": T.pad, f"{p}_action_id": T.act, f"{p}_action_start_id": T.act_start,
                "vpt": asdict(self.vcfg)}

    def extra_features(self, extra):
        """The re-encoded images -> ((N*S, Cf) feature rows, (N,) rows per image). extra: DINOv2 pixels (N, 3, 224,
        224), SAM pixels (N, 3, 1024, 1024), whose features stay (N, Cf, gh, gw) maps for the projector's conv, or for
        clip a (pixel_values, image_grid_thw) pair run through Qwen's own ViT."""
        if self.vcfg.encoder == "dino":
            f = self.detection_model.patch_features(extra)  # (N, S, Cf)
            return f.flatten(0, 1), torch.full((f.size(0),), f.size(1), device=f.device)
        if self.vcfg.encoder == "sam":
            f = self.seg_model(extra)  # (N, Cf, gh, gw)
            S = (f.size(2) // SAM_PROJECTOR_STRIDE) * (f.size(3) // SAM_PROJECTOR_STRIDE)
            return f, torch.full((f.size(0),), S, device=f.device)
        pixel_values, grid = extra
        return self.visual(pixel_values, grid), M.image_token_counts(grid, self.cfg.vision.spatial_merge_size)

    def first_user_turn(self, input_ids):
        """(B, T) bool: the tokens strictly between the 2nd <|im_start|> and the 2nd <|im_end|>, i.e. the first user
        turn's role text, image and question (the span the authors' mask_para_detection zeroes)."""
        starts = (input_ids == self.tokens.im_start).cumsum(1)
        ends = (input_ids == self.tokens.im_end).cumsum(1)
        return (starts == 2) & (ends == 1) & (input_ids != self.tokens.im_start)

    def forward(self, batch, targets=None):
        """Training forward over a collated batch (data.collate) -> (logits, loss). One LLM pass in two pieces."""
        return self.head(self.suffix(batch, self.prefix(batch)), targets)

    def embed_batch(self, batch, plan):
        """Token embeddings with the images, and the re-encoded features unconditioned: right for samples without a
        control token; the others get theirs conditioned once the control vector exists. Returns (x, features,
        owner) with owner the control-vector index of each feature row (-1: none)."""
        ids = batch["input_ids"]
        x = self.embed(ids, batch.get("pixel_values"), batch.get("image_grid_thw"))  # (B, T, C)
        if batch.get("extra") is None:
            return x, None, None
        f, counts = self.extra_features(batch["extra"])
        slots = ids == self.tokens.pad
        if int(slots.sum()) != int(counts.sum()):
            raise ValueError(f"{int(slots.sum())} {PREFIX[self.vcfg.encoder]} pad slots but {int(counts.sum())} "
                             f"features")
        ctl = torch.full_like(plan.act, -1)  # (B,) control-vector index of each row
        ctl[plan.has_act] = torch.arange(int(plan.has_act.sum()), device=ids.device)
        owner = ctl[batch["extra_rows"]].repeat_interleave(counts)  # (N*S,)
        return x.masked_scatter(slots[..., None], self.projector(f).to(x.dtype)), f, owner

    def condition(self, x, batch, control, f, owner):
        """The control vector becomes the <|*_action|> input embedding and conditions the re-encoded features that
        fill the <|*_image_pad|> slots (the second inner pass of the authors' forward)."""
        x = x.clone()
        rows = (batch["input_ids"] == self.tokens.act).nonzero()  # (K, 2): one control token per row, in row order
        x[rows[:, 0], rows[:, 1]] = control.to(x.dtype)
        if f is not None:
            slots = batch["input_ids"] == self.tokens.pad
            x = x.masked_scatter(slots[..., None], self.projector(f, control, owner).to(x.dtype))
        return x

    def plan(self, batch):
        """Where each row splits: the control vector is the final hidden state at <|*_action_start|>, one position
        before <|*_action|> (where the authors' forward takes it), which depends only on the tokens up to it. So the
        prefix [0, act) runs once, and the suffix from `split` on continues from its keys and values, with the
        control vector as the <|*_action|> embedding. Mask-modeled rows start their suffix at the end of the first
        user turn instead, recomputing the few header tokens in between without sight of that turn."""
        ids = batch["input_ids"]
        B, T = ids.shape
        is_act = ids == self.tokens.act
        if int(is_act.sum(1).max()) > 1:
            raise ValueError("a sample has more than one control token; the projector pairs one per image")
        has_act = is_act.any(1)
        act = torch.where(has_act, is_act.float().argmax(1), T)  # (B,)
        P = int(act[has_act].max()) if has_act.any() else T
        # VPT §3.2 mask modeling, as the paper describes it: an attention mask, drawn per sample. (The authors'
        # forward zeroes the span's input embeddings instead, with one coin flip for a whole micro-batch.)
        masked = batch.get("mask_modeling", torch.zeros_like(has_act)) & has_act
        span = self.first_user_turn(ids) & masked[:, None]  # (B, T) keys the suffix may not see
        turn_end = torch.where(span.any(1), T - span.flip(1).float().argmax(1), act)  # first index after the span
        # a row's suffix starts at its control token, a mask-modeled row's at the end of its first user turn, and a
        # row without a control token continues from P
        split = torch.where(has_act, act, P)  # (B,)
        split = torch.where(masked, turn_end, split)
        return Plan(act, has_act, P, split, span)

    def prefix(self, batch):
        """The first piece of the one pass: every row's tokens [0, P), which give the control vectors."""
        pad, pos = batch["padding_mask"], batch["position_ids"]
        plan = self.plan(batch)
        P = plan.P
        x, f, owner = self.embed_batch(batch, plan)
        cache = GradCache()
        # the prefix is the same window [0, P) for every row: a row's keys past its own split are hidden from its
        # suffix, and rows without a control token continue from P
        # contiguous: a compiled layer then gets the strides every later layer's input has (one graph for all)
        h = self.model(x[:, :P].contiguous(), pos[:, :, :P], M.causal_mask(pad[:, :P], P), cache)  # (B, P, C)
        rows = plan.has_act.nonzero().squeeze(1)
        control = h[rows, plan.act[rows] - 1]  # (K, C): the hidden state at <|*_action_start|>
        return Prefix(plan, x, f, owner, h, cache, control)

    def suffix(self, batch, pre):
        """Runs tokens [split, T) of each row on top of the prefix cache and returns all (B, T, C) hidden states."""
        pad, pos = batch["padding_mask"], batch["position_ids"]
        B, T, C = pre.x.shape
        P, split = pre.plan.P, pre.plan.split
        if int(split.min()) >= T and not self.always_suffix:  # no row continues past the prefix (no control token)
            return pre.h
        x = self.condition(pre.x, batch, pre.control, pre.f, pre.owner)
        # gather each row's suffix into a (B, Q) window
        Q = int((T - split).max())
        j = torch.arange(Q, device=x.device)[None]  # (1, Q)
        src = (split[:, None] + j).clamp(max=T - 1)  # (B, Q) source index of each suffix slot
        valid = (split[:, None] + j < T) & pad.gather(1, src).bool()  # (B, Q)
        xs = x.gather(1, src[..., None].expand(B, Q, C))  # (B, Q, C)
        ps = pos.gather(2, src[None].expand(3, B, Q))  # (3, B, Q)
        # keys: the prefix window (P) then the suffix window (Q). A suffix query sees prefix keys before its row's
        # split, except the first user turn of a mask-modeled row, and suffix keys causally
        kp = torch.arange(P, device=x.device)[None]  # (1, P)
        see_prefix = (kp < split[:, None]) & pad[:, :P].bool() & ~pre.plan.span[:, :P]  # (B, P)
        causal = j.T >= j  # (Q, Q) query >= key
        see_suffix = causal[None] & valid[:, None, :]  # (B, Q, Q)
        mask = torch.cat([see_prefix[:, None].expand(B, Q, P), see_suffix], dim=2)  # (B, Q, P+Q)
        mask = mask | (torch.arange(P + Q, device=x.device)[None] == P + j.T)[None]  # a query always sees itself
        h_suffix = self.model(xs, ps, mask[:, None], pre.cache)  # (B, Q, C)
        # back to the (B, T) layout: position t comes from the prefix if t < split, else from suffix slot t - split
        t = torch.arange(T, device=x.device)[None]  # (1, T)
        from_prefix = t.clamp(max=P - 1)  # (1, T)
        from_suffix = P + (t - split[:, None]).clamp(min=0, max=Q - 1)  # (B, T)
        idx = torch.where(t < split[:, None], from_prefix, from_suffix)  # (B, T) rows of the concatenation below
        both = torch.cat([pre.h, h_suffix], dim=1)  # (B, P+Q, C)
        return both.gather(1, idx[..., None].expand(B, T, C))

    def forward_two_pass(self, batch, targets=None):
        """The slow path the one-pass forward must equal: pass 1 over the whole sequence gives the control vector,
        pass 2 over the whole sequence uses it (the authors' num_inner_forward_run=2), with mask modeling as a full
        (B, 1, T, T) attention mask."""
        ids, pad, pos = batch["input_ids"], batch["padding_mask"], batch["position_ids"]
        T = ids.size(1)
        plan = self.plan(batch)
        x, f, owner = self.embed_batch(batch, plan)
        h1 = self.model(x, pos, M.causal_mask(pad, T))
        rows = plan.has_act.nonzero().squeeze(1)
        x = self.condition(x, batch, h1[rows, plan.act[rows] - 1], f, owner)
        mask = M.causal_mask(pad, T)  # (B, 1, T, T)
        after = torch.arange(T, device=ids.device)[None] >= plan.split[:, None]  # (B, T) queries past the split
        barred = after[:, :, None] & plan.span[:, None, :]  # (B, T, T)
        return self.head(self.model(x, pos, mask & ~barred[:, None]), targets)


# -----------------------------------------------------------------------------
# the inference engine: a batch of questions, each with its own perception rounds, on one KV cache (the authors'
# evaluation/evaluation.py instead prompts the model a second time from scratch with the round appended)

MODES = ("off", "free", "region", "reencode")


@dataclass
class Request:
    """One question for Engine.answer. image: a path or PIL image; None asks a text-only question, answered
    without perception rounds (there is nothing to look at). prompt: the question; a prompt with "<image>" in it is
    used verbatim (the authors' own prompts, token for token), otherwise the image goes before it and the mode's
    trigger after it. mode: this request's perception mode (MODES); None takes the engine's."""
    image: object = None
    prompt: str = ""
    system: str = None
    mode: str = None


@dataclass
class Round:
    """One perception step of an answer: a region group (a round may hold several) or a re-encoding."""
    kind: str  # "region" or "reencode"
    cells: tuple = None  # (xs, ys) grid cells of a region
    box: tuple = None  # its crop box in original-image pixels


@dataclass
class Result:
    """One answered request."""
    text: str  # the answer alone: no perception tokens, no "Now answer the question." line, stripped
    ids: list  # every sampled token id, perception tokens and the final stop id included
    rounds: list  # Round per region group and per re-encoding, in order
    transcript: list  # every id the model was fed: prompt, sampled tokens, appended turns (a fresh prefill's input)
    prompt_len: int
    logits: torch.Tensor  # (V,) the logits the last token was sampled from
    original: object  # the full-resolution PIL image crops are cut from; None for a text-only question
    timings: dict  # of the whole batch: prefill_s (the first forward), decode_s (the rest), steps (forwards)


@dataclass
class Chunk:
    """What the next forward feeds one row: a sampled token, or an appended turn with its images (pixel_values,
    image_grid_thw) and embeddings that replace some of its slots ({index or index tensor: (n, C)}: the control
    vector, the re-encoded features)."""
    ids: list
    pixel_values: torch.Tensor = None
    grid: torch.Tensor = None
    overrides: dict = field(default_factory=dict)


@dataclass
class Row:
    """One request's state while its batch runs."""
    mode: str
    original: object  # the full-resolution image, None for text only
    view: object  # the original limited to image_resolution: the global view, and what DINOv2 and clip re-encode
    view_inputs: tuple  # the view's (pixel_values, image_grid_thw)
    pending: Chunk  # what the next forward feeds; None once the row is done
    transcript: list = field(default_factory=list)
    sampled: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    # "text"; "region" inside a group; "between" after a group when another may follow (max_regions); "act" when
    # <|*_action_start|> has just been fed, so the last hidden state is the control vector
    state: str = "text"
    group: list = field(default_factory=list)  # the open group's cell ids
    groups: list = field(default_factory=list)  # the round's closed groups, (xs, ys) each
    turns: int = 0  # perception turns appended
    next_pos: int = 0  # M-RoPE position of the next text token
    prompt_len: int = 0
    logits: torch.Tensor = None  # (V,) after the last forward
    hidden: torch.Tensor = None  # (C,) the last fed token's final hidden state


class Engine:
    """Answers a batch of (image, question) requests at once, each with its own perception rounds, on one KV cache.
    Per row, a state machine in the manner of nanochat's engine: in state "text" a row samples freely (minus what
    its mode forbids); a sampled <|region_token_start|> enters state "region", which constrains the next four
    tokens to x, y, x >= x0, y >= y0 and then <|region_token_end|>, so no invalid box can come out; closing a group
    appends its crop as a new user turn (with max_regions > 1 the model may open further groups first, and the
    turn holds every crop as "Region i: <image>" lines, as the authors' harness builds it). A sampled
    <|*_action_start|> is fed to get its hidden state h, then h is fed as <|*_action|> and the re-encoded turn
    follows.
    One step is one forward over every row (gpt-fast's names): decode_one_token when each row feeds one token,
    static shapes (B, 1) that torch.compile can capture; prefill when some row appends a turn, every row's chunk
    right-padded to the longest. Appending a turn in the same step as the other rows' tokens keeps the rows in
    lockstep with one forward per step (a batch asked the same kind of question opens its rounds on the same step);
    the padding a decoding row gets costs compute, not memory traffic, which decode is bound by. Rows finish
    independently; nothing already cached is computed again. One question is the same code with B = 1."""

    def __init__(self, model, tok, img_cfg, mode="free", max_rounds=1, max_new_tokens=256, temperature=0.0,
                 top_k=None, top_p=None, generator=None, max_regions=1, compile=False):
        if mode not in MODES:
            raise M.UserError(f"--vpt {mode}: must be one of {MODES}")
        self.model, self.tok, self.img_cfg, self.mode = model, tok, img_cfg, mode
        self.max_rounds, self.max_new_tokens, self.max_regions = max_rounds, max_new_tokens, max_regions
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.T, self.stop = model.tokens, tok.stop_ids
        self.dev, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.rule_index, self.rules = self.rule_masks()
        self.compiled, self.caches = compile, {}
        self.decode_step = self.decode_one_token
        if compile and self.dev.type == "cuda":
            # coordinate descent tuning makes inductor write each one-row matmul as its own reduction kernel, fused
            # with its neighbours (gpt-fast's setting; an H200 step of 2B: 2.48 ms against 2.67 with cuBLAS's)
            self.decode_step = CUDAGraphStep(torch.compile(self.decode_one_token, fullgraph=True,
                                                           options={"coordinate_descent_tuning": True}))
        elif compile:
            self.decode_step = torch.compile(self.decode_one_token, fullgraph=True)

    # --- constraints: one additive (V,) mask per rule, picked per row each step

    def rule_masks(self):
        """{rule: index}, (R, V) masks of 0 (allowed) and -inf. The rules: free text with or without each round's
        start token, a forced start, the five places of a region group, and the choice after a group."""
        T, k = self.T, len(self.T.xs)
        perception = T.perception()
        starts = lambda r, a: {t for t, ok in ((T.region_start, r), (T.act_start, a)) if ok}  # what may start a round
        allowed = {("text", r, a): set(range(self.model.cfg.vocab_size)) - (perception - starts(r, a))
                   for r in (False, True) for a in (False, True)}
        allowed.update({"force_region": {T.region_start}, "force_act": {T.act_start}, "x": set(T.xs),
                        "y": set(T.ys), "end": {T.region_end}, "between": {T.region_start, T.im_end}})
        allowed.update({("x_ge", i): set(T.xs[i:]) for i in range(k)})
        allowed.update({("y_ge", i): set(T.ys[i:]) for i in range(k)})
        masks = torch.full((len(allowed), self.model.cfg.vocab_size), float("-inf"), device=self.dev)
        for i, ids in enumerate(allowed.values()):
            masks[i, sorted(ids)] = 0.0
        return {name: i for i, name in enumerate(allowed)}, masks

    def rule(self, row):
        """The rule that constrains the row's next token."""
        T, g = self.T, row.group
        if row.state == "region":  # the group so far decides: x0, y0, then x1 >= x0, y1 >= y0, then the end
            if len(g) == 0:
                return "x"
            if len(g) == 1:
                return "y"
            if len(g) == 2:
                return "x_ge", T.xs.index(g[0])
            if len(g) == 3:
                return "y_ge", T.ys.index(g[1])
            return "end"
        if row.state == "between":
            return "between"
        can = row.mode != "off" and row.original is not None and row.turns < self.max_rounds
        if can and row.mode in ("region", "reencode") and not row.sampled:  # a forced mode starts with its round
            return "force_region" if row.mode == "region" else "force_act"
        return ("text", can and row.mode in ("free", "region"), can and row.mode in ("free", "reencode"))

    # --- requests in, results out

    def prompt(self, question, mode, image=True):
        if not image or data.IMAGE_PLACEHOLDER in question:
            return question
        trigger = {"region": REGION_TRIGGER, "reencode": REENCODE_TRIGGER}.get(mode)
        return f"{data.IMAGE_PLACEHOLDER}\n{question}" + (f"\n{trigger}" if trigger else "")

    def start(self, req):
        """A request -> its Row, whose pending chunk is the whole prompt."""
        mode = req.mode or self.mode
        if mode not in MODES:
            raise M.UserError(f"request mode {mode!r}: must be one of {MODES}")
        vc = self.model.vcfg
        original = view = pv = grid = None
        if req.image is not None:
            original = data.load_image(req.image)  # crops come from the full-resolution original (authors' harness)
            view = data.limit_side(original, vc.image_resolution)
            pv, grid = data.process_images([view], self.img_cfg)
        messages = [{"role": "system", "content": req.system}] if req.system is not None else []
        messages.append({"role": "user", "content": self.prompt(req.prompt, mode, req.image is not None)})
        ids, _ = data.encode_chat(self.tok, messages, grid, True, self.img_cfg.merge_size)
        to_dev = lambda t: t.to(self.dev) if t is not None else None
        return Row(mode, original, view, (to_dev(pv), to_dev(grid)), Chunk(ids, to_dev(pv), to_dev(grid)),
                   prompt_len=len(ids))

    def budget(self, rows):
        """KV slots per row: the longest prompt, the answer, and each round's turn, with one turn's worth spare for
        the right padding of a chunk. A turn is the clip view (the view's tokens), DINOv2's or SAM's 256 tokens or
        the crops, whose long side is at most image_resolution (one token per 28 px, plus a row and column of
        rounding), and the turn's text."""
        unit = self.img_cfg.patch_size * self.img_cfg.merge_size
        n_crop = (self.model.vcfg.image_resolution // unit + 1) ** 2
        n_view = max([int(M.image_token_counts(r.view_inputs[1], self.img_cfg.merge_size).sum())
                      for r in rows if r.view_inputs[1] is not None] or [0])
        turn = max(n_view, n_crop * self.max_regions, data.DINO_TOKENS, data.SAM_TOKENS) + 32 * self.max_regions
        n = max(len(r.pending.ids) for r in rows) + self.max_new_tokens + (self.max_rounds + 1) * turn
        # a compiled step has one shape per cache length: powers of two keep the count of recompilations small
        return 1 << (n - 1).bit_length() if self.compiled else n

    def empty_cache(self, B, S):
        """An empty KV cache of B rows of S slots. A compiled engine keeps one per shape and empties it for the next
        batch: its CUDA graph is recorded at the cache's addresses, and a new cache would make it record again
        (gpt-fast allocates its caches once too, in setup_caches)."""
        if not self.compiled:
            return M.KVCache(self.model.cfg, B, S, self.dev, self.dtype)
        if (B, S) not in self.caches:
            self.caches[B, S] = M.KVCache(self.model.cfg, B, S, self.dev, self.dtype, static=True)
        cache = self.caches[B, S]
        cache.reset()
        return cache

    @torch.no_grad()
    def answer(self, requests, on_token=None):
        """Requests -> one Result each, in order. on_token(i, token_id) is called for every token request i samples,
        as it comes (sample.py streams with it). Raises UserError for a bad mode and what data.load_image raises."""
        rows = [self.start(r) for r in requests]
        cache = self.empty_cache(len(rows), self.budget(rows))
        t0 = time.perf_counter()
        self.step(rows, cache)
        t1, steps = time.perf_counter(), 1
        while any(r.pending is not None for r in rows):
            self.advance_rows(rows, on_token)
            if any(r.pending is not None for r in rows):
                self.step(rows, cache)
                steps += 1
        timings = dict(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, steps=steps)
        return [self.result(r, timings) for r in rows]

    def advance_rows(self, rows, on_token):
        """Samples each running row's next token under its rule and sets what the row feeds next."""
        live = [i for i, r in enumerate(rows) if r.pending is not None]
        for i in live:
            rows[i].pending = None
        picks = [i for i in live if rows[i].state != "act"]
        for i in live:
            if rows[i].state == "act":  # no token to sample: the control vector is fed with the re-encoded turn
                rows[i].pending = self.reencode_turn(rows[i])
        if not picks:
            return
        logits = torch.stack([rows[i].logits for i in picks])  # (n, V)
        rules = torch.tensor([self.rule_index[self.rule(rows[i])] for i in picks], device=self.dev)
        tokens = M.sample_next(logits + self.rules[rules], **self.sampling).tolist()
        for i, t in zip(picks, tokens):
            r = rows[i]
            r.sampled.append(t)
            if on_token:
                on_token(i, t)
            chunk = self.take(r, t)
            if chunk is not None and len(r.sampled) < self.max_new_tokens:
                r.pending = chunk

    def take(self, r, t):
        """Row r sampled t: its next chunk (None: the answer is complete)."""
        T = self.T
        if r.state == "region":
            if t != T.region_end:
                r.group.append(t)
                return Chunk([t])
            r.groups.append(([T.xs.index(c) for c in r.group[0::2]], [T.ys.index(c) for c in r.group[1::2]]))
            if len(r.groups) < self.max_regions:  # the model may open another group, or close the turn
                r.state = "between"
                return Chunk([t])
            return self.region_turn(r, [t])
        if r.state == "between":
            if t == T.region_start:
                r.state, r.group = "region", []
                return Chunk([t])
            return self.region_turn(r, [])  # t is <|im_end|>, the first token of the appended turn
        if t in self.stop:
            return None
        if t == T.region_start:
            r.state, r.group = "region", []
        elif t == T.act_start:
            r.state = "act"
        return Chunk([t])

    def region_turn(self, r, head):
        """The round's crops (each group's cells widened by region_margin, cut from the original) as a new user
        turn after `head`, the ids that close the reply's region tokens."""
        vc = self.model.vcfg
        W, H = r.original.size
        crops = []
        for xs, ys in r.groups:
            box = cells_to_box(xs, ys, W, H, vc.grid, vc.region_margin)
            crops.append(data.limit_side(r.original.crop(box), vc.image_resolution))
            r.rounds.append(Round("region", (xs, ys), box))
        pv, grid = data.process_images(crops, self.img_cfg)
        n = M.image_token_counts(grid, self.img_cfg.merge_size).tolist()
        # one crop is just "<image>", several are "Region i: <image>" lines (generate_region_item in
        # evaluation/evaluation.py)
        content = data.IMAGE_PLACEHOLDER if len(crops) == 1 else "".join(
            f"Region {i}: {data.IMAGE_PLACEHOLDER}\n" for i in range(len(crops)))
        r.groups, r.state, r.turns = [], "text", r.turns + 1
        return Chunk(head + data.next_turn(self.tok, content, n), pv.to(self.dev), grid.to(self.dev))

    def reencode_turn(self, r):
        """<|*_action_start|> has been fed: its final hidden state h is the control vector, fed as <|*_action|>,
        and it conditions the projector over the re-encoded image, whose features fill the new user turn (as in the
        authors' forward, which sees that turn only when their harness prompts again)."""
        m, T = self.model, self.T
        h = r.hidden  # (C,)
        if m.vcfg.encoder == "dino":
            extra = data.process_dino_image(r.view, m.vcfg.image_resolution)[None].to(self.dev)  # (1, 3, 224, 224)
        elif m.vcfg.encoder == "sam":  # SAM's view is the original limited to 1024, not the 512 px one
            extra = data.process_sam_image(r.original)[None].to(self.dev)  # (1, 3, 1024, 1024)
        else:
            extra = r.view_inputs  # (pixel_values, image_grid_thw) of the view
        f, counts = m.extra_features(extra)
        owner = torch.zeros(int(counts[0]), dtype=torch.long, device=self.dev)  # one image, one control vector
        feats = m.projector(f, h[None], owner)  # (S, C)
        ph = data.EXTRA_PLACEHOLDERS[m.vcfg.encoder][0]
        turn = data.next_turn(self.tok, ph, extra={ph: (self.tok.tk.id_to_token(T.pad), [int(counts[0])])})
        ids = [T.act, T.act_end] + turn
        slots = torch.tensor([i for i, t in enumerate(ids) if t == T.pad])
        r.state, r.turns = "text", r.turns + 1
        r.rounds.append(Round("reencode"))
        return Chunk(ids, overrides={0: h, slots: feats})

    def result(self, r, timings):
        hidden = self.T.perception() | set(self.stop)
        text = data.answer_text(self.tok, [t for t in r.sampled if t not in hidden])
        return Result(text, r.sampled, r.rounds, r.transcript, r.prompt_len, r.logits, r.original, timings)

    # --- the two kinds of step

    def step(self, rows, cache):
        """Feeds every row's pending chunk: one decode_one_token when each is a single token; one prefill of all
        chunks right-padded to the longest when the padding at most doubles the work (a batch's prompts, or rounds
        opened on the same step); else each long chunk alone on its row of the cache (a re-encoded turn of 270
        tokens beside one-token chunks), then the single tokens as a decode step."""
        n = [len(r.pending.ids) if r.pending else 0 for r in rows]
        long = [b for b, k in enumerate(n) if k > 1 or (k and rows[b].pending.overrides)]
        if not long:
            return self.decode(rows, cache, [k > 0 for k in n])
        if max(n) * sum(k > 0 for k in n) <= 2 * sum(n):
            return self.prefill(rows, cache)
        for b in long:
            self.prefill([rows[b]], cache.row(b))
        if any(k == 1 and b not in long for b, k in enumerate(n)):
            self.decode(rows, cache, [k == 1 and b not in long for b, k in enumerate(n)])

    def prefill(self, rows, cache):
        """One forward over each row's pending chunk (rows without one feed padding), right-padded to the longest:
        T (B, T) ids at M-RoPE positions that continue each row's transcript, with their images and overrides."""
        m, B = self.model, len(rows)
        chunks = [r.pending or Chunk([]) for r in rows]
        T = max(len(c.ids) for c in chunks)
        ids = torch.zeros(B, T, dtype=torch.long)  # 0 is a plain token: padding is never seen, so any id does
        pos = torch.zeros(3, B, T, dtype=torch.long)
        for b, (r, c) in enumerate(zip(rows, chunks)):
            if c.ids:
                ids[b, :len(c.ids)] = torch.tensor(c.ids)
                p, _ = M.get_rope_index(ids[b:b + 1, :len(c.ids)], c.grid, None, m.cfg.image_token_id,
                                        m.cfg.vision.spatial_merge_size)  # (3, 1, n)
                pos[:, b, :len(c.ids)] = p[:, 0] + r.next_pos
                r.next_pos = int(p.max()) + 1 + r.next_pos
        images = [c for c in chunks if c.pixel_values is not None]
        pv = torch.cat([c.pixel_values for c in images]) if images else None
        grid = torch.cat([c.grid for c in images]) if images else None
        x = m.embed(ids.to(self.dev), pv, grid)  # (B, T, C): the images fill their slots in row order
        for b, c in enumerate(chunks):
            for where, vecs in c.overrides.items():
                x[b, where] = vecs.to(x.dtype)
        lens = torch.tensor([len(c.ids) for c in chunks])
        h = m.model(x, pos.to(self.dev), self.mask(cache, T, bool((lens < T).any())), cache)  # (B, T, C)
        last = h[torch.arange(B), (lens - 1).clamp(min=0).to(self.dev)]  # (B, C) each row's last real token
        self.finish_step(rows, chunks, cache, last, m.lm_head(last))

    def decode(self, rows, cache, fed):
        """One token for each row b with fed[b]: positions are each row's next text position, no M-RoPE index to
        build. The other rows (finished, or fed alone this step) feed a token past their length that nobody reads."""
        chunks = [r.pending if ok else Chunk([]) for r, ok in zip(rows, fed)]
        ids = torch.tensor([c.ids or [0] for c in chunks], device=self.dev)  # (B, 1)
        pos = torch.tensor([r.next_pos for r in rows], device=self.dev)[None, :, None].expand(3, -1, -1)  # (3, B, 1)
        for r, ok in zip(rows, fed):
            r.next_pos += ok
        logits, last = self.decode_step(ids, pos, cache)
        self.finish_step(rows, chunks, cache, last, logits)

    def decode_one_token(self, ids, pos, cache):
        """(B, 1) ids at positions (3, B, 1) -> ((B, V) logits, (B, C) final hidden states). Everything it reads
        besides ids and pos lives in the model and the cache, so a CUDA graph can replay it."""
        m = self.model
        h = m.model(m.model.embed_tokens(ids), pos, self.mask(cache, 1, False), cache)[:, -1]  # (B, C)
        return m.lm_head(h), h

    def mask(self, cache, T, padded=True):
        """(B, 1, T, S) bool: the query at slot lengths[b] + i of row b sees that row's slots up to itself. None
        (plain causal, which SDPA runs without a mask tensor) when every row is as long and no chunk is padded."""
        if not cache.static and not padded and cache.uniform:
            return None
        S = cache.max_len if cache.static else cache.pos + T
        q = cache.lens[:, None] + torch.arange(T, device=self.dev)  # (B, T)
        return (torch.arange(S, device=self.dev)[None, None, :] <= q[:, :, None])[:, None]

    def finish_step(self, rows, chunks, cache, last, logits):
        cache.advance([len(c.ids) for c in chunks])
        for b, (r, c) in enumerate(zip(rows, chunks)):
            if c.ids:
                r.transcript += c.ids
                r.hidden, r.logits = last[b], logits[b]


class CUDAGraphStep:
    """A compiled decode step replayed as a CUDA graph, one per cache (whose rows fix the batch): ids and pos are
    copied into the graph's own input tensors; the cache's tensors keep their addresses (KVCache), so the graph writes
    the new keys in place and reads the lengths as they are at replay. One replay is one launch from the host, where
    torch.compile's mode="reduce-overhead" spent ~0.4 ms more a step on guards and its graph tree's bookkeeping (2B
    on an H200: 3.31 ms a step with its token read back, against 2.88), and the engine waits for every token. The manual
    capture follows torch.cuda.graphs' documentation (warm-up on a side stream, then capture), as vLLM and SGLang
    capture their decode steps."""

    def __init__(self, step):
        self.step, self.graphs = step, {}

    def __call__(self, ids, pos, cache):
        """(B, 1) ids, (3, B, 1) positions -> copies of the step's ((B, V) logits, (B, C) hidden states)."""
        with torch.cuda.device(ids.device):  # streams, capture and replay on the model's GPU, not the current one
            if cache not in self.graphs:  # by identity; the entry keeps the cache alive, whose tensors the graph writes
                self.graphs[cache] = self.capture(ids, pos, cache)
            graph, (ids_in, pos_in), outputs = self.graphs[cache]
            ids_in.copy_(ids)
            pos_in.copy_(pos)
            graph.replay()
            return tuple(t.clone() for t in outputs)  # the next replay rewrites the graph's outputs in place

    def capture(self, ids, pos, cache):
        inputs = ids.clone(), pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles, and lets cuBLAS and the allocator settle before the capture; it
            for _ in range(2):  # writes the keys the replay below writes again
                self.step(*inputs, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.step(*inputs, cache)
        return graph, inputs, outputs


def answer(model, tok, img_cfg, image, question, **kw):
    """One question about one image (a path or PIL image) -> a Result: .text the answer, .rounds what the model
    looked at. Lists of images and questions give a list of Results, answered as one batch. **kw: Engine's options
    (mode, max_rounds, max_new_tokens, temperature, ...)."""
    if isinstance(question, str):
        return Engine(model, tok, img_cfg, **kw).answer([Request(image, question)])[0]
    return Engine(model, tok, img_cfg, **kw).answer([Request(i, q) for i, q in zip(image, question)])


# -----------------------------------------------------------------------------
# checkpoints: the authors' layout in (pytorch_model*.bin and a flat config.json, as in their released
# rp-yu/Qwen2-VL-2b-VPT-* models), ours out (safetensors + config.json + tokenizer.json), under the same parameter names

WEIGHT_PATTERNS = M.HUB_PATTERNS + ["*.bin", "*.bin.index.json"]


def save(model, tok, img_cfg, path):
    """A checkpoint that from_pretrained and sample.py load: model.safetensors, config.json, tokenizer.json (with
    the perception tokens), preprocessor_config.json. Each file is written under a temporary name and renamed."""
    M.save_pretrained(model, path, model.hub_config())
    tok.save(path)
    img_cfg.save(path)


def from_pretrained(path_or_id, dtype=torch.float32, device="cpu"):
    """A VPT checkpoint (the authors' released ones or ours) -> (model, tokenizer, image config)."""
    path, d = M.open_checkpoint(path_or_id, WEIGHT_PATTERNS)
    if d.get("model_type") != "qwen2_vl_vpt":
        raise ValueError(f"{path}/config.json: model_type {d.get('model_type')!r} is not a VPT checkpoint "
                         f"(qwen2_vl_vpt); start one from a base model with vpt.from_base")
    cfg = M.QwenConfig.from_hf(d)
    sd = M.read_weights(path, allow_bin=True)
    if "vpt" in d:
        vcfg = VPTConfig(**d["vpt"])
    else:  # the authors' config.json holds no DINOv2 or SAM config (their __init__ fetches it): read it off the
        # tensors
        encoders = [e for e in d.get("vision_encoder_ls", []) if e in PREFIX]
        if len(encoders) != 1:
            raise ValueError(f"{path}/config.json: vision_encoder_ls {d.get('vision_encoder_ls')} must name one of "
                             f"{list(PREFIX)}")
        dino = DinoConfig.from_state_dict(sd, "detection_model.") if encoders[0] == "dino" else DinoConfig()
        sam = SamConfig.from_state_dict(sd, "seg_model.") if encoders[0] == "sam" else SamConfig()
        vcfg = VPTConfig(encoder=encoders[0], dino=dino, sam=sam)
    tok = data.Tokenizer(path)
    tokens = Tokens.of(tok, vcfg.encoder, vcfg.grid)
    p = PREFIX[vcfg.encoder]
    for key, got in ((f"{p}_image_token_id", tokens.pad), (f"{p}_action_id", tokens.act),
                     (f"{p}_action_start_id", tokens.act_start)):
        if d.get(key) is not None and d[key] != got:
            raise ValueError(f"{path}: config.json {key}={d[key]} but tokenizer.json gives {got}")
    # built by the authors' MinimalCLIPProjector and MinimalSamProjector, never used by their forward
    unused = {"clip": ("clip_projector.layernorm_feature.", "clip_projector.linear_feature."),
              "sam": ("seg_projector.linear_feature.",)}.get(vcfg.encoder, ())
    for k in [k for k in sd if unused and k.startswith(unused)]:
        del sd[k]
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        # the authors load with strict=False into a tied model (LLaMA-Factory's load_model_from_state_dicts):
        # lm_head.weight is copied last into the one shared matrix, so it is what their model runs with
        sd["model.embed_tokens.weight"] = sd.pop("lm_head.weight")
    model = M.build_loaded(lambda: VPT(cfg, vcfg, tokens), sd, dtype, device)
    return model, tok, data.ImageConfig.from_dir(path)


def from_base(base, encoder="dino", dino="facebook/dinov2-large", grid=8, dtype=torch.float32, device="cpu",
              sam="facebook/sam-vit-large"):
    """A new VPT model from a base Qwen2-VL (Hub id or directory) and, for the dino variant, a facebook/dinov2-*
    checkpoint, for the sam variant a facebook/sam-vit-* one (its image encoder): the perception tokens are added to
    the tokenizer, and the projector starts fresh."""
    path, d = M.open_checkpoint(base)
    cfg = M.QwenConfig.from_hf(d)
    sd = M.read_weights(path)
    tok = data.Tokenizer(path)
    tokens = add_tokens(tok, encoder, grid)
    if len(tok) > cfg.vocab_size:  # only tiny vocabularies: Qwen2-VL has spare rows for all 22 tokens
        grow = len(tok) - cfg.vocab_size
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in sd:  # new rows start at the mean embedding
                mean = sd[k].float().mean(0, keepdim=True).to(sd[k].dtype)  # (1, C)
                sd[k] = torch.cat([sd[k], mean.expand(grow, -1)])
        cfg = M.QwenConfig(**{**cfg.__dict__, "vocab_size": len(tok)})
    vcfg = VPTConfig(encoder=encoder, grid=grid)
    if encoder == "dino":
        dpath, dcfg = M.open_checkpoint(dino)
        vcfg.dino = DinoConfig.from_hf(dcfg)
        sd.update({"detection_model." + k: v for k, v in M.read_weights(dpath).items()})
        fresh = ControlProjector(vcfg.dino.hidden_size, cfg.hidden_size)
    elif encoder == "sam":
        spath, scfg = M.open_checkpoint(sam)
        vcfg.sam = SamConfig.from_hf(scfg)
        sd.update({"seg_model." + k: v for k, v in sam_vision_weights(M.read_weights(spath)).items()})
        fresh = ControlProjector(vcfg.sam.output_channels, cfg.hidden_size, SAM_PROJECTOR_STRIDE)
    else:
        fresh = ControlProjector(None, cfg.hidden_size)
    sd.update({f"{PREFIX[encoder]}_projector.{k}": v for k, v in fresh.state_dict().items()})
    model = M.build_loaded(lambda: VPT(cfg, vcfg, tokens), sd, dtype, device)
    return model, tok, data.ImageConfig.from_dir(path)

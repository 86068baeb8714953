"""
Everything between raw inputs and model-ready batches: loading images, the Qwen2-VL image preprocessing (smart
resize, normalise, patchify into pixel_values + image_grid_thw), the DINOv2 and SAM ones, a thin wrapper over the
byte-level BPE tokenizer.json, the Qwen2-VL chat template with assistant-only labels, the VPT record files, the
dataset that turns records into samples, and collation into batches. Preprocessing and the template mirror
transformers 5.23 (Qwen2VLImageProcessorPil, BitImageProcessorPil, SamImageProcessorPil, the Hub chat_template) bit
for bit, and the tests hold them to that; where the VPT authors' LLaMA-Factory fork does more (the long-side limit,
crops, labels) the function says which of theirs it mirrors. transformers itself is never imported here. The
synthetic set is synth.py.
Shape letters: H, W pixels; C colour channels (3); T temporal patch (2 copies of a still image); p patch size (14);
m merge size (2); gh, gw patch grid (H/p, W/p); Np patches in an image (gh*gw). In collate: B batch, T tokens.
"""
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from model import IGNORE_INDEX, UserError, atomic_write, get_rope_index, image_token_counts, read_json, save_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# images


@dataclass
class ImageConfig:
    # defaults are the Hub preprocessor_config.json of Qwen2-VL-2B/7B-Instruct, not the transformers class defaults
    min_pixels: int = 3136  # 56*56
    max_pixels: int = 12845056  # 28*28*16384 (the class default is 28*28*1280)
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    # keys whose value is hard-coded in process_image: a file asking for anything else is refused
    _FIXED = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "do_convert_rgb": True, "resample": 3}  # 3 = PIL BICUBIC
    _IGNORED = {"image_processor_type", "processor_class"}  # HF class names, no effect on the pixels

    @classmethod
    def from_dir(cls, path) -> "ImageConfig":
        """Reads path/preprocessor_config.json (Hub or save_pretrained layout); defaults if there is none."""
        file = Path(path) / "preprocessor_config.json"
        if not file.exists():
            return cls()
        d = read_json(file)
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - set(cls._FIXED) - cls._IGNORED - {"size"}
        wrong = {k: d[k] for k in cls._FIXED if k in d and d[k] != cls._FIXED[k]}
        if unknown or wrong:
            raise UserError(f"{file}: unknown keys {sorted(unknown)}, unsupported values {wrong}")
        # newer saves nest the limits as size.shortest_edge/longest_edge (4.4x saves: size.min_pixels/max_pixels);
        # top-level min_pixels/max_pixels win, as in Qwen2VLImageProcessorPil.__init__
        size = d.get("size", {})
        kw = {"min_pixels": size.get("shortest_edge", size.get("min_pixels")),
              "max_pixels": size.get("longest_edge", size.get("max_pixels"))}
        kw.update({k: d[k] for k in names if k in d})
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items() if v is not None}
        return cls(**kw)

    def save(self, path):
        """Writes path/preprocessor_config.json (the Hub layout)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        save_json(Path(path) / "preprocessor_config.json", {**d, "image_processor_type": "Qwen2VLImageProcessor"})


def load_image(src) -> Image.Image:
    """A path or PIL image -> upright RGB PIL image, transparency composited on white."""
    if isinstance(src, Image.Image):
        img = src
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()  # decode now so a truncated file fails here, not in the resize
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            raise UserError(f"cannot read image {path}: {e}") from None
    img = ImageOps.exif_transpose(img)
    # mirrors transformers image_transforms.convert_to_rgb: alpha (or a palette/tRNS transparency) goes on white;
    # every other mode is PIL's convert("RGB"), which clips I;16/I/F values above 255 rather than rescaling them
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


MAX_RATIO = 200  # the longest aspect ratio smart_resize accepts


def check_aspect(width, height):
    """An image Qwen2-VL's processor refuses, said with the size the user gave (before any resize)."""
    if max(width, height) / min(width, height) > MAX_RATIO:
        ratio = max(width, height) / min(width, height)
        raise UserError(f"image of {width}x{height} (WxH) has aspect ratio {ratio:.0f}, above the {MAX_RATIO} that "
                        f"Qwen2-VL's image processor takes")


def smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056) -> tuple[int, int]:
    """Target (height, width): multiples of factor, area within [min_pixels, max_pixels], aspect ratio kept.
    Mirrors transformers qwen2_vl smart_resize, including Python's round-half-to-even."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width} (HxW) has aspect ratio above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def process_image(image, cfg: ImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> pixel_values (Np, C*T*p*p) float32 and grid_thw (3,) int64 = [1, gh, gw].
    Mirrors Qwen2VLImageProcessorPil._preprocess + patchify."""
    img = load_image(image)
    p, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    H, W = smart_resize(img.height, img.width, p * m, cfg.min_pixels, cfg.max_pixels)
    x = np.array(img.resize((W, H), Image.Resampling.BICUBIC))  # (H, W, C) uint8: PIL resizes before any rescale
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # image_transforms.rescale upcasts to float64 first
    x = (x - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32)  # normalize in float32
    x = torch.from_numpy(x).permute(2, 0, 1)  # (C, H, W)
    C, gh, gw = x.shape[0], H // p, W // p
    x = x.reshape(C, gh // m, m, p, gw // m, m, p)  # (C, gh/m, m, p, gw/m, m, p)
    # rows are merge-block-major (2x2 blocks row-major, patches inside a block row-major) so the merger's
    # view(-1, m*m*D) sees one block per row
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(*x.shape[:5], T, p, p)  # (gh/m, gw/m, m, m, C, T, p, p): a still is T equal frames
    pixel_values = x.reshape(gh * gw, C * T * p * p)  # (Np, C*T*p*p), features ordered (c, t, py, px)
    return pixel_values, torch.tensor([1, gh, gw], dtype=torch.int64)


def process_images(images, cfg: ImageConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Images -> pixel_values (sum Np, C*T*p*p) with rows concatenated in order, image_grid_thw (n_images, 3)."""
    if not images:
        return None, None
    pixels, grids = zip(*(process_image(im, cfg) for im in images))
    return torch.cat(pixels), torch.stack(grids)


def limit_side(img, max_side):
    """Shrinks an image so its long side is at most max_side, never enlarges it. Mirrors LLaMA-Factory's
    _preprocess_image (image_resolution, default 512), which the VPT authors apply to every image: NEAREST, sizes
    truncated (BasePlugin._preprocess_image in yu-rp/VisualPerceptionToken LLaMA-Factory/.../data/mm_plugin.py)."""
    check_aspect(img.width, img.height)
    if max(img.width, img.height) > max_side:
        scale = max_side / max(img.width, img.height)
        w, h = int(img.width * scale), int(img.height * scale)
        # truncating a thin image's short side could take it past MAX_RATIO (or to 0): keep it at long / MAX_RATIO
        w, h = max(w, math.ceil(h / MAX_RATIO)), max(h, math.ceil(w / MAX_RATIO))
        img = img.resize((w, h), resample=Image.NEAREST)
    return img


# DINOv2 preprocessing, exactly as the VPT authors ran it (VPT_Qwen2vlPlugin._get_mm_inputs in their mm_plugin.py:
# the long-side limit, then facebook/dinov2's BitImageProcessor)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE = 256  # facebook/dinov2-* preprocessor_config: size.shortest_edge
DINO_CROP = 224  # crop_size 224x224: a 16x16 grid of 14-px patches, the 256 tokens VPT uses


def process_dino_image(img: Image.Image, max_side: int = 512) -> torch.Tensor:
    """RGB PIL image -> (3, 224, 224) float32 pixel values for Dinov2Model."""
    img = limit_side(img, max_side).convert("RGB")
    # mirrors BitImageProcessorPil with the Hub values; the long edge is truncated (get_resize_output_image_size)
    w, h = img.size
    long = int(DINO_RESIZE * max(w, h) / min(w, h))
    new_w, new_h = (DINO_RESIZE, long) if w <= h else (long, DINO_RESIZE)
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = (new_h - DINO_CROP) // 2, (new_w - DINO_CROP) // 2  # image_transforms.center_crop; never pads here
    img = img.crop((left, top, left + DINO_CROP, top + DINO_CROP))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, 224, 224) uint8
    x = (x.double() * (1 / 255)).float()  # image_transforms.rescale: multiply in float64, then cast
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std  # image_transforms.normalize, in float32


# SAM preprocessing, as the VPT authors ran it (the same plugin: the long-side limit at 1024, then
# facebook/sam-vit-large's SamImageProcessor)

SAM_SIZE = 1024  # sam-vit-* preprocessor_config: size.longest_edge and pad_size, SAM's one input size


def process_sam_image(img: Image.Image, max_side: int = SAM_SIZE) -> torch.Tensor:
    """PIL image -> (3, 1024, 1024) float32 pixel values for SamVisionEncoder: the image fills the top-left corner,
    zeros elsewhere."""
    img = load_image(limit_side(img, max_side))  # RGB, transparency on white (transformers' convert_to_rgb)
    # mirrors SamImageProcessorPil._get_preprocess_shape: the long side becomes exactly 1024 (a small image is
    # upscaled) and the short side is rounded, where DINOv2's processor truncates
    w, h = img.size
    scale = SAM_SIZE / max(w, h)
    img = img.resize((int(w * scale + 0.5), int(h * scale + 0.5)), resample=Image.BILINEAR)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, h, w) uint8
    x = (x.double() * (1 / 255)).float()  # image_transforms.rescale: multiply in float64, then cast
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std  # image_transforms.normalize, in float32
    return F.pad(x, (0, SAM_SIZE - x.shape[2], 0, SAM_SIZE - x.shape[1]))  # zeros after normalising (PilBackend.pad)


# -----------------------------------------------------------------------------
# tokenizer and chat template

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"  # marks an image inside message text, as in the VPT authors' datasets


def _tokenizer_file(path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / "tokenizer.json"


class Tokenizer:
    """Byte-level BPE from a Qwen2 tokenizer.json (a file or a directory holding one), with the chat token ids."""

    def __init__(self, path):
        file = _tokenizer_file(path)
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        try:
            self.tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception with serde's message
            raise UserError(f"{file}: not a valid tokenizer.json ({e})") from None
        self.im_start_id = self.token_to_id(IM_START)
        self.im_end_id = self.token_to_id(IM_END)
        self.endoftext_id = self.token_to_id(ENDOFTEXT)
        self.vision_start_id = self.token_to_id(VISION_START)
        self.vision_end_id = self.token_to_id(VISION_END)
        self.image_pad_id = self.token_to_id(IMAGE_PAD)
        self.stop_ids = frozenset({self.im_end_id, self.endoftext_id})  # either ends an answer

    def encode(self, text) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids  # Qwen has no BOS; added tokens are still matched

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return i

    def __len__(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens, special=False) -> list[int]:
        """Adds the tokens that are not there yet (new ids follow the vocabulary) and returns the ids of all."""
        new = [AddedToken(t, special=special) for t in tokens]
        if special:
            self.tk.add_special_tokens(new)
        else:
            self.tk.add_tokens(new)
        return [self.token_to_id(t) for t in tokens]

    def save(self, path):
        """Writes tokenizer.json into the directory path (created if needed), or to path itself if it ends in .json."""
        _save(self.tk, path)


def _save(tk, path) -> Path:
    """Writes an HF tokenizer to path (a tokenizer.json or a directory, created if needed) through atomic_write."""
    file = _tokenizer_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda tmp: tk.save(tmp))
    return file


QWEN_SPECIALS = [ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                 "<|box_end|>", "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>",
                 IMAGE_PAD, "<|video_pad|>"]  # ids 151643..151656 in Qwen2's tokenizer, in this order
# transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts, vocab_size, path):
    """A small byte-level BPE built the way Qwen2's is (NFC, the Qwen2 split regex, byte-level), trained on texts,
    with the Qwen special tokens added after it, saved as path (a tokenizer.json or a directory). For tiny models
    trained from scratch (the synthetic set) and tests; <|...|> markers and placeholders are cut out of the text."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator([re.sub(r"<\|\w+\|>|<\w+>", " ", t) for t in texts], trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    return Tokenizer(_save(tk, path))


def _pad_plan(messages, image_tokens, extra):
    """{placeholder: (pad token, iterator over pad counts)}; checks that every placeholder has exactly one count."""
    plan = {IMAGE_PLACEHOLDER: (IMAGE_PAD, image_tokens), **(extra or {})}
    out = {}
    for ph, (pad, counts) in plan.items():
        found = sum(msg["content"].count(ph) for msg in messages)
        counts = [1] * found if counts is None else list(counts)  # one pad each, as the template writes it
        if len(counts) != found:
            raise ValueError(f"{found} {ph} placeholders but {len(counts)} images ({counts} tokens)")
        out[ph] = (pad, iter(counts))
    return out


def _expand(text, plan):
    """Each placeholder -> <|vision_start|> pad * count <|vision_end|>, as Qwen2VLProcessor and the authors'
    mm_plugin expand them."""
    parts = re.split("(" + "|".join(map(re.escape, plan)) + ")", text)
    return "".join(VISION_START + plan[p][0] * next(plan[p][1]) + VISION_END if p in plan else p for p in parts)


def _chat_segments(messages, add_generation_prompt, image_tokens, extra=None) -> list[tuple[str, bool]]:
    """The Qwen2-VL chat template as (text, supervised) pieces: joined they are render_chat's text, and only the
    assistant replies with their closing <|im_end|> are supervised (LLaMA-Factory's qwen template)."""
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
    plan = _pad_plan(messages, image_tokens, extra)
    segments = []
    for msg in messages:
        role, content = msg["role"], _expand(msg["content"], plan)
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}")
        if role == "assistant":
            segments += [(f"{IM_START}{role}\n", False), (content + IM_END, True), ("\n", False)]
        else:
            segments.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


def render_chat(messages, add_generation_prompt=False, image_tokens=None, extra=None) -> str:
    """Chat messages ({"role", "content"} with <image> placeholders) -> Qwen2-VL chat template text. With image_tokens
    (one count per image, in order) each <|image_pad|> is repeated that many times, as Qwen2VLProcessor does.
    extra maps the re-encoding placeholders to (pad token, counts): {"<detection_image>": ("<|...|>", [256])}."""
    return "".join(text for text, _ in _chat_segments(messages, add_generation_prompt, image_tokens, extra))


def encode_chat(tok, messages, image_grid_thw=None, add_generation_prompt=False, merge_size=2,
                extra=None) -> tuple[list[int], list[int]]:
    """Chat messages -> (input_ids, labels), labels IGNORE_INDEX outside the assistant replies. Each image gets
    t*gh*gw/m^2 pads from its image_grid_thw row. Pieces are encoded one by one (as LLaMA-Factory does) so label
    boundaries are exact; every boundary touches a special token except reply starts, so this equals encoding the
    whole text unless a reply begins with a newline (the whole text merges it with the header's newline)."""
    image_tokens = None if image_grid_thw is None else image_token_counts(image_grid_thw, merge_size).tolist()
    ids, labels = [], []
    for text, supervised in _chat_segments(messages, add_generation_prompt, image_tokens, extra):
        piece = tok.encode(text)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def next_turn(tok, content, image_tokens=None, extra=None) -> list[int]:
    """Ids that close the current assistant reply, add a user turn with `content` and open the next reply: the text
    a perception round appends, token for token what encode_chat gives the same turns in a whole record."""
    plan = _pad_plan([{"content": content}], image_tokens, extra)
    user = f"{IM_START}user\n{_expand(content, plan)}{IM_END}\n"
    # piece by piece, where encode_chat's segments split the same text
    return tok.encode(IM_END) + tok.encode("\n") + tok.encode(user) + tok.encode(f"{IM_START}assistant\n")


# -----------------------------------------------------------------------------
# the VPT datasets (rp-yu/VPT_Datasets records; the authors' LLaMA-Factory/data/dataset_info.json maps their columns)

DINO_TOKENS = (DINO_CROP // 14) ** 2  # 256: the 16 x 16 patches of a 224 px crop
SAM_TOKENS = (SAM_SIZE // 16 // 4) ** 2  # 256: SAM's 64 x 64 map of 16 px patches through the projector's stride 4
# the extra placeholders: the DINOv2 and SAM views (always 256 tokens) and the clip view (as many as the image gives)
EXTRA_PLACEHOLDERS = {"dino": ("<detection_image>", "detection_images"), "clip": ("<clip_image>", "clip_images"),
                      "sam": ("<seg_image>", "seg_images")}
# what a VPT answer starts with after its perception round (the authors' evaluation/evaluation.py strips it from
# every ground truth)
ANSWER_PREFIX = "Now answer the question.\n"


def answer_text(tok, ids):
    """Answer token ids (no stop id) -> the answer: special tokens and the authors' "Now answer the question." line
    (ANSWER_PREFIX) dropped, stripped."""
    return tok.decode(ids, skip_special_tokens=True).removeprefix(ANSWER_PREFIX).strip()


def parse_image_ref(ref, base_dir):
    """'img.jpg' or the authors' crop form 'img.jpg_x1,y1,x2,y2' -> (path relative to base_dir, box or None)."""
    stem, dot, ext = ref.rpartition(".")
    if dot and "_" in ext:  # the text after the last '.' carries the crop box (VPT_Qwen2vlPlugin._regularize_images)
        ext, suffix = ext.split("_", 1)
        box = tuple(int(v) for v in suffix.split(",") if re.fullmatch(r"\d+", v.strip()))
        if len(box) != 4 or len(suffix.split(",")) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise UserError(f"crop suffix _{suffix} must be _x1,y1,x2,y2: four integers, x1 < x2 and y1 < y2")
        return os.path.join(base_dir, f"{stem}.{ext}"), box
    return os.path.join(base_dir, ref), None


def check_box(box, width, height):
    """A crop must lie inside its image: PIL would pad the rest with black."""
    if box[2] > width or box[3] > height:
        raise UserError(f"crop box {box} is outside the {width}x{height} image")


def open_image(ref, base_dir, max_side):
    """Loads an image reference, crops it on the full-resolution file, then limits its long side (the authors'
    order: a crop is never upscaled, so a small crop gives few tokens)."""
    path, box = parse_image_ref(ref, base_dir)
    img = load_image(path)
    if box:
        check_box(box, img.width, img.height)
    return limit_side(img.crop(box) if box else img, max_side)


IMAGE_KEYS = ("images", *(key for _, key in EXTRA_PLACEHOLDERS.values()))  # every image list a record has
ROLE_ORDER = "an optional system message, then user and assistant turns in turn, the assistant's last"


def read_records(path):
    """A JSON list or JSON-lines file of records -> list of dicts, each checked (no file opened); errors name the
    file, the record's index and the field. Roles must alternate as LLaMA-Factory's SharegptDatasetConverter
    requires (data/converter.py; it drops a record that does not)."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:  # its line and column are the file's
            raise UserError(f"{path}: not valid JSON: {e}") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                if line.strip():
                    records.append(json.loads(line))
            except json.JSONDecodeError as e:  # parsed alone, a line's error says "line 1": name the file's line
                raise UserError(f"{path}: line {n}: not valid JSON: {e.msg} (column {e.colno})") from None
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and
                m.get("role") in ("system", "user", "assistant") for m in msgs):
            raise UserError(f"{where}: messages: must be a list of {{role, content}} with roles system/user/assistant")
        roles = [m["role"] for m in msgs]
        turns = roles[1:] if roles[0] == "system" else roles
        if not turns or len(turns) % 2 or turns != ["user", "assistant"] * (len(turns) // 2):
            raise UserError(f"{where}: messages: roles {', '.join(roles)} are out of order; a record is {ROLE_ORDER}")
        for key in IMAGE_KEYS:
            refs = r.get(key)
            if refs is not None and not (isinstance(refs, list) and all(isinstance(x, str) for x in refs)):
                raise UserError(f"{where}: {key}: must be a list of image file names, not {refs!r}")
            for j, ref in enumerate(refs or []):
                try:
                    parse_image_ref(ref, "")
                except UserError as e:
                    raise UserError(f"{where}: {key}[{j}] {ref!r}: {e}") from None
        for ph, key in [(IMAGE_PLACEHOLDER, "images"), *EXTRA_PLACEHOLDERS.values()]:
            n = sum(m["content"].count(ph) for m in msgs)
            if n != len(r.get(key) or []):
                raise UserError(f"{where}: {key}: {n} {ph} placeholders but {len(r.get(key) or [])} {key}")
    return records


def image_size(file) -> tuple[int, int]:
    """(width, height) of an image as load_image gives it (EXIF rotation applied), from its header alone."""
    if not os.path.isfile(file):
        raise UserError(f"image file not found: {file}")
    try:
        with Image.open(file) as img:
            w, h = img.size
            turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {file}: {e}") from None
    return (h, w) if turned else (w, h)


def check_images(records, path, base_dir):
    """Opens every image the records name once, header only: a missing or unreadable file, a crop outside its image
    or an aspect ratio Qwen2-VL refuses is found when a run starts, not at the step that draws the record."""
    sizes = {}
    for i, r in enumerate(records):
        for key in IMAGE_KEYS:
            for j, ref in enumerate(r.get(key) or []):
                file, box = parse_image_ref(ref, base_dir)
                try:
                    if file not in sizes:
                        sizes[file] = image_size(file)
                    w, h = sizes[file]
                    if box:
                        check_box(box, w, h)
                        w, h = box[2] - box[0], box[3] - box[1]
                    check_aspect(w, h)
                except UserError as e:
                    raise UserError(f"{path}: record {i}: {key}[{j}] {ref!r}: {e}") from None


def checked_records(path):
    """read_records, then every image the records name opened once (check_images)."""
    records = read_records(path)
    check_images(records, path, os.path.dirname(os.path.abspath(path)))
    return records


class VPTDataset:
    """Records of one file -> model-ready samples. A sample is None when it has more than max_len tokens: it is
    dropped whole (never cut inside an image block) and the trainer counts it. records: checked_records(path) when
    the caller has it already (train.py checks the files before it loads the model)."""

    def __init__(self, path, tok, img_cfg, encoder=None, pad_id=None, act_id=None, image_resolution=512,
                 max_len=2048, records=None):
        self.records = checked_records(path) if records is None else records
        self.base = os.path.dirname(os.path.abspath(path))
        self.path, self.tok, self.img_cfg, self.encoder = path, tok, img_cfg, encoder
        self.pad = tok.tk.id_to_token(pad_id) if pad_id is not None else None  # the pad token's text
        self.act_id = act_id
        self.max_side, self.max_len = image_resolution, max_len

    def __len__(self):
        return len(self.records)

    def length_estimate(self, i):
        """A cheap stand-in for a sample's token count, to group similar lengths into batches (no image is opened):
        characters of text (about one token each in short answers), the most tokens an image can get, and 256 per
        DINOv2 or SAM view."""
        r = self.records[i]
        pixels = min(self.img_cfg.max_pixels, self.max_side ** 2)
        per_image = pixels // (self.img_cfg.patch_size * self.img_cfg.merge_size) ** 2
        n_images = len(r.get("images") or []) + len(r.get("clip_images") or [])
        n_text = sum(len(m["content"]) for m in r["messages"])
        n_fixed = DINO_TOKENS * len(r.get("detection_images") or []) + SAM_TOKENS * len(r.get("seg_images") or [])
        return n_text + per_image * n_images + n_fixed

    def __getitem__(self, i):
        r = self.records[i]
        try:
            images = [open_image(ref, self.base, self.max_side) for ref in r.get("images") or []]
            pixel_values, grid = process_images(images, self.img_cfg)
            extra, extra_spec = None, None
            if self.encoder is not None:
                ph, key = EXTRA_PLACEHOLDERS[self.encoder]
                side = SAM_SIZE if self.encoder == "sam" else self.max_side  # SAM's view: long side up to 1024
                views = [open_image(ref, self.base, side) for ref in r.get(key) or []]
                if views and self.encoder == "dino":
                    extra = torch.stack([process_dino_image(v, self.max_side) for v in views])  # (N, 3, 224, 224)
                    extra_spec = {ph: (self.pad, [DINO_TOKENS] * len(views))}
                elif views and self.encoder == "sam":
                    extra = torch.stack([process_sam_image(v) for v in views])  # (N, 3, 1024, 1024)
                    extra_spec = {ph: (self.pad, [SAM_TOKENS] * len(views))}
                elif views:
                    extra = process_images(views, self.img_cfg)  # (pixel_values, image_grid_thw)
                    counts = image_token_counts(extra[1], self.img_cfg.merge_size).tolist()
                    extra_spec = {ph: (self.pad, counts)}
            ids, labels = encode_chat(self.tok, r["messages"], grid, merge_size=self.img_cfg.merge_size,
                                      extra=extra_spec)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{self.path}: record {i}: {e}") from e
        if len(ids) > self.max_len:
            return None
        # the control token's input is the model's own hidden state, so predicting it is never trained (as the authors'
        # data/processors/supervised.py _encode_supervised_example)
        labels = [IGNORE_INDEX if t == self.act_id else l for t, l in zip(ids, labels)]
        return dict(input_ids=ids, labels=labels, pixel_values=pixel_values, image_grid_thw=grid, extra=extra)


def collate(samples, pad_id, image_token_id, merge=2):
    """Samples -> one right-padded batch: input_ids, padding_mask, targets (the next token at each position, -100
    where unsupervised), M-RoPE position_ids, the images concatenated in order, extra_rows (the sample of each
    re-encoded image) and mask_modeling, all False (the trainer draws it per sample)."""
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    padding = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n] = torch.tensor(s["input_ids"])
        targets[b, :n - 1] = torch.tensor(s["labels"][1:])  # position t predicts token t+1
        padding[b, :n] = 1
    grids = _cat([s["image_grid_thw"] for s in samples if s["image_grid_thw"] is not None])
    extras = [s["extra"] for s in samples if s["extra"] is not None]
    n_extra = [_n_views(s["extra"]) for s in samples]
    extra_rows = torch.arange(B).repeat_interleave(torch.tensor(n_extra))  # the sample of each re-encoded image
    if extras and isinstance(extras[0], tuple):  # clip: (pixel_values, image_grid_thw) pairs
        extras = (_cat([e[0] for e in extras]), _cat([e[1] for e in extras]))
    else:
        extras = _cat(extras)
    position_ids, _ = get_rope_index(ids, grids, padding, image_token_id, merge)
    return dict(input_ids=ids, padding_mask=padding, targets=targets, position_ids=position_ids,
                pixel_values=_cat([s["pixel_values"] for s in samples if s["pixel_values"] is not None]),
                image_grid_thw=grids, extra=extras, extra_rows=extra_rows,
                mask_modeling=torch.zeros(B, dtype=torch.bool))


def _cat(tensors):
    return torch.cat(tensors) if tensors else None


def _n_views(extra) -> int:
    """Re-encoded images in a sample's extra: DINOv2 or SAM pixels (N, 3, H, W), or a clip (pixel_values, grid)
    pair."""
    if extra is None:
        return 0
    return len(extra[1]) if isinstance(extra, tuple) else len(extra)

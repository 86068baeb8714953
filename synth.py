"""
The synthetic "look closer" set, nanoVPT's shakespeare_char: scene drawing, the records of each scene (VPT and
baseline), and the command that writes the whole set with its tokenizer.
    python synth.py                    # data/synth: 8.0k train / 287 val, 9.7k stage-1 records, tokenizer (19 s)
    python synth.py --help             # output folder, seed, sizes
224x224 canvases whose answers are drawn in a one-pixel checkerboard that the 112x112 global view averages to grey,
while a region crop (family 1: "What number is on the red circle?", region tokens) or the 224x224 DINOv2 view
(family 2: "How many checkered squares are there?", re-encoding tokens) still shows it. Plain black digits would not
do: shrinking keeps a mark's coarse ink layout, and a small probe reads them from the global view. PIL's bicubic 1/2
downscale averages every pair of neighbours, which always differ, into their mean grey: flat inside a font cell.
Plates start on even pixels, where only the cells' corners leave up to 4 grey levels (at an odd phase their edges
would leave lines of 16), under the objects' noise. The README's quick start says what each choice was measured
against.
"""
import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
import vpt

CANVAS = 224  # 2x the 112x112 global view (max_pixels = 112*112); the DINOv2 view (resize 256, crop 224) is 1.14x
# a region is a quadrant, 2x2 tokens of the 4x4-token global view, and its 112-px crop is seen at full resolution
# (the paper: an 8x8 grid and a margin of one cell; pointing from scratch is the slow part of this task)
GRID, MARGIN = 2, 0
CELL = CANVAS // GRID  # 112 px
DINO_BORDER = CANVAS * 16 // 256  # 14 px: the DINOv2 centre crop (224 of 256) drops this much each side
# every object colour has G <= 130 and the background G = 235: no shape passes for background in any quadrant
PALETTE = {"red": (215, 35, 35), "orange": (235, 125, 20), "green": (30, 125, 45), "blue": (45, 70, 220)}
SHAPES = ("circle", "square")  # both hold the label plate whole
N_SHAPES = (1, 4)  # one-shape scenes teach where a shape is, the others which shape the question means
SHAPE_SIZE = (84, 90)  # px (even: a shape centres on its plate exactly) in a 112-px quadrant; the tint shows around it
GAP = 8  # px kept free between objects
DARK, LIGHT, GREY = 40, 216, 128  # GREY is the checkerboard's exact mean; 3 NOISE from 0 and 255, so no clipping
NOISE = 12  # luminance noise std on objects
FONT = {  # 3x5 digits; each lit cell is checkered, on a grey plate (no system font needed)
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###", "3": "### ..# ### ..# ###",
    "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###", "6": "### #.. ### #.# ###", "7": "### ..# ..# ..# ..#",
    "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ###"}
# a font cell is one ViT patch and plates sit on the token grid, which is also every quadrant crop's (112 = 4 * 28):
# in a crop each patch is all checkerboard or all grey, and a digit fills the same 2x3 tokens wherever its shape is
LIT = data.ImageConfig.patch_size  # 14 px
TOKEN_PX = LIT * data.ImageConfig.merge_size  # 28 px: one LLM image token (2x2 patches)
LABEL_H, LABEL_W = 5 * LIT, 3 * LIT  # 70x42 px; its half-diagonal (40.8 px) fits the smallest circle's radius (42)


def _plate_offsets(side):
    """Plate offsets in a quadrant, on the token grid, that leave room for the largest shape centred on a plate of
    this side."""
    lo, hi = (side - SHAPE_SIZE[1]) // 2, (side + SHAPE_SIZE[1]) // 2  # the shape's edges from the plate's origin
    return [o for o in range(0, CELL, TOKEN_PX) if GAP // 2 <= o + lo and o + hi <= CELL - GAP // 2]


PLATE_X, PLATE_Y = _plate_offsets(LABEL_W), _plate_offsets(LABEL_H)  # only 28: a shape's place varies with its size
# family 2, on canvases of its own: a 64-px square in each quadrant, 0-4 of them checkered, the rest plain grey. Big
# squares fill ~27 of the DINOv2 view's 256 patches each, so the count is the checkered share of the view (five
# 32-px squares anywhere: counts at chance, 0.07-0.24, after 700 steps)
N_TILES, TILE = GRID * GRID, 64
# R low in the left half and high in the right, B low in the top half and high in the bottom: each quadrant has its
# own tint, because Qwen2-VL has no absolute position embedding and a tiny model reads places from the pixels
TINT = (60, 250)
PNG_COMPRESS = 1  # the flat background compresses well anyway; level 1 keeps generation to seconds
TOKENIZER_SIZE = 400  # BPE merges for the task's words: every word ends up one to four tokens
TILES_QUESTION = "How many checkered squares are there?"
LIST_QUESTION = "List the shapes and where they are."  # the grounding stage's list of every shape with its region


def label_origin(box) -> tuple[int, int]:
    """Top-left pixel of the label plate: centred on the shape."""
    x1, y1, x2, y2 = box
    return round((x1 + x2 - LABEL_W) / 2), round((y1 + y2 - LABEL_H) / 2)


def checker(h, w) -> np.ndarray:
    """(h, w) uint8 one-pixel checkerboard."""
    return np.where((np.arange(h)[:, None] + np.arange(w)) % 2 == 0, LIGHT, DARK).astype(np.uint8)


def label_pixels(digit) -> np.ndarray:
    """(LABEL_H, LABEL_W) grey plate with the digit's lit cells checkered."""
    lit = np.array([[bit == "#" for bit in row] for row in FONT[digit].split()])  # (5, 3)
    lit = lit.repeat(LIT, 0).repeat(LIT, 1)  # (LABEL_H, LABEL_W)
    return np.where(lit, checker(LABEL_H, LABEL_W), GREY).astype(np.uint8)


def _paste(a, x, y, pixels):
    """Writes an (h, w) grey image, opaque, into the (H, W, 4) RGBA array at (x, y)."""
    h, w = pixels.shape
    a[y:y + h, x:x + w, :3] = pixels[..., None]
    a[y:y + h, x:x + w, 3] = 255


def _tile_offsets(c) -> tuple[int, int]:
    """Range of a tile's offset in grid row or column c: GAP/2 from the quadrant's edges, DINO_BORDER from the
    canvas's."""
    lo = max(GAP // 2, DINO_BORDER if c == 0 else 0)
    return lo, CELL - TILE - max(GAP // 2, DINO_BORDER if c == GRID - 1 else 0) + 1


def _draw_shapes(rng, draw) -> list[dict]:
    """1-4 shapes of distinct colours, each inside its own grid cell, GAP/2 from the cell's edges, centred on a
    plate placed on the token grid (label_origin gives the plate back)."""
    shapes = []
    cells = rng.sample(range(GRID * GRID), rng.randint(*N_SHAPES))
    for colour, cell in zip(rng.sample(sorted(PALETTE), len(cells)), cells):
        s = rng.randrange(SHAPE_SIZE[0], SHAPE_SIZE[1] + 1, 2)
        x = cell % GRID * CELL + rng.choice(PLATE_X) + (LABEL_W - s) // 2
        y = cell // GRID * CELL + rng.choice(PLATE_Y) + (LABEL_H - s) // 2
        shape = rng.choice(SHAPES)
        draw_shape = draw.ellipse if shape == "circle" else draw.rectangle
        draw_shape((x, y, x + s - 1, y + s - 1), fill=PALETTE[colour] + (255,))  # PIL boxes include their last pixel
        digit = str(rng.randint(0, 9))
        shapes.append({"shape": shape, "colour": colour, "digit": digit, "box": [x, y, x + s, y + s]})
    return shapes


def make_scene(rng, kind) -> tuple[Image.Image, list[dict], int]:
    """One canvas -> (image, shapes as {shape, colour, digit, box}, number of checkered squares). kind "shapes": 1-4
    labelled shapes; kind "tiles": N_TILES squares (they need room the shapes do not leave)."""
    layer = Image.new("RGBA", (CANVAS, CANVAS))  # objects only: alpha marks where the noise goes
    shapes = _draw_shapes(rng, ImageDraw.Draw(layer)) if kind == "shapes" else []
    tiles = []  # one per quadrant, inside the DINOv2 centre crop, at even pixels (the checkers average to grey at 1/2)
    for cell in range(N_TILES) if kind == "tiles" else ():
        x, y = (c * CELL + rng.randrange(*_tile_offsets(c), 2) for c in (cell % GRID, cell // GRID))
        tiles.append([x, y, x + TILE, y + TILE])
    n_checkered = rng.randint(0, N_TILES) if tiles else 0
    tiles = rng.sample(tiles, len(tiles))  # the first n_checkered are checkered: any of the quadrants
    a = np.array(layer)  # (H, W, 4)
    for s in shapes:
        _paste(a, *label_origin(s["box"]), label_pixels(s["digit"]))
    for i, (x, y, _, _) in enumerate(tiles):
        _paste(a, x, y, checker(TILE, TILE) if i < n_checkered else np.full((TILE, TILE), GREY))
    # noise on the objects only: a noisy background would make each PNG ~100x larger
    half = np.where(np.arange(CANVAS) < CANVAS // 2, *TINT).astype(np.uint8)  # (W,): low, then high
    red, green, blue = np.broadcast_arrays(half[None, :], np.uint8(235), half[:, None])  # 3 x (H, W)
    rgb = np.stack([red, green, blue], -1).copy()  # (H, W, 3), writable
    obj = a[..., 3] > 0
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, NOISE, (obj.sum(), 1)).round()
    rgb[obj] = np.clip(a[obj, :3] + noise, 0, 255)
    return Image.fromarray(rgb), shapes, n_checkered


def _chat(*turns) -> list[dict]:
    """Alternating user / assistant contents -> chat messages."""
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)]


def scene_records(path, shapes, n_checkered, where=False) -> tuple[list[dict], list[dict]]:
    """One scene -> (VPT records, baseline records): a label question per shape, or the tile-count question, each
    with the "kind" sample.py --eval scores apart ("digits, 3 shapes", "counts"). where:
    also a "Where is the red circle?" record per shape, answered by the region alone: twice the pointing signal (the
    slow part to learn), for training."""
    records, base = [], []
    for s in shapes:
        name = f"{s['colour']} {s['shape']}"
        cells = vpt.box_to_cells(s["box"], CANVAS, CANVAS, GRID)
        region = vpt.region_text(cells)
        if where:
            records.append(where_record(path, s, region))
        q = f"What number is on the {name}?"
        crop = vpt.cells_to_box(cells[0::2], cells[1::2], CANVAS, CANVAS, GRID, MARGIN)
        kind = f"digits, {len(shapes)} shape{'s' * (len(shapes) > 1)}"
        records.append({"messages": _chat(f"<image>\n{q}", region, "<image>", data.ANSWER_PREFIX + s["digit"]),
                        "images": [path, f"{path}_{','.join(map(str, crop))}"], "box": s["box"], "kind": kind})
        base.append((q, s["digit"], kind))
    if not shapes:
        act = "".join(vpt.token_strings("dino", GRID)[1][-3:])  # <|detection_action_start|>, _action|>, _action_end|>
        answer = data.ANSWER_PREFIX + str(n_checkered)
        records.append({"messages": _chat(f"<image>\n{TILES_QUESTION}", act, "<detection_image>", answer),
                        "images": [path], "detection_images": [path], "kind": "counts"})
        base.append((TILES_QUESTION, str(n_checkered), "counts"))
    # the baseline twins: the same image, question and answer, without perception tokens
    base = [{"messages": _chat(f"<image>\n{q}", a), "images": [path], "kind": k} for q, a, k in base]
    return records, base


def where_record(path, shape, region) -> dict:
    """"Where is the red circle?", answered by the shape's region alone."""
    return {"messages": _chat(f"<image>\nWhere is the {shape['colour']} {shape['shape']}?", region), "images": [path],
            "box": shape["box"]}


def ground_records(path, shapes, n_checkered, rng) -> list[dict]:
    """A grounding scene's records, for the stage before VPT (what pretraining and the alignment stage give the real
    model). A shapes scene: "Where is the red circle?" per shape, answered by its region; the scene's shapes listed in
    palette order with each name followed by its region (a region right after the words it answers is the easy form
    of the same lookup); and one shape's digit read from its quadrant's crop given as the only image (the reading
    the real model brings). A tiles scene: the count read from the DINOv2 view in the user turn, no control token
    (the paper's alignment stage: the projector's feature path learns to carry the view)."""
    if not shapes:
        return [{"messages": _chat(f"<image><detection_image>\n{TILES_QUESTION}", str(n_checkered)),
                 "images": [path], "detection_images": [path]}]
    cells = [vpt.box_to_cells(s["box"], CANVAS, CANVAS, GRID) for s in shapes]
    records = [where_record(path, s, vpt.region_text(c)) for s, c in zip(shapes, cells)]
    listed = sorted(zip(shapes, cells), key=lambda sc: list(PALETTE).index(sc[0]["colour"]))
    answer = " ".join(f"{s['colour']} {s['shape']} {vpt.region_text(c)}" for s, c in listed)
    records.append({"messages": _chat(f"<image>\n{LIST_QUESTION}", answer), "images": [path]})
    i = rng.randrange(len(shapes))
    crop = vpt.cells_to_box(cells[i][0::2], cells[i][1::2], CANVAS, CANVAS, GRID, MARGIN)
    q = f"What number is on the {shapes[i]['colour']} {shapes[i]['shape']}?"
    return records + [{"messages": _chat(f"<image>\n{q}", shapes[i]["digit"]),
                       "images": [f"{path}_{','.join(map(str, crop))}"]}]


def _draw_split(out, rng, split, kinds) -> list[tuple[str, list[dict], int]]:
    """Draws canvas i of a split as make_scene's kinds[i] and saves it in out/images -> [(path relative to out,
    shapes, number of checkered squares)] in order."""
    scenes = []
    for i, kind in enumerate(kinds):
        img, shapes, n_checkered = make_scene(rng, kind)
        path = f"images/{split}_{i:05d}.png"
        img.save(out / path, compress_level=PNG_COMPRESS)
        scenes.append((path, shapes, n_checkered))
    return scenes


def make_synth(out_dir="data/synth", n_train_images=2668, n_val_images=150, n_ground_images=2000, seed=1337) -> dict:
    """Writes images/, train.jsonl and val.jsonl (VPT records), train_baseline.jsonl and val_baseline.jsonl,
    ground.jsonl and ground_val.jsonl (stage 1's records, ground_records, on canvases of their own: n_ground_images
    shape scenes and a third as many counting ones; a tenth as many for validation), and tokenizer.json (the task's
    words, Qwen's special tokens, the VPT tokens). Returns the records per file."""
    out, rng = Path(out_dir), random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts, texts = {}, ["system", "user", "assistant", data.DEFAULT_SYSTEM, data.ANSWER_PREFIX]

    def write(name, records):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        counts[name] = len(records)

    for split, n_images in (("train", n_train_images), ("val", n_val_images)):
        records, base = [], []
        # training: every second canvas of the counting family, whose readout is the slower to settle in the VPT
        # run (every third: counts 0.78 after the recipe's two stages, on one seed; every second: 0.98)
        every = 2 if split == "train" else 3
        kinds = ["tiles" if i % every == every - 1 else "shapes" for i in range(n_images)]
        for path, shapes, n_checkered in _draw_split(out, rng, split, kinds):
            r, b = scene_records(path, shapes, n_checkered, where=split == "train")
            records += r
            base += b
        write(split, records)
        write(f"{split}_baseline", base)
        if split == "train":
            texts += [m["content"] for r in records + base for m in r["messages"]]
    for split, n_images in (("ground", n_ground_images), ("ground_val", max(1, n_ground_images // 10))):
        kinds = ["shapes"] * n_images + ["tiles"] * (n_images // 3)
        records = [r for path, shapes, n_checkered in _draw_split(out, rng, split, kinds)
                   for r in ground_records(path, shapes, n_checkered, rng)]
        write(split, records)
        if split == "ground":
            texts += [m["content"] for r in records for m in r["messages"]]
    tok = data.train_tokenizer(texts, TOKENIZER_SIZE, out)
    vpt.add_tokens(tok, "dino", GRID)
    tok.save(out)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="data/synth", help="output folder, created if needed (default data/synth)")
    p.add_argument("--seed", type=int, default=1337, help="draws every scene: same seed, same files (default 1337)")
    p.add_argument("--n_train_images", type=int, default=2668,
                   help="canvases for train.jsonl, every second one of the counting family (default 2668)")
    p.add_argument("--n_val_images", type=int, default=150, help="canvases for val.jsonl (default 150)")
    p.add_argument("--n_ground_images", type=int, default=2000,
                   help="shape canvases for ground.jsonl, stage 1's, and a third as many counting ones; "
                        "ground_val.jsonl gets a tenth (default 2000)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    counts = make_synth(args.out_dir, args.n_train_images, args.n_val_images, args.n_ground_images, args.seed)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    print(f"wrote {args.out_dir} in {time.perf_counter() - t0:.1f} s: {summary}")


if __name__ == "__main__":
    main()

"""
Ask a model a question about images; the answer streams to stdout, the question, perception tokens and timings go
to stderr.
    python sample.py      # the shipped synthetic VPT model (assets/synth) on assets/demo.png, offline
    python sample.py --prompt "What number is on the red circle?"       # the same model and image, another question
    python sample.py --init_from Qwen/Qwen2-VL-2B-Instruct --image photo.jpg --prompt "What is in this image?"
    python sample.py --init_from rp-yu/Qwen2-VL-2b-VPT-Det --image photo.jpg --prompt "..." --vpt region \\
        --save_viz out.png
Without --init_from the model is the demo's, without --image the image is; the demo image's question and
demo_region.png are the defaults for the demo image only. A VPT checkpoint (model_type qwen2_vl_vpt) answers
through vpt.Sampler: with --vpt free it decides itself whether to select a region or re-encode the image,
region/reencode force that path, off answers directly.
"""
import argparse
import os
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import model as M
import vpt


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# assets/demo.png is synth.make_scene(random.Random(2033), "shapes")
DEMO_QUESTION = "What number is on the green square?"
# the defaults: the quick start's model, trained by config/synth.py and shipped in bfloat16 (~6 MB), and its scene
DEMO_MODEL, DEMO_IMAGE, DEMO_VIZ = os.path.join(ASSETS, "synth"), os.path.join(ASSETS, "demo.png"), "demo_region.png"
VIZ_SIDE = 448  # the drawing's long side at least, in whole multiples of the image (NEAREST keeps its pixels sharp)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, like every other user error (argparse adds the usage block)
        raise M.UserError(message)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default=DEMO_MODEL,
                   help="checkpoint directory or Hub id, e.g. Qwen/Qwen2-VL-2B-Instruct (default: the demo model)")
    p.add_argument("--image", action="append", default=[],
                   help="image path; repeat for several images (default: the demo image)")
    p.add_argument("--prompt", default=None,
                   help=f"the question (default: {DEMO_QUESTION!r} for the demo image, else 'Describe this image.')")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens; 0 = no filter")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling in [0, 1]; 0 = the best token alone")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--vpt", default="free", choices=vpt.MODES, help="perception tokens (VPT checkpoints only)")
    p.add_argument("--max_rounds", type=int, default=1, help="perception rounds allowed per answer")
    p.add_argument("--save_viz", default=None, help="write the image enlarged, with the selected regions boxed in "
                   f"red and the question and answer under it (default: {DEMO_VIZ} for the demo image)")
    p.add_argument("--eval", default=None, help="a records file (.jsonl): exact-match accuracy and perception use")
    args = p.parse_args(argv)
    if not args.image:
        args.image = [DEMO_IMAGE]
    demo = args.image == [DEMO_IMAGE]
    if args.prompt is None:
        args.prompt = DEMO_QUESTION if demo else "Describe this image."
    if args.save_viz is None and demo and not args.eval:
        args.save_viz = DEMO_VIZ
    check_args(args)
    return args


def check_args(args):
    """Every numeric and enum option, checked in one place before anything loads."""
    forced = args.vpt in ("region", "reencode")
    rules = [("max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
             ("temperature", args.temperature >= 0, "0 (greedy) or more"),
             ("top_k", args.top_k is None or args.top_k >= 0, "0 (no filter) or more"),
             ("top_p", args.top_p is None or 0 <= args.top_p <= 1, "in [0, 1] (0 keeps the best token alone)"),
             ("max_rounds", args.max_rounds >= 0, "0 (no perception round) or more"),
             ("max_rounds", args.max_rounds >= 1 or not forced,
              f"at least 1 with --vpt {args.vpt}, which forces a perception round"),
             ("device", args.device == "cpu" or torch.cuda.is_available(),
              "cpu: this machine has no CUDA device (torch.cuda.is_available() is False)")]
    for key, ok, need in rules:
        if not ok:
            raise M.UserError(f"--{key} {getattr(args, key)}: must be {need}")
    if args.eval and not os.path.isfile(args.eval):
        raise M.UserError(f"--eval {args.eval}: no such records file")
    for path in args.image:  # the header alone: a missing file or a refused shape is said before the model loads
        try:
            data.check_aspect(*data.image_size(path))
        except M.UserError as e:
            raise M.UserError(f"--image {path}: {e}") from None


class Streamer:
    """Prints the decoded text as it grows. Decodes the whole answer each time and prints the new suffix, holding
    back a trailing partial UTF-8 character (byte-level BPE can split one across tokens) and, while the text could
    still be it, the authors' "Now answer the question." line that a VPT answer starts with after its perception
    round (data.ANSWER_PREFIX), which is dropped: stdout gets the answer alone."""

    def __init__(self, tok):
        self.tok, self.ids, self.printed = tok, [], 0

    def text(self):
        return self.tok.decode(self.ids).removeprefix(data.ANSWER_PREFIX)

    def put(self, token_id):
        self.ids.append(token_id)
        text = self.text()
        if not text.endswith("\ufffd") and not data.ANSWER_PREFIX.startswith(text):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)

    def close(self):
        """Prints what was held back (an answer that stopped inside the prefix or a partial character)."""
        text = self.text()
        sys.stdout.write(text[self.printed:] + "\n")
        self.printed = len(text)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    path, config = M.open_checkpoint(args.init_from, vpt.WEIGHT_PATTERNS)
    is_vpt = config.get("model_type") == "qwen2_vl_vpt"
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.eval:
        return evaluate(args, path, is_vpt, dtype, gen)
    if is_vpt:
        return answer_vpt(args, path, dtype, gen)
    if args.vpt in ("region", "reencode"):
        sys.exit(f"--vpt {args.vpt} needs a VPT checkpoint; {args.init_from} is a plain Qwen2-VL")
    tok = data.Tokenizer(path)
    model = M.from_pretrained(path, dtype=dtype, device=args.device)
    images = [data.load_image(p) for p in args.image]
    pixel_values, grid = data.process_images(images, data.ImageConfig.from_dir(path))
    content = data.IMAGE_PLACEHOLDER * len(images) + args.prompt
    ids, _ = data.encode_chat(tok, [{"role": "user", "content": content}], grid, add_generation_prompt=True)
    ids = torch.tensor([ids], device=args.device)
    if pixel_values is not None:
        pixel_values, grid = pixel_values.to(args.device), grid.to(args.device)
    stop = tok.stop_ids
    tokens = M.generate(model, ids, None, pixel_values, grid, args.max_new_tokens, args.temperature, args.top_k,
                        args.top_p, stop_ids=stop, generator=gen)
    return stream(tokens, tok, stop, ids.size(1), max_positions=model.cfg.max_position_embeddings)


def answer_vpt(args, path, dtype, gen):
    if len(args.image) != 1:
        sys.exit("a VPT model answers about exactly one image (--image)")
    model, tok, img_cfg = vpt.from_pretrained(path, dtype=dtype, device=args.device)
    sampler = vpt.Sampler(model, tok, img_cfg, args.vpt, args.max_rounds, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, gen)
    print(f"question: {args.prompt}", file=sys.stderr)
    ids = stream(answer_tokens(sampler, args.image[0], args.prompt, tok), tok, tok.stop_ids, None, sampler,
                 model.cfg.max_position_embeddings)
    for r in sampler.rounds:
        if r.kind == "region":
            print(f"region: x cells {r.cells[0]}, y cells {r.cells[1]} -> box {r.box} on the "
                  f"{sampler.original.width}x{sampler.original.height} original", file=sys.stderr)
        else:
            print(f"re-encode: {model.vcfg.encoder} features conditioned on the control vector", file=sys.stderr)
    if args.save_viz:
        answer = tok.decode(ids).removeprefix(data.ANSWER_PREFIX).strip()
        draw_answer(sampler.original, [r.box for r in sampler.rounds if r.box], args.prompt, answer).save(args.save_viz)
        print(f"wrote {args.save_viz}", file=sys.stderr)
    return ids


def draw_answer(image, boxes, question, answer):
    """The image enlarged by a whole factor to a long side of VIZ_SIDE or more, each box (x1, y1, x2, y2 in the
    original's pixels, x2/y2 exclusive) outlined in red, and the question and answer in a band under it."""
    scale = max(1, -(-VIZ_SIDE // max(image.size)))  # ceil
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=VIZ_SIDE // 24)  # Pillow's bundled font: no system font needed
    lines = [f"Q: {question}", f"A: {answer}"]
    line_h = font.getbbox("Ag")[3] + 6
    out = Image.new("RGB", (big.width, big.height + line_h * len(lines) + 8), "white")
    out.paste(big)
    draw = ImageDraw.Draw(out)
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1 * scale, y1 * scale, x2 * scale - 1, y2 * scale - 1], outline=(255, 0, 0),
                       width=max(2, big.width // 150))
    for i, line in enumerate(lines):
        draw.text((6, big.height + 4 + i * line_h), line, fill="black", font=font)
    return out


def box_overlap(pred, gt):
    """(IoU, IoGT): intersection over union, and over the ground-truth box's area (the paper's Table S2)."""
    iw = max(0, min(pred[2], gt[2]) - max(pred[0], gt[0]))
    ih = max(0, min(pred[3], gt[3]) - max(pred[1], gt[1]))
    inter = iw * ih
    area_pred = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_gt = (gt[2] - gt[0]) * (gt[3] - gt[1])
    return inter / (area_pred + area_gt - inter), inter / area_gt


def evaluate(args, path, is_vpt, dtype, gen):
    """Answers every record's first user turn (after its system message, if it has one) about its first image (if
    it has one; greedy by default) and scores the answer against the record's last assistant message: exact match,
    perception-token use, and for regions the IoU and IoGT of the selected cells (without the crop margin) against
    the record's "box". Records that name a "kind" (synth.py's: "digits, 3 shapes", "counts") are also scored per
    kind: exact match, and for records with a "box" the share whose first region is exactly the box's cells."""
    records = data.read_records(args.eval)
    base = os.path.dirname(os.path.abspath(args.eval))
    data.check_images(records, args.eval, base)
    if is_vpt:
        model, tok, img_cfg = vpt.from_pretrained(path, dtype=dtype, device=args.device)
    else:
        if args.vpt != "off":
            sys.exit(f"{args.init_from} is a plain Qwen2-VL: evaluate it with --vpt off")
        model = M.from_pretrained(path, dtype, args.device)
        tok, img_cfg = data.Tokenizer(path), data.ImageConfig.from_dir(path)
    stop = tok.stop_ids
    hits, kinds, overlaps = 0, {"region": 0, "reencode": 0}, []
    per_kind = {}  # kind -> [records, exact matches, records with a box, first regions on the box's cells]
    for i, r in enumerate(records):
        msgs = r["messages"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None  # else the template's default
        question = msgs[1 if system is not None else 0]["content"].replace(data.IMAGE_PLACEHOLDER, "").strip()
        truth = msgs[-1]["content"].removeprefix(data.ANSWER_PREFIX).strip()
        try:
            image = data.open_image(r["images"][0], base, 10 ** 9) if r.get("images") else None  # None: text only
        except M.UserError as e:
            raise M.UserError(f"{args.eval}: record {i}: images[0]: {e}") from None
        cells_right = False
        if is_vpt:
            s = vpt.Sampler(model, tok, img_cfg, args.vpt, args.max_rounds, args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, gen)
            ids = [t for t in s.generate(image, question, system)
                   if t not in model.tokens.perception() and t not in stop]
            for rd in s.rounds:
                kinds[rd.kind] += 1
                if rd.kind == "region" and "box" in r:
                    cells = vpt.cells_to_box(*rd.cells, image.width, image.height, model.vcfg.grid, margin=0)
                    overlaps.append(box_overlap(cells, r["box"]))
            regions = [rd.cells for rd in s.rounds if rd.kind == "region"]
            if regions and "box" in r:
                (x1, x2), (y1, y2) = regions[0]
                grid = model.vcfg.grid
                cells_right = (x1, y1, x2, y2) == vpt.box_to_cells(r["box"], image.width, image.height, grid)
        else:
            images = [data.limit_side(image, 512)] if image else []  # as VPTDataset trained it
            pv, grid = data.process_images(images, img_cfg)
            content = f"{data.IMAGE_PLACEHOLDER}\n{question}" if image else question
            messages = [{"role": "system", "content": system}] if system is not None else []
            prompt, _ = data.encode_chat(tok, messages + [{"role": "user", "content": content}], grid, True)
            to_dev = lambda t: t.to(args.device) if t is not None else None
            ids = []
            for t in M.generate(model, torch.tensor([prompt], device=args.device), None, to_dev(pv), to_dev(grid),
                                args.max_new_tokens, args.temperature, args.top_k, args.top_p, stop, gen):
                if int(t) in stop:
                    break
                ids.append(int(t))
        answer = tok.decode(ids, skip_special_tokens=True).removeprefix(data.ANSWER_PREFIX).strip()
        hits += answer == truth
        if "kind" in r:
            for j, v in enumerate((1, answer == truth, is_vpt and "box" in r, cells_right)):
                per_kind.setdefault(r["kind"], [0, 0, 0, 0])[j] += v
    n = len(records)
    line = (f"{args.eval} ({n} records, --vpt {args.vpt}): exact match {hits / n:.3f}; perception: "
            f"region {kinds['region'] / n:.2f}, re-encode {kinds['reencode'] / n:.2f}")
    if overlaps:
        line += (f"; region IoU {sum(o[0] for o in overlaps) / len(overlaps):.3f}, "
                 f"IoGT {sum(o[1] for o in overlaps) / len(overlaps):.3f}")
    print(line)
    for kind, (k, right, boxed, cells) in sorted(per_kind.items()):
        print(f"  {kind} ({k} records): exact match {right / k:.3f}" +
              (f", region cells right {cells / boxed:.3f}" if boxed else ""))
    return dict(accuracy=hits / n, region=kinds["region"] / n, reencode=kinds["reencode"] / n,
                iou=overlaps and sum(o[0] for o in overlaps) / len(overlaps),
                kinds={kind: dict(accuracy=right / k, cells=boxed and cells / boxed)
                       for kind, (k, right, boxed, cells) in per_kind.items()})


def answer_tokens(sampler, image, prompt, tok):
    """The sampler's tokens minus the perception tokens, which go to stderr as they come."""
    T = sampler.model.tokens
    perception = T.perception()
    for t in sampler.generate(image, prompt):
        if t in perception:  # a group's closing token ends its line
            print(tok.decode([t]), end="\n" if t in (T.region_end, T.act_end) else "", file=sys.stderr, flush=True)
        else:
            yield t


def stream(tokens, tok, stop, prompt_len, sampler=None, max_positions=None):
    """Streams decoded tokens to stdout until a stop id; prefill time and decode rate to stderr, and a warning when
    the prompt is longer than the model's max_position_embeddings."""
    streamer = Streamer(tok)
    t0 = time.perf_counter()
    times = []  # arrival time of each token: the first comes right after the prefill, the rest one decode step each
    for t in tokens:
        t = int(t)
        times.append(time.perf_counter())
        n = prompt_len if prompt_len is not None else sampler.prompt_len
        if len(times) == 1 and max_positions and n > max_positions:
            # a warning, not an error: RoPE has no hard limit and transformers runs it too, but positions past the
            # trained length are extrapolation, and answers degrade there
            print(f"warning: the prompt is {n} tokens, more than the model's max_position_embeddings "
                  f"({max_positions}); the answer may be unreliable", file=sys.stderr)
        if t in stop:
            break
        streamer.put(t)
    streamer.close()
    steps = len(times) - 1
    rate = f"{steps / (times[-1] - times[0]):.1f} tokens/s" if steps > 0 else "n/a"
    n = prompt_len if prompt_len is not None else sampler.prompt_len
    print(f"prefill: {n} tokens in {times[0] - t0:.3f} s; decode: {steps} steps at {rate}" if times else
          "no tokens generated", file=sys.stderr)
    return streamer.ids


if __name__ == "__main__":
    try:
        main()
    except (M.UserError, OSError) as e:  # the user's options, files or network: one line; a bug keeps its traceback
        sys.exit(f"sample.py: error: {e}")

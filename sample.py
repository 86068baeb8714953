"""
Ask a model a question about images; the answer streams to stdout, the question, perception tokens and timings go
to stderr.
    python sample.py      # the shipped synthetic VPT model (assets/synth) on assets/demo.png, offline
    python sample.py --prompt "What number is on the red circle?"       # the same model and image, another question
    python sample.py --init_from Qwen/Qwen2-VL-2B-Instruct --image photo.jpg --prompt "What is in this image?"
    python sample.py --init_from rp-yu/Qwen2-VL-2b-VPT-Det --image photo.jpg --prompt "..." --vpt region \\
        --save_viz out.png
    python sample.py --init_from out-synth --eval data/synth/val.jsonl --batch_size 8 --out predictions.jsonl
Without --init_from the model is the demo's, without --image the image is; the demo image's question and
demo_region.png are the defaults for the demo image only. A VPT checkpoint (model_type qwen2_vl_vpt) answers
through vpt.Engine: with --vpt free it decides itself whether to select a region or re-encode the image,
region/reencode force that path, off answers directly. --eval answers a records file instead, --batch_size records at
a time behind a progress bar on stderr: the scores go to stdout, one JSON line per record to --out.
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm  # installed with huggingface-hub

import data
import model as M
import vpt


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# assets/demo.png is synth.make_scene(random.Random(2033), "shapes")
DEMO_QUESTION = "What number is on the green square?"
# the defaults: the quick start's model, trained by config/synth.py and shipped in bfloat16 (~6 MB), and its scene
DEMO_MODEL, DEMO_IMAGE, DEMO_VIZ = os.path.join(ASSETS, "synth"), os.path.join(ASSETS, "demo.png"), "demo_region.png"
VIZ_SIDE = 896  # the drawing's long side at least, in whole multiples of the image (NEAREST keeps its pixels sharp)


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
    p.add_argument("--max_new_tokens", type=int, default=256, help="the most tokens an answer may have (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens; 0 = no filter")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling in [0, 1]; 0 = the best token alone")
    p.add_argument("--seed", type=int, default=1337, help="for sampling (default: 1337)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--vpt", default="free", choices=vpt.MODES, help="perception tokens (VPT checkpoints only): off, "
                   "free (the model chooses), or a forced region or re-encode round (default: free)")
    p.add_argument("--max_rounds", type=int, default=1, help="perception rounds allowed per answer (default: 1)")
    p.add_argument("--max_regions", type=int, default=1,
                   help="region groups one round may hold; their crops are appended together as 'Region i: <image>' "
                   "(default: 1)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (a CUDA graph on cuda); the first answer pays the compile")
    p.add_argument("--save_viz", default=None, help="write the image enlarged, with the selected regions boxed in "
                   f"red and the question and answer under it (default: {DEMO_VIZ} for the demo image)")
    p.add_argument("--eval", default=None, help="a records file (.jsonl or a JSON list): answer each record's first "
                   "question and score it (exact match, VQA-normalised match, ANLS, perception use, region IoU/IoGT)")
    p.add_argument("--batch_size", type=int, default=1, help="--eval: records answered together (default: 1)")
    p.add_argument("--out", default=None, help="--eval: one JSON line per record (answer, truth, rounds, scores)")
    p.add_argument("--image_root", default=None,
                   help="--eval: the folder the records' image paths are relative to (default: the records file's)")
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
             ("max_regions", args.max_regions >= 1, "at least 1"),
             ("max_rounds", args.max_rounds >= 1 or not forced,
              f"at least 1 with --vpt {args.vpt}, which forces a perception round"),
             ("device", args.device == "cpu" or torch.cuda.is_available(),
              "cpu: this machine has no CUDA device (torch.cuda.is_available() is False)"),
             ("batch_size", args.batch_size >= 1, "at least 1")]
    for key, ok, need in rules:
        if not ok:
            raise M.UserError(f"--{key} {getattr(args, key)}: must be {need}")
    if args.eval and not os.path.isfile(args.eval):
        raise M.UserError(f"--eval {args.eval}: no such records file")
    if args.image_root and not os.path.isdir(args.image_root):
        raise M.UserError(f"--image_root {args.image_root}: no such folder")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir and not os.path.isdir(out_dir):  # said now, not after the whole evaluation has run
        raise M.UserError(f"--out {args.out}: no such folder {out_dir}")
    for path in args.image:  # the header alone: a missing file or a refused shape is said before the model loads
        try:
            data.check_aspect(*data.image_size(path))
        except M.UserError as e:
            raise M.UserError(f"--image {path}: {e}") from None


class Streamer:
    """Prints the decoded text as it grows. Decodes the whole answer each time and prints the new suffix, holding
    back a trailing partial UTF-8 character (byte-level BPE can split one across tokens) and, while the text could
    still be it, the authors' "Now answer the question." line that a VPT answer starts with after its perception
    round (data.ANSWER_PREFIX), which is dropped, as are special tokens: stdout gets the answer alone."""

    def __init__(self, tok):
        self.tok, self.ids, self.printed = tok, [], 0

    def text(self):
        return self.tok.decode(self.ids, skip_special_tokens=True).removeprefix(data.ANSWER_PREFIX)

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
    return stream(tokens, tok, stop, ids.size(1), model.cfg.max_position_embeddings)


def answer_vpt(args, path, dtype, gen):
    if len(args.image) != 1:
        sys.exit("a VPT model answers about exactly one image (--image)")
    model, tok, img_cfg = vpt.from_pretrained(path, dtype=dtype, device=args.device)
    engine = vpt.Engine(model, tok, img_cfg, args.vpt, args.max_rounds, args.max_new_tokens, args.temperature,
                        args.top_k, args.top_p, gen, args.max_regions, args.compile)
    print(f"question: {args.prompt}", file=sys.stderr)
    streamer, perception = Streamer(tok), model.tokens.perception()
    # the engine feeds <|*_action|><|*_action_end|> itself: <|*_action_start|> is the last sampled token of a round
    ends = (model.tokens.region_end, model.tokens.act_start)

    def on_token(_, t):  # perception tokens go to stderr as they come, a round's last sampled token ends its line
        if t in perception:
            print(tok.decode([t]), end="\n" if t in ends else "", file=sys.stderr, flush=True)
        elif t not in tok.stop_ids:
            streamer.put(t)

    res = engine.answer([vpt.Request(args.image[0], args.prompt)], on_token)[0]
    streamer.close()
    report(res.timings, res.prompt_len, len(res.ids), model.cfg.max_position_embeddings)
    for r in res.rounds:
        if r.kind == "region":
            print(f"region: x cells {r.cells[0]}, y cells {r.cells[1]} -> box {r.box} on the "
                  f"{res.original.width}x{res.original.height} original", file=sys.stderr)
        else:
            print(f"re-encode: {model.vcfg.encoder} features conditioned on the control vector", file=sys.stderr)
    if args.save_viz:
        looked = [f"re-encoded with {model.vcfg.encoder}" for r in res.rounds if r.kind == "reencode"]
        draw_answer(res.original, [r.box for r in res.rounds if r.box], [f"Q: {args.prompt}", f"A: {res.text}",
                                                                          *looked]).save(args.save_viz)
        print(f"wrote {args.save_viz}", file=sys.stderr)
    return res


def draw_answer(image, boxes, lines):
    """The image enlarged by a whole factor to a long side of VIZ_SIDE or more, each box (x1, y1, x2, y2 in the
    original's pixels, x2/y2 exclusive) outlined in red, and the lines of text (question, answer, what was
    re-encoded) in a band under it."""
    scale = max(1, -(-VIZ_SIDE // max(image.size)))  # ceil
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=VIZ_SIDE // 24)  # Pillow's bundled font: no system font needed
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


def stream(tokens, tok, stop, prompt_len, max_positions=None):
    """Streams decoded tokens to stdout until a stop id, then the timings to stderr (report)."""
    streamer = Streamer(tok)
    t0 = time.perf_counter()
    times = []  # arrival time of each token: the first comes right after the prefill, the rest one decode step each
    for t in tokens:
        t = int(t)
        times.append(time.perf_counter())
        if t in stop:
            break
        streamer.put(t)
    streamer.close()
    timings = dict(prefill_s=times[0] - t0, decode_s=times[-1] - times[0]) if times else None
    report(timings, prompt_len, len(times), max_positions)
    return streamer.ids


def report(timings, prompt_len, n_tokens, max_positions=None):
    """Prefill time and decode rate on stderr, and a warning when the prompt is longer than the model's
    max_position_embeddings."""
    if max_positions and prompt_len > max_positions:
        # a warning, not an error: RoPE has no hard limit and transformers runs it too, but positions past the
        # trained length are extrapolation, and answers degrade there
        print(f"warning: the prompt is {prompt_len} tokens, more than the model's max_position_embeddings "
              f"({max_positions}); the answer may be unreliable", file=sys.stderr)
    if not timings:
        print("no tokens generated", file=sys.stderr)
        return
    steps = n_tokens - 1
    rate = f"{steps / timings['decode_s']:.1f} tokens/s" if steps > 0 and timings["decode_s"] > 0 else "n/a"
    print(f"prefill: {prompt_len} tokens in {timings['prefill_s']:.3f} s; decode: {steps} steps at {rate}",
          file=sys.stderr)


# -----------------------------------------------------------------------------
# --eval: a records file answered in batches, scored, written


PLAIN_SIDE = 512  # a plain model's image is limited to this long side, as VPTDataset (image_resolution) trained it


class PlainEngine:
    """vpt.Engine's interface for a plain Qwen2-VL (no perception rounds): answer(requests) runs one left-padded
    M.generate over the batch; a row's answer ends at its first stop id, and the batch when every row has stopped."""

    def __init__(self, model, tok, img_cfg, max_new_tokens, temperature, top_k, top_p, generator):
        self.model, self.tok, self.img_cfg, self.max_new_tokens = model, tok, img_cfg, max_new_tokens
        self.sampling = (temperature, top_k, top_p)
        self.generator = generator

    @torch.no_grad()
    def answer(self, requests):
        tok, stop, dev = self.tok, self.tok.stop_ids, self.model.lm_head.weight.device
        prompts, pixels, grids = [], [], []
        for r in requests:
            pv, grid = data.process_images([data.limit_side(r.image, PLAIN_SIDE)] if r.image else [], self.img_cfg)
            content = f"{data.IMAGE_PLACEHOLDER}\n{r.prompt}" if r.image else r.prompt
            messages = [{"role": "system", "content": r.system}] if r.system is not None else []
            ids, _ = data.encode_chat(tok, messages + [{"role": "user", "content": content}], grid, True)
            prompts.append(ids)
            if pv is not None:  # the batch's images in row order, as model.embed and get_rope_index take them
                pixels.append(pv)
                grids.append(grid)
        T = max(len(p) for p in prompts)
        # left padding: every row's last prompt token is at the same slot, so one decode step serves them all
        ids = torch.tensor([[tok.endoftext_id] * (T - len(p)) + p for p in prompts], device=dev)  # (B, T)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)  # (B, T)
        pv, grid = (torch.cat(pixels).to(dev), torch.cat(grids).to(dev)) if pixels else (None, None)
        out = [[] for _ in requests]
        for step in M.generate(self.model, ids, mask, pv, grid, self.max_new_tokens, *self.sampling, stop,
                               self.generator):
            for row, t in zip(out, step.tolist()):
                if not (row and row[-1] in stop):  # a row that has stopped keeps being sampled with the batch
                    row.append(t)
        return [vpt.Result(data.answer_text(tok, [t for t in row if t not in stop]), row, [], p + row[:-1], len(p),
                           None, r.image, None) for row, p, r in zip(out, prompts, requests)]


def evaluate(args, path, is_vpt, dtype, gen):
    """Answers every record's first user turn (after its system message, if it has one) about its first image (if
    it has one; greedy by default), --batch_size records at a time with a progress bar on stderr, and scores each
    answer against the record's last assistant message (score). The summary goes to stdout, one line per record to
    --out."""
    records = data.read_records(args.eval)
    if not records:
        raise M.UserError(f"--eval {args.eval}: the file holds no records")
    root = args.image_root or os.path.dirname(os.path.abspath(args.eval))
    check_eval_images(records, args, root)
    texts = [eval_text(i, r, args.eval) for i, r in enumerate(records)]  # all checked before the model loads
    engine, grid = eval_engine(args, path, is_vpt, dtype, gen)
    rows = []
    with tqdm(total=len(records), desc="eval", unit="record", file=sys.stderr) as bar:  # with its ETA
        for start in range(0, len(records), args.batch_size):
            batch = range(start, min(start + args.batch_size, len(records)))
            asked = [eval_question(i, records[i], texts[i], args.eval, root) for i in batch]
            results = engine.answer([request for request, _ in asked])
            rows += [score(i, records[i], request.prompt, truth, result, grid)
                     for i, (request, truth), result in zip(batch, asked, results)]
            bar.update(len(batch))
    if args.out:
        write_predictions(args.out, rows)
        print(f"wrote {args.out}", file=sys.stderr)
    line, summary = summarize(rows)
    print(f"{args.eval} ({len(rows)} records, --vpt {args.vpt}): {line}")
    return summary


def check_eval_images(records, args, root):
    """data.check_images, with a missing image said with the option that fixes it: a records file copied away from
    its images (head -20 val.jsonl > elsewhere/val20.jsonl) still names them relative to the folder it came from."""
    for i, r in enumerate(records):
        for key in data.IMAGE_KEYS:
            for j, ref in enumerate(r.get(key) or []):
                file, _ = data.parse_image_ref(ref, root)
                if not os.path.isfile(file):
                    where = f"--image_root {args.image_root}" if args.image_root else "the records file's folder"
                    raise M.UserError(f"{args.eval}: record {i}: {key}[{j}] {ref!r}: no image file {file} (paths "
                                      f"resolve against {where}); pass --image_root DIR, the folder they are "
                                      f"relative to")
    data.check_images(records, args.eval, root)


def eval_engine(args, path, is_vpt, dtype, gen):
    """The checkpoint's model behind the engine interface, and its region grid (None for a plain model)."""
    if is_vpt:
        model, tok, img_cfg = vpt.from_pretrained(path, dtype=dtype, device=args.device)
        return vpt.Engine(model, tok, img_cfg, args.vpt, args.max_rounds, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, gen, args.max_regions, args.compile), model.vcfg.grid
    if args.vpt != "off":
        raise M.UserError(f"--vpt {args.vpt} needs a VPT checkpoint; {args.init_from} is a plain Qwen2-VL: evaluate "
                          f"it with --vpt off")
    model = M.from_pretrained(path, dtype, args.device)
    tok, img_cfg = data.Tokenizer(path), data.ImageConfig.from_dir(path)
    return PlainEngine(model, tok, img_cfg, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       gen), None


def eval_text(i, record, file):
    """A record -> (its system message or None, its first question without <image>, the truth: its last answer
    without data.ANSWER_PREFIX). Raises UserError for a question that holds another view's placeholder."""
    msgs = record["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None  # else the template's default
    question = msgs[1 if system is not None else 0]["content"].replace(data.IMAGE_PLACEHOLDER, "").strip()
    for ph, key in data.EXTRA_PLACEHOLDERS.values():  # an alignment-stage record: its view belongs in the question
        if ph in question:
            raise M.UserError(f"{file}: record {i}: its question holds {ph} ({key} in the user turn, as in an "
                              f"alignment-stage record); --eval asks about the first image alone, and the model "
                              f"asks for that view itself: evaluate records whose first question holds only <image>")
    return system, question, msgs[-1]["content"].removeprefix(data.ANSWER_PREFIX).strip()


def eval_question(i, record, text, file, root):
    """A record and its eval_text -> (Request of its first question, the truth)."""
    system, question, truth = text
    try:  # uncapped: the engine limits the view itself, and crops come from the full-resolution image
        image = data.open_image(record["images"][0], root, 10 ** 9) if record.get("images") else None
    except M.UserError as e:
        raise M.UserError(f"{file}: record {i}: images[0]: {e}") from None
    return vpt.Request(image, question, system), truth


def score(i, record, question, truth, result, grid):
    """One record's line of --out: the answer, its perception rounds (a region's cells, its crop box and, when the
    record has a "box", the IoU and IoGT of the selected cells without the crop margin, the paper's Table S2) and
    its scores: exact match (correct), VQA-normalised match and ANLS; the record's "kind" and, for a VPT model and a
    record with a box, whether the first region is exactly the box's cells (cells_right)."""
    rounds = []
    for rd in result.rounds:
        entry = {"kind": rd.kind}
        if rd.kind == "region":
            entry.update(cells=[list(rd.cells[0]), list(rd.cells[1])], box=list(rd.box))
            if "box" in record:
                cells = vpt.cells_to_box(*rd.cells, *result.original.size, grid, margin=0)
                entry["iou"], entry["iogt"] = box_overlap(cells, record["box"])
        rounds.append(entry)
    exact = result.text == truth
    row = dict(index=i, question=question, answer=result.text, truth=truth, rounds=rounds, exact=exact,
               normalised=vqa_normalize(result.text) == vqa_normalize(truth), anls=anls(result.text, [truth]),
               correct=exact)
    if "kind" in record:  # synth.py's families ("digits, 3 shapes", "counts"), scored apart by summarize
        row["kind"] = record["kind"]
    if "box" in record and grid is not None:  # the first region exactly on the box's cells (no round: not)
        first = next((rd.cells for rd in result.rounds if rd.kind == "region"), None)
        want = vpt.box_to_cells(record["box"], *result.original.size, grid)
        row["cells_right"] = first is not None and (first[0][0], first[1][0], first[0][-1], first[1][-1]) == want
    return row


def summarize(rows):
    """Rows of score -> (the summary lines, their numbers): the means over records, perception rounds per record,
    the region IoU / IoGT over the region rounds that have them, and a line per record kind (records that name
    one): exact match and, where records have a box, the share whose first region is the box's cells."""
    n = len(rows)
    rounds = [rd for row in rows for rd in row["rounds"]]
    overlaps = [rd for rd in rounds if "iou" in rd]
    s = dict(accuracy=sum(r["exact"] for r in rows) / n, normalised=sum(r["normalised"] for r in rows) / n,
             anls=sum(r["anls"] for r in rows) / n, region=sum(rd["kind"] == "region" for rd in rounds) / n,
             reencode=sum(rd["kind"] == "reencode" for rd in rounds) / n,
             iou=sum(rd["iou"] for rd in overlaps) / len(overlaps) if overlaps else None,
             iogt=sum(rd["iogt"] for rd in overlaps) / len(overlaps) if overlaps else None)
    line = (f"exact match {s['accuracy']:.3f}, VQA-normalised {s['normalised']:.3f}, ANLS {s['anls']:.3f}; "
            f"perception: region {s['region']:.2f}, re-encode {s['reencode']:.2f}")
    if overlaps:
        line += f"; region IoU {s['iou']:.3f}, IoGT {s['iogt']:.3f}"
    s["kinds"] = {}
    for kind in sorted({r["kind"] for r in rows if "kind" in r}):
        of = [r for r in rows if r.get("kind") == kind]
        boxed = [r["cells_right"] for r in of if "cells_right" in r]
        s["kinds"][kind] = dict(accuracy=sum(r["exact"] for r in of) / len(of),
                                cells=sum(boxed) / len(boxed) if boxed else None)
        line += f"\n  {kind} ({len(of)} records): exact match {s['kinds'][kind]['accuracy']:.3f}"
        if boxed:  # picking one of N shapes at random shows as 1/N
            line += f", region cells right {s['kinds'][kind]['cells']:.3f}"
    return line, s


def write_predictions(path, rows):
    """One JSON line per record, through model.atomic_write: an interrupted run never leaves half a file at path."""
    M.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(row) + "\n" for row in rows)))


def box_overlap(pred, gt):
    """(IoU, IoGT): intersection over union, and over the ground-truth box's area (the paper's Table S2)."""
    iw = max(0, min(pred[2], gt[2]) - max(pred[0], gt[0]))
    ih = max(0, min(pred[3], gt[3]) - max(pred[1], gt[1]))
    inter = iw * ih
    area_pred = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_gt = (gt[2] - gt[0]) * (gt[3] - gt[1])
    return inter / (area_pred + area_gt - inter), inter / area_gt


# The VQA answer normalisation: processPunctuation and processDigitArticle of the official VQA evaluation
# (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py)
VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
VQA_NUMBERS = {"none": "0", **{w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine "
                                                                "ten".split())}}
VQA_ARTICLES = ("a", "an", "the")
# the contracted words of vqaEval.py's contractions table, which maps each spelling with one apostrophe left out to
# its word (its "I'm"-style keys are capitalised and never match the lower-cased text, so they are left out)
VQA_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've").split()
VQA_CONTRACTIONS = {w[:k] + w[k + 1:]: w for w in VQA_CONTRACTED for k, c in enumerate(w) if c == "'"}


def vqa_normalize(text):
    """An answer as the VQA evaluation compares it: "Two dogs." -> "2 dogs". Newlines and tabs become spaces; a
    punctuation mark next to a space is dropped, as is every mark when the text has a digit,digit comma ("1,000" ->
    "1000"), else it becomes a space ("yes/no" -> "yes no"); a period not followed by a digit goes; then lower case,
    number words zero..ten (and "none") -> digits, the articles a/an/the dropped, and apostrophe-less contractions
    restored ("dont" -> "don't"). Both the answer and the truth are normalised: vqaEval.py treats its ten human
    answers only with processPunctuation (they were normalised when collected); a records file's truth was not."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    comma_number = re.search(r"\d,\d", text) is not None
    out = text
    for p in VQA_PUNCT:  # vqaEval.py decides on the text before any replacement, as here
        out = out.replace(p, "" if comma_number or p + " " in text or " " + p in text else " ")
    # vqaEval.py's periodStrip as written: its "(?!<=\d)" is a lookahead (the lookbehind "(?<!\d)" was meant), so
    # every period not followed by a digit is removed, "2." included
    out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out)
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


ANLS_THRESHOLD = 0.5  # tau of Biten et al. 2019: a normalised distance of 0.5 or more scores 0


def levenshtein(a, b):
    """The fewest single-character insertions, deletions and substitutions that turn a into b (Wagner-Fischer,
    one row of the table at a time)."""
    prev = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(answer, truths, threshold=ANLS_THRESHOLD):
    """Average Normalized Levenshtein Similarity for one question (Biten et al. 2019, "Scene Text Visual Question
    Answering", ICCV; DocVQA's metric, Mathew et al. 2021): the best over the truths of 1 - NL, where NL is the
    edit distance over the longer string's length, and 0 where NL >= threshold. Case-insensitive, with runs of
    whitespace as one space, as the Robust Reading Competition's evaluation script compares them (its InfographicVQA
    version is packaged as github.com/shunk031/ANLS). A one-character typo in a 14-character answer scores 13/14."""
    a, best = " ".join(answer.lower().split()), 0.0
    for truth in truths:
        t = " ".join(truth.lower().split())
        nl = levenshtein(a, t) / max(len(a), len(t), 1)  # two empty strings: distance 0
        best = max(best, 1 - nl if nl < threshold else 0.0)
    return best


if __name__ == "__main__":
    try:
        main()
    except (M.UserError, OSError) as e:  # the user's options, files or network: one line; a bug keeps its traceback
        sys.exit(f"sample.py: error: {e}")

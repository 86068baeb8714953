"""
Benchmarks, each reported as a ratio against a baseline measured in the same run (transformers, or our slow path).
    python bench.py load [--preset qwen2-vl-2b]   load time and peak RSS of a random checkpoint of the real shape, bf16
    python bench.py vpt                           a region-selection answer: one continuous KV cache vs the authors'
                                                  second round (a fresh prefill of the whole transcript), mid-size
                                                  model; then SAM-L's share of a re-encode answer's time
Needs requirements-test.txt (transformers is the baseline, never a runtime dependency).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import data
import encoders
import model as M
import vpt


def make_checkpoint(preset, path, dtype=torch.bfloat16):
    """A random checkpoint of a preset's exact shape in the Hub layout (flat config.json + model.safetensors)."""
    from safetensors.torch import save_file
    cfg = M.QwenConfig(**M.PRESETS[preset])
    with torch.device("meta"):
        shapes = {k: p.shape for k, p in M.Qwen2VL(cfg).named_parameters()}  # a tied lm_head appears once
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)


def load_once(impl, path):
    """Runs in a fresh process so ru_maxrss is this loader's peak alone."""
    t0 = time.perf_counter()
    if impl == "ours":
        m = M.from_pretrained(path, dtype=torch.bfloat16)
    else:
        from transformers import Qwen2VLForConditionalGeneration
        m = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    dt = time.perf_counter() - t0
    n = sum(p.numel() for p in m.parameters())
    print(json.dumps(dict(seconds=dt, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          params=n)))


def bench_load(preset):
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        make_checkpoint(preset, d)
        size = os.path.getsize(os.path.join(d, "model.safetensors")) / 2**30
        print(f"{preset}: random bf16 checkpoint, {size:.2f} GiB on disk (made in {time.perf_counter() - t0:.0f} s)")
        res = {}
        for impl in ("ours", "transformers"):
            out = subprocess.run([sys.executable, "-c", f"import bench; bench.load_once({impl!r}, {d!r})"],
                                 cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                                 check=True)
            res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{impl:>12}: {res[impl]['seconds']:.2f} s, peak RSS {res[impl]['peak_rss_gib']:.2f} GiB, "
                  f"{res[impl]['params']:,} parameters")
        o, t = res["ours"], res["transformers"]
        print(f"ratio ours/transformers: time {o['seconds'] / t['seconds']:.2f}x, "
              f"peak RSS {o['peak_rss_gib'] / t['peak_rss_gib']:.2f}x")


def mid_model(encoder="dino"):
    """A random mid-size VPT model (50M parameters; the sam variant adds SAM-L's real shape) with a small trained
    tokenizer."""
    with tempfile.TemporaryDirectory() as d:
        tok = data.train_tokenizer(["What number is on the red triangle?", "Now answer the question. Seven."], 300, d)
    tokens = vpt.add_tokens(tok, encoder)
    cfg = M.QwenConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, mrope_section=(8, 12, 12),
                       image_token_id=tok.image_pad_id, vision_start_token_id=tok.vision_start_id,
                       vision_end_token_id=tok.vision_end_id, vision=dict(depth=6, embed_dim=384, num_heads=6,
                                                                          hidden_size=512))
    vcfg = vpt.VPTConfig(encoder=encoder,
                         dino=encoders.DinoConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6))
    return vpt.VPT(cfg, vcfg, tokens).eval(), tok


def bench_vpt(answer_tokens=32, repeats=3):
    torch.manual_seed(0)
    model, tok = mid_model("dino")
    vcfg = model.vcfg
    n = sum(p.numel() for p in model.parameters())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    img_cfg = data.ImageConfig()
    q = "What number is on the red triangle?"

    def ours():
        s = vpt.Sampler(model, tok, img_cfg, "region", max_new_tokens=6 + answer_tokens)
        s.stop = set()  # a fixed answer length, so both sides decode the same number of tokens
        out = list(s.generate(image, q))
        return s, out[6:]

    def theirs(s):
        """Round 1 (prefill + the 6 region tokens), then round 2 as the authors' harness runs it: the transcript
        up to the new assistant turn prefilled from scratch, both images through the ViT again, then decode."""
        view = data.limit_side(image, vcfg.image_resolution)
        pv, grid = data.process_images([view], img_cfg)
        prompt = torch.tensor([s.ids[:s.prompt_len]])
        list(M.generate(model, prompt, None, pv, grid, max_new_tokens=6))
        crop = data.limit_side(image.crop(s.rounds[0].box), vcfg.image_resolution)
        pv2, grid2 = data.process_images([view, crop], img_cfg)
        transcript = torch.tensor([s.ids[:len(s.ids) - answer_tokens + 1]])  # through "<|im_start|>assistant\n"
        return [int(t) for t in M.generate(model, transcript, None, pv2, grid2, max_new_tokens=answer_tokens)]

    with torch.no_grad():
        s, answer = ours()  # warm-up, and the transcript for the baseline
        same = theirs(s) == answer
        t_ours, t_theirs = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s, _ = ours()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs(s)
            t_theirs.append(time.perf_counter() - t0)
    a, b = min(t_ours), min(t_theirs)
    print(f"random VPT model, {n / 1e6:.1f} M parameters, 448x448 image ({s.prompt_len} prompt tokens), crop "
          f"{s.rounds[0].box}, {answer_tokens} answer tokens, CPU, best of {repeats}")
    print(f"continuous cache: {a:.3f} s; re-prefill for round two: {b:.3f} s; ratio {a / b:.2f}x; "
          f"same answer tokens: {same}")
    bench_sam_share(image, q, answer_tokens)


def bench_sam_share(image, q, answer_tokens):
    """One re-encode answer of the same model with SAM-L's real shape (random weights, 1024 px) as its re-encoder:
    the share of the answer's time that SAM's image encoder takes. One run: SAM-L alone is minutes on a small CPU."""
    torch.manual_seed(0)
    model, tok = mid_model("sam")  # SamConfig's defaults are sam-vit-large's
    n_sam = sum(p.numel() for p in model.seg_model.parameters())
    spent = []
    model.seg_model.register_forward_pre_hook(lambda m, args: spent.append(-time.perf_counter()))
    model.seg_model.register_forward_hook(lambda m, args, out: spent.append(spent.pop() + time.perf_counter()))
    s = vpt.Sampler(model, tok, data.ImageConfig(), "reencode", max_new_tokens=1 + answer_tokens)
    s.stop = set()  # a fixed answer length, as above
    with torch.no_grad():
        t0 = time.perf_counter()
        list(s.generate(image, q))
        total = time.perf_counter() - t0
    print(f"re-encode answer with SAM-L ({n_sam / 1e6:.0f} M parameters, random, 1024 px) on the same LLM, "
          f"{answer_tokens} answer tokens, CPU, one run: {total:.2f} s, of which SAM {spent[0]:.2f} s "
          f"({100 * spent[0] / total:.0f} %)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    load = sub.add_parser("load", help="load time and peak RSS against transformers")
    load.add_argument("--preset", default="qwen2-vl-2b", choices=list(M.PRESETS), help="model shape (default 2B)")
    sub.add_parser("vpt", help="a region-selection answer: one continuous KV cache against re-prefilling")
    args = p.parse_args(argv)
    if args.bench == "load":
        bench_load(args.preset)
    else:
        bench_vpt()


if __name__ == "__main__":
    main()

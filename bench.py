"""
Benchmarks, each reported as a ratio against a baseline measured in the same run (transformers, or our slow path).
    python bench.py load [--preset qwen2-vl-2b]   load time and peak RSS of a random checkpoint of the real shape, bf16
    python bench.py decode                        prefill + greedy decode tokens/s, ours vs transformers, tiny-to-mid model on CPU
Needs requirements-test.txt (transformers is the baseline, never a runtime dependency).
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import model as M


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
            out = subprocess.run([sys.executable, __file__, "_load", impl, d], capture_output=True, text=True, check=True)
            res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{impl:>12}: {res[impl]['seconds']:.2f} s, peak RSS {res[impl]['peak_rss_gib']:.2f} GiB, "
                  f"{res[impl]['params']:,} parameters")
        o, t = res["ours"], res["transformers"]
        print(f"ratio ours/transformers: time {o['seconds'] / t['seconds']:.2f}x, "
              f"peak RSS {o['peak_rss_gib'] / t['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1] == "_load":
        load_once(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "load":
        bench_load(sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--preset" else "qwen2-vl-2b")
    else:
        sys.exit(__doc__)

"""
Benchmarks, each reported as a ratio against a baseline measured in the same run (transformers, or our slow path).
    python bench.py load [--preset qwen2-vl-2b]   load time and peak RSS of a random checkpoint of the real shape, bf16
    python bench.py vpt                           a region-selection answer: one continuous KV cache vs the authors'
                                                  second round (a fresh prefill of the whole transcript), mid-size
                                                  model; region and re-encode answers vs a plain one of the same
                                                  length; the batch sweep (records/s against batch 1); then SAM-L's
                                                  share of a re-encode answer's time
    python bench.py train [--steps 3]             a training step (forward, backward, AdamW) of the 2B widths at
                                                  reduced depth: tokens/s and MFU vs transformers, and the VPT path
    python bench.py infer                         prefill and decode against transformers: 2B widths at reduced
                                                  depth and the tiny preset, fp32, CPU time on one thread
    python bench.py gpu                           on a GPU, the 2B shape in bf16: batch-1 decode against
                                                  transformers and the memory-bandwidth roofline (eager and
                                                  compiled), the batch sweep, and training tokens/s and MFU
Needs requirements-test.txt (transformers is the baseline, never a runtime dependency).
"""
import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

import data
import encoders
import model as M
import train
import vpt


def make_checkpoint(preset, path, dtype=torch.bfloat16, **overrides):
    """A random checkpoint of a preset's exact shape (config fields in overrides replace the preset's) in the Hub
    layout (flat config.json + model.safetensors)."""
    from safetensors.torch import save_file
    cfg = M.QwenConfig(**{**M.PRESETS[preset], **overrides})
    with torch.device("meta"):
        shapes = {k: p.shape for k, p in M.Qwen2VL(cfg).named_parameters()}  # a tied lm_head appears once
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)


def load_once(impl, path):
    """Runs in a fresh process so ru_maxrss is this loader's peak alone. The time is the load's alone: each
    library is imported before the clock starts."""
    if impl == "ours":
        load = functools.partial(M.from_pretrained, dtype=torch.bfloat16)
    else:
        from transformers import Qwen2VLForConditionalGeneration
        load = functools.partial(Qwen2VLForConditionalGeneration.from_pretrained, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    m = load(path)
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


def fixed_length(model, tok, img_cfg, mode, n_tokens, **kw):
    """An engine whose answers are exactly n_tokens long (no stop ids), so that both sides of a comparison decode the
    same number of tokens."""
    engine = vpt.Engine(model, tok, img_cfg, mode, max_new_tokens=n_tokens, **kw)
    engine.stop = set()
    return engine


def bench_vpt(answer_tokens=32, repeats=3):
    torch.manual_seed(0)
    model, tok = mid_model("dino")
    vcfg = model.vcfg
    n = sum(p.numel() for p in model.parameters())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    img_cfg = data.ImageConfig()
    q = "What number is on the red triangle?"
    L = 6 + answer_tokens  # a region answer: 6 region tokens, then the answer
    engines = {mode: fixed_length(model, tok, img_cfg, mode, L) for mode in ("region", "reencode", "off")}

    def ours(mode="region"):
        return engines[mode].answer([vpt.Request(image, q)])[0]

    def theirs(res):
        """Round 1 (prefill + the 6 region tokens), then round 2 as the authors' harness runs it: the transcript
        up to the new assistant turn prefilled from scratch, both images through the ViT again, then decode."""
        view = data.limit_side(image, vcfg.image_resolution)
        pv, grid = data.process_images([view], img_cfg)
        prompt = torch.tensor([res.transcript[:res.prompt_len]])
        list(M.generate(model, prompt, None, pv, grid, max_new_tokens=6))
        crop = data.limit_side(image.crop(res.rounds[0].box), vcfg.image_resolution)
        pv2, grid2 = data.process_images([view, crop], img_cfg)
        transcript = torch.tensor([res.transcript[:len(res.transcript) - answer_tokens + 1]])  # to "assistant\n"
        return [int(t) for t in M.generate(model, transcript, None, pv2, grid2, max_new_tokens=answer_tokens)]

    with torch.no_grad():
        res = ours()  # warm-up, and the transcript for the baseline
        same = theirs(res) == res.ids[6:]
        times = {k: [] for k in ("region", "theirs", "reencode", "off")}
        for _ in range(repeats):  # alternating, so that a change of load hits every side alike
            for mode in ("region", "reencode", "off"):
                t0 = time.perf_counter()
                ours(mode)
                times[mode].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs(res)
            times["theirs"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"random VPT model, {n / 1e6:.1f} M parameters, 448x448 image ({res.prompt_len} prompt tokens), "
          f"{answer_tokens} answer tokens, CPU, best of {repeats}")
    print(f"region answer, continuous cache: {best['region']:.3f} s; re-prefill for round two: {best['theirs']:.3f} s;"
          f" ratio {best['region'] / best['theirs']:.2f}x; same answer tokens: {same}")
    print(f"against a plain answer of the same {L} tokens ({best['off']:.3f} s): "
          f"region {best['region'] / best['off']:.2f}x, re-encode {best['reencode'] / best['off']:.2f}x the time")
    bench_batch(model, tok, img_cfg)
    bench_sam_share(image, q, answer_tokens)


def bench_batch(model, tok, img_cfg, n_requests=16, answer_tokens=16, sizes=(1, 4, 8, 16), sweeps=1):
    """Evaluation throughput: n_requests region questions about different 224 px images, answered batch by batch
    (sample.py --eval --batch_size), records/s against batch 1, the share of time in prefill and in decode steps,
    and whether the greedy answers are identical. Each of `sweeps` sweeps over the sizes is its own table: on an
    H200 the first, which meets each shape for the first time, ran batch 1 at about half the records/s of later
    sweeps (first-use costs, presumably cuBLAS's heuristics and cuDNN's attention plans)."""
    rng = np.random.default_rng(1)
    reqs = [vpt.Request(Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)), f"Where is shape {i}?")
            for i in range(n_requests)]
    engine = fixed_length(model, tok, img_cfg, "region", 6 + answer_tokens)
    spent = {"prefill": 0.0, "decode": 0.0}  # seconds in each kind of step, of the current batch size
    for kind in spent:  # the engine's own step methods, timed in place
        step = getattr(engine, kind)

        def timed(*args, kind=kind, step=step):
            t0 = time.perf_counter()
            out = step(*args)
            spent[kind] += time.perf_counter() - t0
            return out
        setattr(engine, kind, timed)
    with torch.no_grad():
        engine.answer(reqs[:2])  # warm-up
        for sweep in range(sweeps):
            rate, answers, share = {}, {}, {}
            for bs in sizes:
                spent.update(dict.fromkeys(spent, 0.0))
                t0 = time.perf_counter()
                answers[bs] = [r.ids for i in range(0, n_requests, bs) for r in engine.answer(reqs[i:i + bs])]
                total = time.perf_counter() - t0
                rate[bs], share[bs] = n_requests / total, (spent["prefill"] / total, spent["decode"] / total)
            print(f"batched region answers, {n_requests} requests of 224x224, {6 + answer_tokens} tokens each, "
                  f"sweep {sweep + 1} of {sweeps}:")
            print("| batch | records/s | vs batch 1 | time in prefill / decode steps | same answers as batch 1 |\n"
                  "|---|---|---|---|---|")
            for bs in sizes:
                print(f"| {bs} | {rate[bs]:.2f} | {rate[bs] / rate[sizes[0]]:.2f}x | {share[bs][0]:.0%} / "
                      f"{share[bs][1]:.0%} | {answers[bs] == answers[sizes[0]]} |")
    if engine.dev.type == "cpu":
        # prefill (the ViT and the prompt's and crops' tokens) is compute-bound on a CPU at the mid model's size: a
        # batch of 8 takes 8 times as long, so however cheap batched decode gets, batch 1's prefill share bounds the
        # gain (a tiny model's prefill is overhead-bound and gains a little from batching too)
        print(f"batch {sizes[0]} spends {share[sizes[0]][0]:.0%} of its time in prefill steps: if a batch's prefill "
              f"costs as much per record, batching gives at most {1 / share[sizes[0]][0]:.2f}x")


def bench_sam_share(image, q, answer_tokens):
    """One re-encode answer of the same model with SAM-L's real shape (random weights, 1024 px) as its re-encoder:
    the share of the answer's time that SAM's image encoder takes. One run: SAM-L alone is minutes on a small CPU."""
    torch.manual_seed(0)
    model, tok = mid_model("sam")  # SamConfig's defaults are sam-vit-large's
    n_sam = sum(p.numel() for p in model.seg_model.parameters())
    spent = []
    model.seg_model.register_forward_pre_hook(lambda m, args: spent.append(-time.perf_counter()))
    model.seg_model.register_forward_hook(lambda m, args, out: spent.append(spent.pop() + time.perf_counter()))
    engine = fixed_length(model, tok, data.ImageConfig(), "reencode", 1 + answer_tokens)
    with torch.no_grad():
        t0 = time.perf_counter()
        engine.answer([vpt.Request(image, q)])
        total = time.perf_counter() - t0
    print(f"re-encode answer with SAM-L ({n_sam / 1e6:.0f} M parameters, random, 1024 px) on the same LLM, "
          f"{answer_tokens} answer tokens, CPU, one run: {total:.2f} s, of which SAM {spent[0]:.2f} s "
          f"({100 * spent[0] / total:.0f} %)")


TRAIN_DEPTH = 2  # LLM layers and ViT / DINOv2 blocks of the training benchmark: the 2B widths on a CPU's budget
TRAIN_ANSWER = 150  # supervised tokens of its sample
TRAIN_STEPS = 3  # timed steps of each side in bench.py gpu


def train_records(d):
    """In directory d: a small tokenizer with the perception tokens, a 308x308 image (121 image tokens) and two
    records of one sample each: a question whose answer has TRAIN_ANSWER supervised tokens (plain.jsonl, about 340
    tokens) and the same with a DINOv2 control turn before the answer (vpt.jsonl: the control tokens and 256 DINOv2
    slots more). Returns the tokenizer, its perception tokens and the image config."""
    words = "What number is on the red triangle? Now answer the question. The cat sits on the red mat.".split()
    tok = data.train_tokenizer([" ".join(words)], 300, d)
    tokens = vpt.add_tokens(tok, "dino")
    img_cfg = data.ImageConfig()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (308, 308, 3), dtype=np.uint8)).save(f"{d}/a.png")
    question = "<image>\n" + " ".join(words[:7])
    answer = []
    while len(tok.encode(" ".join(answer))) < TRAIN_ANSWER - 1:  # the answer and <|im_end|> are supervised
        answer.append(words[len(answer) % len(words)])
    answer = " ".join(answer)
    act = "<|detection_action_start|><|detection_action|><|detection_action_end|>"
    plain = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
             "images": ["a.png"]}
    turns = [plain["messages"][0], {"role": "assistant", "content": act},
             {"role": "user", "content": "<detection_image>"}, {"role": "assistant", "content": answer}]
    with_vpt = {"messages": turns, "images": ["a.png"], "detection_images": ["a.png"]}
    for name, record in (("plain", plain), ("vpt", with_vpt)):
        with open(f"{d}/{name}.jsonl", "w") as f:
            f.write(json.dumps(record) + "\n")
    return tok, tokens, img_cfg


def trainer(model, forward):
    """step(batch) -> (seconds, loss) of one training step of model: forward(model, batch) gives the loss, then the
    backward pass and AdamW over what trains: fused, as train.py and transformers' Trainer (its default optim for
    torch >= 2.8, "adamw_torch_fused") both use it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step(batch):
        t0 = time.perf_counter()
        loss = forward(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()  # on a GPU this waits for the whole step: the copy is queued after the optimizer's kernels
        return time.perf_counter() - t0, loss
    return step


def time_steps(sides, steps):
    """{name: (step, batch)} -> {name: (seconds of `steps` steps after a warm-up step, the warm-up's loss)}. The
    sides take turns step by step, so the load other processes put on the CPU falls on each alike."""
    times, first = {name: [] for name in sides}, {}
    for i in range(steps + 1):
        for name, (step, batch) in sides.items():
            t, loss = step(batch)
            first.setdefault(name, loss)
            times[name] += [t] if i else []
    return {name: (times[name], first[name]) for name in sides}


def matmul_peak(n=2048, repeats=10):
    """FLOP/s of this CPU's best fp32 matmul (n x n) of `repeats`, the denominator of MFU here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def to_transformers(model, hf):
    """Copies our weights into transformers' model (its in-memory names: model.language_model.*, model.visual.*)."""
    renames = {new: old for old, new in M.KEY_RENAMES}
    sd = {}
    for k, v in model.state_dict().items():
        prefix = next((p for p in renames if k.startswith(p)), None)
        sd[renames[prefix] + k[len(prefix):] if prefix else k] = v
    hf.load_state_dict(sd, strict=True)


def hf_inputs(ids, pixel_values, image_grid_thw, cfg, padding_mask=None):
    """Our batch tensors as transformers' Qwen2VLForConditionalGeneration takes them (its M-RoPE index needs
    mm_token_type_ids)."""
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids) if padding_mask is None else padding_mask,
                pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                mm_token_type_ids=(ids == cfg.image_token_id).int())


def hf_train_batch(b, cfg):
    """A collated training batch for transformers: its labels unshifted (it shifts them itself)."""
    labels = torch.cat([torch.full_like(b["targets"][:, :1], data.IGNORE_INDEX), b["targets"][:, :-1]], 1)
    return dict(hf_inputs(b["input_ids"], b["pixel_values"], b["image_grid_thw"], cfg, b["padding_mask"]),
                labels=labels)


def freeze_hf_vision(m):
    """transformers' model trains as ours in the finetune stage: everything but the ViT."""
    for n, p in m.named_parameters():
        p.requires_grad = not n.startswith("model.visual.")
    return m


def bench_train(steps=3):
    """Training steps of the 2B widths (vocabulary 151,936, LLM 1536 wide, ViT 1280, DINOv2-L 1024) at TRAIN_DEPTH
    layers, the ViT (and DINOv2) frozen as in the authors' stage 2, fp32 on the CPU, one sample: nanoVPT's Qwen2-VL
    and transformers' Qwen2VLForConditionalGeneration with the same weights on the same batch (forward with the
    loss, backward, AdamW over what trains), then nanoVPT's one-pass VPT step on the sample with a control turn.
    tokens/s counts real tokens; MFU is train.batch_flops (what the step needs: transformers computes the logits at
    every position, we only at the supervised ones, and that difference counts as its overhead) over this CPU's
    best fp32 matmul rate (measured before and after the steps). Each side's best step of `steps` after a warm-up
    step, nanoVPT and transformers taking turns: other processes share the CPU."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    with tempfile.TemporaryDirectory() as d:
        tok, tokens, img_cfg = train_records(d)
        batches = {}
        for name, encoder in (("plain", None), ("vpt", "dino")):
            ds = data.VPTDataset(f"{d}/{name}.jsonl", tok, img_cfg, encoder, tokens.pad, tokens.act)
            batches[name] = data.collate([ds[0]], tok.endoftext_id, tok.image_pad_id, img_cfg.merge_size)
    depth = dict(num_hidden_layers=TRAIN_DEPTH, vision=dict(depth=TRAIN_DEPTH))
    cfg = M.QwenConfig(**depth, image_token_id=tok.image_pad_id, vision_start_token_id=tok.vision_start_id,
                       vision_end_token_id=tok.vision_end_id, eos_token_id=tok.im_end_id)
    stage = train.parse_config(["--stage=finetune"])  # everything but the vision encoders trains
    peak = matmul_peak()

    torch.manual_seed(0)
    ours = M.Qwen2VL(cfg)
    train.set_trainable(ours, stage)
    hf = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg.to_hf()))
    to_transformers(ours, hf)  # the same weights, so the first losses must agree
    freeze_hf_vision(hf)
    b = batches["plain"]
    hf_batch = hf_train_batch(b, cfg)
    flops = train.batch_flops(ours, b)  # the same model FLOPs for both sides
    timed = time_steps({"nanoVPT Qwen2-VL": (trainer(ours, lambda m, b: m(b, b["targets"])[1]), b),
                        "transformers Qwen2-VL": (trainer(hf, lambda m, b: m(**b).loss), hf_batch)}, steps)
    results = {name: (b, flops, *timed[name]) for name in timed}  # name: (batch, FLOPs, step times, first loss)
    del ours, hf, timed  # 5 GB of weights, gradients and AdamW state each

    torch.manual_seed(0)
    vcfg = vpt.VPTConfig(encoder="dino", dino=encoders.DinoConfig(num_hidden_layers=TRAIN_DEPTH))
    model = vpt.VPT(cfg, vcfg, tokens)
    train.set_trainable(model, stage)
    b = batches["vpt"]
    timed = time_steps({"VPT": (trainer(model, lambda m, b: m(b, b["targets"])[1]), b)}, steps)
    results["nanoVPT VPT one-pass"] = (b, train.batch_flops(model, b), *timed["VPT"])
    peak = max(peak, matmul_peak())
    print(f"2B widths at depth {TRAIN_DEPTH} (LLM layers, ViT and DINOv2 blocks), fp32, CPU with "
          f"{torch.get_num_threads()} threads (best matmul {peak / 1e9:.0f} GFLOP/s); best of {steps} steps after a "
          f"warm-up")
    tps = {}
    for name, (batch, flops, times, loss) in results.items():
        T, sup = int(batch["padding_mask"].sum()), int((batch["targets"] != data.IGNORE_INDEX).sum())
        tps[name] = T / min(times)
        print(f"{name:>22}: {T} tokens ({sup} supervised), best step {min(times):.2f} s, {tps[name]:.1f} tokens/s, "
              f"MFU {flops / min(times) / peak * 100:.0f}% ({flops / 1e9:.0f} GFLOP a step), first loss {loss:.4f}")
    print(f"nanoVPT / transformers tokens/s: {tps['nanoVPT Qwen2-VL'] / tps['transformers Qwen2-VL']:.2f}x")


# -----------------------------------------------------------------------------
# python bench.py infer: prefill and decode against transformers

INFER_MODELS = {  # row name: (preset, config overrides)
    "2B widths, 4 LLM layers + 4 ViT blocks": ("qwen2-vl-2b", dict(num_hidden_layers=4, vision=dict(depth=4))),
    # the image specials at the top of the tiny 512-row vocabulary, as in the tests
    "tiny (64 wide)": ("tiny", dict(vision_start_token_id=509, vision_end_token_id=510, image_token_id=511)),
}
INFER_PROCESSES = 2  # fresh processes per model and implementation, alternating which goes first
INFER_REPEATS = 2  # prefills and decodes timed in each process, after one warm-up of each
INFER_NEW_TOKENS = 32


def infer_inputs(cfg):
    """A 448x448 random image (1024 patches, 256 image tokens) between 16 text tokens before and after, as a chat
    prompt places it: input_ids (1, T), pixel_values, image_grid_thw."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    pv, grid = data.process_images([image], data.ImageConfig())
    n_img = int(M.image_token_counts(grid, cfg.vision.spatial_merge_size).sum())
    text = torch.randint(0, 500, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = text[:16] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + text[16:]
    return torch.tensor([ids]), pv, grid


class Stamps:
    """A transformers streamer: generate calls put with the prompt, then with each new token; each new token is
    appended to stamps as (clock(), id) (int() waits for a GPU to produce it)."""

    def __init__(self, stamps, clock):
        self.stamps, self.clock, self.prompt = stamps, clock, True

    def put(self, t):
        if not self.prompt:
            t = int(t)  # first: on a GPU this waits for the token
            self.stamps.append((self.clock(), t))
        self.prompt = False

    def end(self):
        pass


def hf_decode(m, kw, n, stamps, clock):
    """A greedy generate of exactly n new tokens by transformers' model m on inputs kw, stamped into stamps."""
    m.generate(**kw, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
               streamer=Stamps(stamps, clock))


def infer_once(impl, path):
    """Runs in a fresh process: the best prefill time, ViT time and decode tokens/s of one implementation, in fp32.
    Prefill is the prompt's forward up to the first sampled token; decode speed is measured from the first token
    to the last of a greedy generate of INFER_NEW_TOKENS tokens (every row runs to the end: no stop token).
    Times are this process's CPU time on one thread: on shared cores wall time adds the waits for a core (+-15 %
    between runs at load 5 on 2 cores) and, with 2 threads, the wait for the second thread at every op (the tiny
    model's prefill: 0.42 s against 0.012 s on one thread)."""
    torch.set_num_threads(1)
    cfg = M.QwenConfig.from_hf(M.read_json(os.path.join(path, "config.json")))
    ids, pv, grid = infer_inputs(cfg)
    if impl == "ours":
        m = M.from_pretrained(path)

        def vit():
            m.visual(pv, grid)

        def prefill():
            next(M.generate(m, ids, None, pv, grid, max_new_tokens=1))

        def decode(stamps):
            for t in M.generate(m, ids, None, pv, grid, max_new_tokens=INFER_NEW_TOKENS):
                t = int(t)
                stamps.append((time.process_time(), t))
    else:
        from transformers import Qwen2VLForConditionalGeneration
        m = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        kw = hf_inputs(ids, pv, grid, cfg)

        def vit():
            m.model.visual(pv, grid)

        def prefill():
            m(**kw, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)

        def decode(stamps):
            hf_decode(m, kw, INFER_NEW_TOKENS, stamps, time.process_time)

    def timed(f):
        t0 = time.process_time()
        f()
        return time.process_time() - t0

    res = dict(prefill=[], vit=[], decode=[])
    with torch.no_grad():
        for _ in range(INFER_REPEATS + 1):  # the first round warms up
            res["prefill"].append(timed(prefill))
            res["vit"].append(timed(vit))
            stamps = []
            decode(stamps)
            assert len(stamps) == INFER_NEW_TOKENS, f"{impl} stopped after {len(stamps)} tokens"
            res["decode"].append((len(stamps) - 1) / (stamps[-1][0] - stamps[0][0]))  # tokens/s
    print(json.dumps(dict(prefill=min(res["prefill"][1:]), vit=min(res["vit"][1:]), decode=max(res["decode"][1:]),
                          tokens=[t for _, t in stamps])))


def bench_infer():
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for name, (preset, overrides) in INFER_MODELS.items():
        with tempfile.TemporaryDirectory() as d:
            make_checkpoint(preset, d, **overrides)
            best = {}
            for i in range(INFER_PROCESSES):
                for impl in (("ours", "transformers") if i % 2 == 0 else ("transformers", "ours")):
                    out = subprocess.run([sys.executable, "-c", f"import bench; bench.infer_once({impl!r}, {d!r})"],
                                         cwd=here, capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    b = best.setdefault(impl, r)
                    b.update(prefill=min(b["prefill"], r["prefill"]), vit=min(b["vit"], r["vit"]),
                             decode=max(b["decode"], r["decode"]))
        o, t = best["ours"], best["transformers"]
        same = "same" if o["tokens"] == t["tokens"] else "DIFFERENT"
        print(f"{name}: {same} greedy tokens", file=sys.stderr)
        rows += [(f"prefill, {name}", f"{o['prefill']:.3f} s vs {t['prefill']:.3f} s",
                  f"{o['prefill'] / t['prefill']:.2f}x the time"),
                 ("  of which the ViT", f"{o['vit']:.3f} s vs {t['vit']:.3f} s",
                  f"{o['vit'] / t['vit']:.2f}x the time"),
                 (f"decode, {name}", f"{o['decode']:.1f} vs {t['decode']:.1f} tokens/s",
                  f"{o['decode'] / t['decode']:.2f}x the speed")]
    print(f"CPU time, 1 thread, fp32, best of {INFER_PROCESSES} processes x {INFER_REPEATS} runs, "
          f"448 px image + 32 text tokens, {INFER_NEW_TOKENS} new tokens; load average {os.getloadavg()[0]:.1f}")
    print("| measure | nanoVPT vs transformers | ratio |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


# -----------------------------------------------------------------------------
# python bench.py gpu: the GPU goals of the speed issues at the real 2B shape in bf16, in one run of a few minutes

def mean_time(f, repeats, device):
    """Mean seconds of `repeats` calls of f after one warm-up call, the device synchronised before and after."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    f()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    sync()
    return (time.perf_counter() - t0) / repeats


def ceilings(device):
    """(bytes/s, FLOP/s) this device reaches: a 4 GiB device-to-device copy (bytes read + written) and a bf16 matmul
    of 8192^3 (a CPU gets 64 MiB and 1024^3): the denominators of the decode roofline and of MFU at measured peak."""
    big = device.type == "cuda"
    x = torch.empty(2**31 if big else 2**25, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    bandwidth = 2 * x.nbytes / mean_time(lambda: y.copy_(x), 10, device)
    del x, y
    n = 8192 if big else 1024
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    return bandwidth, 2 * n ** 3 / mean_time(lambda: a @ b, 10, device)


def decode_bytes(model, length):
    """Bytes a batch-1 decode step must read: the decoder layers' and final norm's weights, the lm_head matrix (the
    embedding table is read one row at a time) and the keys and values of `length` cached tokens."""
    c = model.cfg
    weights = sum(p.nbytes for p in [*model.model.layers.parameters(), model.model.norm.weight, model.lm_head.weight])
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * length * model.lm_head.weight.element_size()
    return weights + kv


def rate(stamps):
    """tokens/s from [(time, id)] of a generation, first token to last (the first comes with the prefill)."""
    return (len(stamps) - 1) / (stamps[-1][0] - stamps[0][0])


def gpu_decode(cfg, vcfg, tok, tokens, device, new_tokens, bandwidth, runs=2):
    """Batch-1 greedy decode of new_tokens tokens after a 448 px image and 32 text tokens, bf16: transformers'
    generate, ours, the Engine eager and compiled (the best of `runs` after a warm-up each), the compiled decode
    step alone (its CUDA graph replayed), against the copy-bandwidth roofline; each row printed as it is measured.
    Then the Engine's batch sweep."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    dtype, clock = torch.bfloat16, time.perf_counter
    ids, pv, grid = (t.to(device) for t in infer_inputs(cfg))
    torch.manual_seed(0)
    with torch.device(device):
        ours = M.Qwen2VL(cfg).to(dtype).eval()
        hf = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg.to_hf())).to(dtype).eval()
    to_transformers(ours, hf)
    kw = hf_inputs(ids, pv, grid, cfg)
    need = decode_bytes(ours, ids.size(1) + new_tokens // 2)  # at the answer's mean cache length
    roof = bandwidth / need
    print(f"\ndecode at batch 1, {cfg.num_hidden_layers} LLM layers x {cfg.hidden_size} wide, bf16, "
          f"{ids.size(1)}-token prompt (448 px image), {new_tokens} new tokens, best of {runs} after a warm-up. "
          f"Roofline: {need / 1e9:.2f} GB a token at {bandwidth / 1e12:.2f} TB/s = {roof:.0f} tokens/s")
    print("| path | tokens/s | vs transformers | of the roofline |\n|---|---|---|---|")
    base = []

    def row(name, r):
        base.append(r)
        print(f"| {name} | {r:.1f} | {r / base[0]:.2f}x | {r / roof:.0%} |", flush=True)

    def best(decode):
        out = []
        for _ in range(runs + 1):
            out.append([])
            decode(out[-1])
        return max(rate(s) for s in out[1:]), [t for _, t in out[-1]]

    def ours_decode(stamps):
        for t in M.generate(ours, ids, None, pv, grid, max_new_tokens=new_tokens):
            t = int(t)  # first: on a GPU this waits for the token
            stamps.append((clock(), t))

    def same(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    with torch.no_grad():
        r, hf_ids = best(lambda s: hf_decode(hf, kw, new_tokens, s, clock))
        row("transformers generate, eager", r)
        r, our_ids = best(ours_decode)
        row("nanoVPT model.generate, eager", r)
    del ours, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with torch.device(device):
        model = vpt.VPT(cfg, vcfg, tokens).to(dtype).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    request = [vpt.Request(image, "What number is on the red triangle?")]
    answers = []
    for compiled in (False, True):
        engine = fixed_length(model, tok, data.ImageConfig(), "off", new_tokens, compile=compiled)
        seen, step = [], engine.decode_step
        engine.decode_step = lambda *a: seen.append(a) or step(*a)  # the inputs of the last step, replayed below
        t0 = clock()
        r, got = best(lambda s: engine.answer(request, lambda i, t: s.append((clock(), t))))
        answers.append(got)
        row(f"nanoVPT Engine, {'compiled' if compiled else 'eager'}", r)
    warm = clock() - t0  # the compiled engine's answers, the first of which compiles
    ids_, pos, cache = seen[-1]

    def replay():
        step(ids_, pos, cache)
    with torch.no_grad():  # as in the engine: grad mode is part of what the compiled step was specialised for
        row("  its decode step alone (replayed)", 1 / mean_time(replay, 50, device))
    print(f"greedy tokens, bf16: transformers and model.generate agree on the first {same(hf_ids, our_ids)} of "
          f"{len(hf_ids)}, the eager and compiled engine on {same(*answers)} of {len(answers[0])}; the engine's chat "
          f"prompt is {engine.start(request[0]).prompt_len} tokens; the compiled engine's {runs + 1} answers took "
          f"{warm:.0f} s with its compile")
    if device.type == "cuda":  # where the compiled step's time goes: its kernels over 20 replays
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                replay()
            torch.cuda.synchronize(device)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    bench_batch(model, tok, data.ImageConfig(), sizes=(1, 4, 16), sweeps=2)


def gpu_train(cfg, vcfg, batches, device, steps, matmul_rate):
    """Training steps (forward, backward, fused AdamW) of the finetune stage, fp32 weights under bf16 autocast on
    a GPU (train.py's setting), each decoder layer compiled (train.py --compile=True): nanoVPT's Qwen2-VL and
    transformers' eager Qwen2VLForConditionalGeneration on the same plain batch, then nanoVPT's one-pass VPT step
    on the batch with control turns. The mean of `steps` steps after two warm-ups (the first compiles); MFU counts
    train.batch_flops."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stage = train.parse_config(["--stage=finetune"])
    plain = batches["plain"]
    hf_batch = hf_train_batch(plain, cfg)

    def ours(build):
        def make():
            m = build()
            train.set_trainable(m, stage)
            for layer in m.model.layers:
                layer.compile()
            return m
        return make

    def hf():
        return freeze_hf_vision(Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg.to_hf())))

    def autocast(forward):
        def run(m, b):
            with ctx:
                return forward(m, b)
        return run

    ours_loss = lambda m, b: m(b, b["targets"])[1]
    sides = {"transformers Qwen2-VL, eager": (hf, lambda m, b: m(**b).loss, hf_batch, "plain"),
             "nanoVPT Qwen2-VL, compiled": (ours(lambda: M.Qwen2VL(cfg)), ours_loss, plain, "plain"),
             "nanoVPT VPT one-pass, compiled": (ours(lambda: vpt.VPT(cfg, vcfg, batches["tokens"])), ours_loss,
                                                batches["vpt"], "vpt")}
    print(f"\ntraining steps, {cfg.num_hidden_layers} LLM layers x {cfg.hidden_size} wide (vision encoders frozen), "
          f"batch {plain['input_ids'].size(0)}, fp32 weights, bf16 autocast, fused AdamW; mean of {steps} steps "
          f"after two warm-ups. MFU: batch_flops over {train.PEAK_FLOPS / 1e12:.0f} TFLOP/s (datasheet) and over "
          f"{matmul_rate / 1e12:.0f} (this device's 8192^3 bf16 matmul)")
    print("| side | tokens (supervised) | tokens/s | vs transformers | MFU | MFU at measured peak | peak memory "
          "(train.py's plan) | first loss |\n|---|---|---|---|---|---|---|---|")
    act_bytes = 2 if device.type == "cuda" else 4  # the activations' dtype under autocast, as train.py plans
    tps = {}
    with torch.device("meta"):  # transformers' model does the same work as ours: counted on ours, without weights
        ref = M.Qwen2VL(cfg)
    train.set_trainable(ref, stage)
    for name, (make, forward, batch, kind) in sides.items():
        torch.manual_seed(0)
        with torch.device(device):
            m = make()
        flops = train.batch_flops(m if kind == "vpt" else ref, batches[kind])
        step = trainer(m, autocast(forward))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, losses = zip(*[step(batch) for _ in range(steps + 2)])
        t = sum(times[2:]) / steps
        b = batches[kind]
        T, sup = int(b["padding_mask"].sum()), int((b["targets"] != data.IGNORE_INDEX).sum())
        tps[name] = T / t
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "-"
        if name.startswith("nanoVPT"):
            plan = train.memory_plan(m, *b["input_ids"].shape, sup, act_bytes)
            mem += f" ({sum(plan.values()) / 2**30:.1f} GiB)"
        # the one-pass step's samples carry the control turn: its tokens/s is not comparable to the others'
        ratio = f"{tps[name] / tps['transformers Qwen2-VL, eager']:.2f}x" if kind == "plain" else "-"
        print(f"| {name} | {T} ({sup}) | {tps[name]:,.0f} | {ratio} | {flops / t / train.PEAK_FLOPS:.1%} | "
              f"{flops / t / matmul_rate:.1%} | {mem} | {losses[0]:.4f} |")
        del m, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"nanoVPT Qwen2-VL / transformers tokens/s: "
          f"{tps['nanoVPT Qwen2-VL, compiled'] / tps['transformers Qwen2-VL, eager']:.2f}x")


def bench_gpu(preset, depth, new_tokens, batch_size, parts, device):
    device = torch.device(device)
    over = dict(num_hidden_layers=depth, vision=dict(depth=depth)) if depth else {}
    with tempfile.TemporaryDirectory() as d:
        tok, tokens, img_cfg = train_records(d)
        batches = {"tokens": tokens}
        for name, encoder in (("plain", None), ("vpt", "dino")):
            ds = data.VPTDataset(f"{d}/{name}.jsonl", tok, img_cfg, encoder, tokens.pad, tokens.act)
            b = data.collate([ds[0]] * batch_size, tok.endoftext_id, tok.image_pad_id, img_cfg.merge_size)
            batches[name] = train.to_device(b, device)
    base = M.PRESETS[preset]
    cfg = M.QwenConfig(**{**base, **over, "vision": {**base.get("vision", {}), **over.get("vision", {})}},
                       image_token_id=tok.image_pad_id, vision_start_token_id=tok.vision_start_id,
                       vision_end_token_id=tok.vision_end_id, eos_token_id=tok.im_end_id)
    if len(tok) > cfg.vocab_size:
        raise SystemExit(f"--preset {preset}: its vocabulary ({cfg.vocab_size}) is smaller than the benchmark's "
                         f"tokenizer ({len(tok)})")
    vcfg = vpt.VPTConfig(encoder="dino", dino=encoders.DinoConfig(**({"num_hidden_layers": depth} if depth else {})))
    bandwidth, matmul_rate = ceilings(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: copy {bandwidth / 1e12:.2f} TB/s (read + written), bf16 matmul "
          f"{matmul_rate / 1e12:.0f} TFLOP/s")
    if "infer" in parts:
        gpu_decode(cfg, vcfg, tok, tokens, device, new_tokens, bandwidth)
    if "train" in parts:
        gpu_train(cfg, vcfg, batches, device, TRAIN_STEPS, matmul_rate)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    load = sub.add_parser("load", help="load time and peak RSS against transformers")
    load.add_argument("--preset", default="qwen2-vl-2b", choices=list(M.PRESETS), help="model shape (default 2B)")
    sub.add_parser("vpt", help="a region-selection answer: one continuous KV cache against re-prefilling")
    tr = sub.add_parser("train", help="training step tokens/s and MFU against transformers, and the VPT path")
    tr.add_argument("--steps", type=int, default=3, help="timed steps per side, after one warm-up (default 3)")
    sub.add_parser("infer", help="prefill and decode against transformers")
    gpu = sub.add_parser("gpu", help="the GPU goals: bf16 decode vs transformers and the roofline, the batch sweep, "
                                     "training tokens/s and MFU")
    gpu.add_argument("--preset", default="qwen2-vl-2b", choices=list(M.PRESETS), help="model shape (default 2B)")
    gpu.add_argument("--depth", type=int, default=None,
                     help="LLM layers, ViT and DINOv2 blocks (default: the preset's, DINOv2-L's 24)")
    gpu.add_argument("--new_tokens", type=int, default=128, help="tokens each decode generates (default 128)")
    gpu.add_argument("--batch_size", type=int, default=32, help="samples of a training step (default 32)")
    gpu.add_argument("--parts", default="infer,train", help="comma-separated: infer, train (default both)")
    gpu.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="default: cuda when available (cpu runs the same code, for a smoke test)")
    args = p.parse_args(argv)
    if args.bench == "load":
        bench_load(args.preset)
    elif args.bench == "train":
        bench_train(args.steps)
    elif args.bench == "infer":
        bench_infer()
    elif args.bench == "gpu":
        bench_gpu(args.preset, args.depth, args.new_tokens, args.batch_size, args.parts.split(","), args.device)
    else:
        bench_vpt()


if __name__ == "__main__":
    main()

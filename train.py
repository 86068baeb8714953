"""
Trains Qwen2-VL with Visual Perception Tokens, or without them (the baseline), nanoGPT style: one process on a CPU
or one GPU,
    python train.py config/synth.py --device=cpu
or DDP across GPUs and nodes with torchrun (FSDP2 with --fsdp=True),
    torchrun --standalone --nproc_per_node=8 train.py config/vpt_2b_det.py
Settings come from the TrainConfig defaults, then a config file (literal `key = value` lines), then --key=value
or --key value; --help prints the values in force after the arguments given with it, and what each one means.
This file owns the training config and its parser, the learning-rate schedule, building or resuming the model,
parameter groups and stages (LoRA in lora.py), FSDP sharding, checkpoints with their resume state, the step-indexed
data order (the same batches after resume and under any world size), FLOPs and the memory plan, evaluation, logging
and the loop.
Citations as in vpt.py: "VPT §n" is the paper (arXiv 2502.17425), file and key names are the authors' repository
(github.com/yu-rp/VisualPerceptionToken).
"""
import ast
import dataclasses
import errno
import inspect
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import tokenize
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import encoders
import lora
import model as M
import vpt


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    init_from: str = "scratch"  # "scratch" (model_preset), a Hub id or directory (base Qwen2-VL or VPT), or "resume"
    model_preset: str = "tiny"  # model.PRESETS entry, for scratch
    tokenizer: str = ""  # tokenizer.json for scratch (a base checkpoint brings its own)
    min_pixels: int = 3136  # image processor limits for scratch (a base checkpoint brings its own)
    max_pixels: int = 12845056
    use_vpt: bool = True  # False trains a plain Qwen2-VL (the no-perception-token baseline)
    encoder: str = "dino"  # extra encoder of a new VPT model: "dino", "sam" or "clip"
    dino: str = "facebook/dinov2-large"  # its checkpoint, when starting from a base Qwen2-VL
    dino_preset: str = "tiny"  # encoders.DINO_PRESETS entry, for scratch
    sam: str = "facebook/sam-vit-large"  # the sam variant's checkpoint (its image encoder), from a base Qwen2-VL
    sam_preset: str = "tiny"  # encoders.SAM_PRESETS entry, for scratch
    grid: int = 8  # region cells per side of a new VPT model (the paper's k)
    region_margin: int = 1  # cells added around a selected region before cropping (1 in the authors' harness)
    # data
    train_data: str = "data/synth/train.jsonl"
    val_data: str = "data/synth/val.jsonl"
    max_len: int = 2048  # longer samples are dropped whole and counted (the authors' cutoff_len)
    mask_prob: float = 0.5  # VPT §3.2 mask modeling, per sample with a control token
    num_workers: int = 2  # DataLoader processes decoding images
    # optimization
    stage: str = "finetune"  # "align": projector feature path only; "finetune": all but the vision encoders; "all"
    lora_rank: int = 0  # > 0: the LLM's Linear layers train through LoRA adapters of this rank (lora.py); finetune only
    lora_alpha: float = 0.0  # LoRA scale alpha / rank; 0 = 2 * rank (LLaMA-Factory's default, the authors' 7B run)
    batch_size: int = 4  # micro-batch per process
    grad_accum: int = 1  # micro-batches per step and process: global batch = batch_size * grad_accum * world size
    max_iters: int = 1000
    lr: float = 2e-5  # LLM and everything else trained
    lr_projector: float = 0.0  # 0 = lr
    lr_embed: float = 0.0  # embeddings (and a tied lm_head); 0 = lr
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.03
    weight_decay: float = 0.0  # on matrices only; the authors used HF's default 0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20  # validation micro-batches per evaluation
    log_interval: int = 10
    wandb_project: str = ""  # log to Weights & Biases when set
    # system
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype; weights stay fp32
    compile: bool = False  # torch.compile each decoder layer
    checkpointing: bool = False  # activation checkpointing per decoder layer (2B at 2048 tokens on 80 GB needs it)
    fsdp: bool = False  # under torchrun, FSDP2 instead of DDP: parameters, gradients and AdamW state sharded
    seed: int = 1337
    overwrite: bool = False  # a new run may replace the checkpoint already in out_dir (at its first save)


# the settings --init_from=resume takes from the command line; every other one is restored from the checkpoint, and
# giving it again with another value is an error
RESUMABLE = ("init_from", "out_dir", "overwrite", "max_iters", "eval_interval", "eval_iters", "log_interval",
             "wandb_project", "num_workers", "device", "dtype", "compile", "checkpointing")
STAGES = ("align", "finetune", "all")
DTYPES = ("float32", "bfloat16")


def parse_config(argv):
    """[config_file.py] [--key=value | --key value ...] -> TrainConfig. A config file holds `key = literal` lines
    only (read with ast, never executed). Unknown keys, values of the wrong type and values out of range are errors;
    on resume the run's saved settings are restored (resume_values)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}

    def put(key, value, where):
        if key not in fields:
            raise M.UserError(f"{where}: unknown config key {key!r}")
        want = type(fields[key].default)
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise M.UserError(f"{where}: {key} must be {want.__name__}, got {value!r}")
        values[key] = value

    args, help_asked = list(argv), False
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            help_asked = True  # printed after every other argument, with the values they set
            continue
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise M.UserError(f"{arg}: no such config file (settings are a config file, then --key=value)")
            try:
                tree = ast.parse(open(arg).read(), arg)
            except SyntaxError as e:
                raise M.UserError(f"{arg}:{e.lineno}: {e.msg}") from None
            for node in tree.body:
                single = isinstance(node, ast.Assign) and len(node.targets) == 1
                if not (single and isinstance(node.targets[0], ast.Name)):
                    raise M.UserError(f"{arg}:{node.lineno}: only `key = literal` lines are allowed")
                key = node.targets[0].id
                try:
                    value = ast.literal_eval(node.value)
                except (ValueError, SyntaxError):
                    raise M.UserError(f"{arg}:{node.lineno}: {key} = {ast.unparse(node.value)} is not a literal "
                                      f"(a number, string, bool or tuple); config files are read, never run") from None
                put(key, value, f"{arg}:{node.lineno}")
        else:
            key, eq, raw = arg[2:].partition("=")
            if not eq:  # --key value
                if not args:
                    raise M.UserError(f"{arg}: write --key=value or --key value")
                raw = args.pop(0)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare string such as --device=cpu
            put(key, value, arg)
    if values.get("init_from") == "resume":
        values = resume_values(values)
    cfg = TrainConfig(**values)
    if help_asked:  # before check_config: the values are shown even when one of them is out of range
        print_help(cfg)
        sys.exit(0)
    check_config(cfg)
    return cfg


def print_help(cfg):
    """The file docstring, then every setting with the value in force and its comment from TrainConfig's source."""
    comments, sections = setting_comments()
    lines = [__doc__.strip(), "", "Settings in force (defaults, then the config file, then the flags given):"]
    for f in dataclasses.fields(TrainConfig):
        if f.name in sections:
            lines.append(f"  # {sections[f.name]}")
        note = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  --{f.name}={getattr(cfg, f.name)!r}{note}")
    lines.append(f"With --init_from=resume the run's saved settings are restored; only {', '.join(RESUMABLE)} may "
                 f"be given again with another value.")
    print("\n".join(lines))


def setting_comments():
    """({setting: its trailing comment}, {setting: the section comment above it}) read from TrainConfig's source
    with tokenize, so --help says what the code says and cannot drift from it."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    first, comments, sections, section = {}, {}, {}, None  # first: line -> the first name on it
    for t in tokenize.generate_tokens(io.StringIO(inspect.getsource(TrainConfig)).readline):
        row = t.start[0]
        if t.type == tokenize.NAME and row not in first:
            first[row] = t.string
            if t.string in names and section:
                sections[t.string], section = section, None
        elif t.type == tokenize.COMMENT:
            text = t.string.lstrip("#").strip()
            if first.get(row) in names:
                comments[first[row]] = text
            else:  # a comment on a line of its own heads the settings below it
                section = text
    return comments, sections


def resume_values(given):
    """--init_from=resume: the settings saved with the checkpoint in out_dir, and of the given ones those that may
    change (RESUMABLE); another value for any other setting is an error."""
    out_dir = given.get("out_dir", TrainConfig.out_dir)
    if not os.path.isfile(os.path.join(out_dir, M.LATEST)):
        raise M.UserError(f"--init_from=resume: {out_dir} holds no checkpoint to continue (no {M.LATEST} file); "
                          f"give the out_dir of the run to continue")
    state = torch.load(os.path.join(M.checkpoint_dir(out_dir), "train_state.pt"), weights_only=True)
    saved = {k: v for k, v in state["config"].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    changed = [f"{k}={v!r} (saved {saved[k]!r})" for k, v in given.items()
               if k not in RESUMABLE and k in saved and v != saved[k]]
    if changed:
        raise M.UserError(f"--init_from=resume continues the run in {out_dir} with its saved settings, but "
                          f"{', '.join(changed)} differ; only {', '.join(RESUMABLE)} may change")
    return {**saved, **given}


def check_config(cfg):
    """Every numeric and enum setting, checked in one place before anything runs."""
    c, device_ok = cfg, re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device)
    rules = [("max_iters", c.max_iters >= 1, "at least 1"), ("batch_size", c.batch_size >= 1, "at least 1"),
             ("grad_accum", c.grad_accum >= 1, "at least 1"), ("max_len", c.max_len >= 1, "at least 1"),
             ("eval_interval", c.eval_interval >= 0, "0 (only at the end) or more"),
             ("eval_iters", c.eval_iters >= 1, "at least 1"), ("log_interval", c.log_interval >= 1, "at least 1"),
             ("num_workers", c.num_workers >= 0, "0 or more"), ("lr", c.lr > 0, "above 0"),
             ("lr_projector", c.lr_projector >= 0, "0 (= lr) or more"),
             ("lr_embed", c.lr_embed >= 0, "0 (= lr) or more"), ("min_lr_ratio", 0 <= c.min_lr_ratio <= 1, "in [0, 1]"),
             ("warmup_frac", 0 <= c.warmup_frac <= 1, "in [0, 1]"),
             ("weight_decay", c.weight_decay >= 0, "0 or more"), ("beta1", 0 <= c.beta1 < 1, "in [0, 1)"),
             ("beta2", 0 <= c.beta2 < 1, "in [0, 1)"), ("grad_clip", c.grad_clip >= 0, "0 (off) or more"),
             ("mask_prob", 0 <= c.mask_prob <= 1, "in [0, 1]"), ("grid", c.grid >= 1, "at least 1"),
             ("region_margin", c.region_margin >= 0, "0 or more"), ("min_pixels", c.min_pixels >= 1, "at least 1"),
             ("max_pixels", c.max_pixels >= c.min_pixels, f"at least min_pixels ({c.min_pixels})"),
             ("stage", c.stage in STAGES, f"one of {', '.join(STAGES)}"),
             ("lora_rank", c.lora_rank >= 0, "0 (off) or more"),
             ("lora_rank", c.lora_rank == 0 or c.stage == "finetune", "0 unless --stage=finetune (LoRA tunes the LLM)"),
             ("lora_alpha", c.lora_alpha >= 0, "0 (= 2 x lora_rank) or more"),
             ("fsdp", not c.fsdp or "RANK" in os.environ, "False outside torchrun (FSDP shards over its processes)"),
             ("fsdp", not c.fsdp or c.stage != "align",
              "False with --stage=align (the projector alone trains there, a few MB: DDP replicates it cheaply)"),
             ("encoder", c.encoder in vpt.PREFIX, f"one of {', '.join(vpt.PREFIX)}"),
             ("model_preset", c.model_preset in M.PRESETS, f"one of {', '.join(M.PRESETS)}"),
             ("dino_preset", c.dino_preset in encoders.DINO_PRESETS, f"one of {', '.join(encoders.DINO_PRESETS)}"),
             ("sam_preset", c.sam_preset in encoders.SAM_PRESETS, f"one of {', '.join(encoders.SAM_PRESETS)}"),
             ("dtype", c.dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
             ("device", device_ok, "cpu, cuda or cuda:N"),
             ("device", not c.device.startswith("cuda") or torch.cuda.is_available(),
              "cpu: this machine has no CUDA device (torch.cuda.is_available() is False)")]
    for key, ok, need in rules:
        if not ok:
            raise M.UserError(f"--{key}={getattr(c, key)!r}: must be {need}")


def get_lr(it, cfg):
    """1) linear warm-up over warmup_frac of the steps, 2) cosine decay to lr * min_lr_ratio."""
    warmup = max(1, int(cfg.warmup_frac * cfg.max_iters))
    if it < warmup:
        return (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, cfg.max_iters - warmup))
    return cfg.min_lr_ratio + 0.5 * (1.0 - cfg.min_lr_ratio) * (1.0 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# model, tokenizer and images: built, loaded from a checkpoint, or resumed


def build(cfg):
    """-> (model, tokenizer, image config)."""
    src = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    if src == "scratch":
        tok = data.Tokenizer(cfg.tokenizer)
        img_cfg = data.ImageConfig(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        tokens = vpt.add_tokens(tok, cfg.encoder, cfg.grid) if cfg.use_vpt else None
        qcfg = M.QwenConfig(**{**M.PRESETS[cfg.model_preset], "vocab_size": len(tok),
                               "image_token_id": tok.image_pad_id, "vision_start_token_id": tok.vision_start_id,
                               "vision_end_token_id": tok.vision_end_id, "eos_token_id": tok.im_end_id})
        torch.manual_seed(cfg.seed)
        if not cfg.use_vpt:
            return M.Qwen2VL(qcfg), tok, img_cfg
        vcfg = vpt.VPTConfig(encoder=cfg.encoder, grid=cfg.grid, region_margin=cfg.region_margin,
                             dino=encoders.DinoConfig(**encoders.DINO_PRESETS[cfg.dino_preset]),
                             sam=encoders.SamConfig(**encoders.SAM_PRESETS[cfg.sam_preset]))
        return vpt.VPT(qcfg, vcfg, tokens), tok, img_cfg
    path, d = M.open_checkpoint(src, vpt.WEIGHT_PATTERNS)
    if d.get("model_type") == "qwen2_vl_vpt":
        if cfg.use_vpt:
            return vpt.from_pretrained(path)
        # a baseline continuing a VPT run (the quick start's stage 1): its ViT and LLM, without the re-encoding
        # encoder and projector that a model without perception tokens never runs
        extra = tuple(f"{p}_" for p in vpt.PREFIX.values())  # detection_model., detection_projector., seg_...
        sd = {k: v for k, v in M.read_weights(path, allow_bin=True).items() if not k.startswith(extra)}
        model = M.build_loaded(lambda: M.Qwen2VL(M.QwenConfig.from_hf(d)), sd, torch.float32, "cpu")
        return model, data.Tokenizer(path), data.ImageConfig.from_dir(path)
    if cfg.use_vpt:
        model, tok, img_cfg = vpt.from_base(path, cfg.encoder, cfg.dino, cfg.grid, sam=cfg.sam)
        model.vcfg.region_margin = cfg.region_margin
        return model, tok, img_cfg
    return M.from_pretrained(path), data.Tokenizer(path), data.ImageConfig.from_dir(path)


ENCODERS = ("visual", "detection_model", "seg_model")  # the vision encoders: Qwen's ViT, DINOv2, SAM


def set_trainable(model, cfg):
    """Freezing by stage: align trains the projector's feature path (its condition path gets no gradient without
    control tokens), finetune everything but the vision encoders (the authors' freeze_frozen_modules:
    detection_model,visual in configs/Qwen2-VL-2b-VPT-Det.yaml, visual,seg_model in -Seg.yaml), all everything
    (training from scratch); with LoRA the adapters, embed_tokens, lm_head and the projector."""
    proj = f"{vpt.PREFIX[cfg.encoder]}_projector."
    for name, p in model.named_parameters():
        if cfg.lora_rank:  # adapters, and fully the modules the authors' 7B run saves (modules_to_save)
            p.requires_grad = ".lora_" in name or name.startswith((proj, "model.embed_tokens.", "lm_head."))
        elif cfg.stage == "align":
            p.requires_grad = name.startswith((proj + "layernorm_feature", proj + "linear_feature",
                                               proj + "conv_feature"))
        elif cfg.stage == "finetune":
            p.requires_grad = not name.startswith(tuple(e + "." for e in ENCODERS))


def param_groups(model, cfg):
    """Named groups with their own learning rates, after set_trainable; weight decay on matrices only. Logs the
    counts."""
    set_trainable(model, cfg)
    proj = f"{vpt.PREFIX[cfg.encoder]}_projector."
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "projector" if name.startswith(proj) else "embeddings" if "embed_tokens" in name else "model"
        lr = {"projector": cfg.lr_projector, "embeddings": cfg.lr_embed}.get(kind) or cfg.lr
        decay = p.dim() >= 2 and cfg.weight_decay > 0
        if (kind, decay) not in groups:
            groups[kind, decay] = dict(name=kind if decay else f"{kind} (no decay)", params=[], base_lr=lr,
                                       weight_decay=cfg.weight_decay if decay else 0.0)
        groups[kind, decay]["params"].append(p)
    groups = list(groups.values())
    n_train = sum(p.numel() for g in groups for p in g["params"])
    n_all = sum(p.numel() for p in model.parameters())
    sizes = ", ".join(f"{g['name']} {sum(p.numel() for p in g['params']):,} at lr {g['base_lr']:g}" for g in groups)
    log(f"parameters: {n_train:,} trained, {n_all - n_train:,} frozen ({cfg.stage}); groups: {sizes}")
    return groups


def replicated(model):
    """The parameters FSDP leaves whole on every process: those of a frozen vision encoder. They have no gradient or
    AdamW state to shard, and an encoder runs only on micro-batches with images (or re-encoded ones), which one
    process may have when another has none: a sharded unit that runs on one process and not on another would leave
    its collectives unpaired, a hang."""
    encoders_ = [getattr(model, e) for e in ENCODERS if hasattr(model, e)]
    return {p for e in encoders_ if not any(q.requires_grad for q in e.parameters()) for p in e.parameters()}


def shard(model, cfg, device):
    """FSDP2 (torch.distributed.fsdp.fully_shard) in place, after set_trainable: each decoder layer is a unit,
    gathered just before it runs and freed after it (in the forward and again in the backward), and the root holds
    the rest (embed_tokens, lm_head, the final norm, the projector, and in stage "all" the vision encoders), gathered
    once per step and resharded after it; frozen encoders stay whole (replicated). Each process then holds 1/world of
    the parameters, gradients and AdamW state. With autocast to bfloat16 (dtype on GPUs) the gathered weights are
    bf16 and gradients are reduced in fp32; the shards, and AdamW, stay fp32. Every process must call each unit as
    often as the others: the VPT suffix pass runs even when empty (always_suffix), a parameter that got no gradient
    on this process is reduced as zeros (set_reduce_scatter_unused_params), and a micro-batch dropped whole runs a
    stand-in (Collate)."""
    bf16 = device.startswith("cuda") and cfg.dtype == "bfloat16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=replicated(model))
    model.set_reduce_scatter_unused_params(True)  # the projector gets no gradient on a batch without control tokens
    if isinstance(model, vpt.VPT):
        model.always_suffix = True


def save_checkpoint(model, tok, img_cfg, optimizer, iter_num, best_val, cfg):
    """All or nothing: the model as sample.py and from_pretrained load it, plus what resume needs (optimizer.pt and
    train_state.pt: step, best validation loss, RNG, config), written into a new directory out_dir/.tmp-ckpt-N with
    a manifest of every file (checkpoint.json), renamed to ckpt-N, and only then named by out_dir/latest, replaced
    atomically: the one switch. Older checkpoints are removed after it. A crash at any point leaves `latest` naming
    one complete checkpoint; a failed write (a full disk) removes what it wrote and says so in one sentence.
    Under FSDP every process calls it: the full weights are gathered to the first process, which writes them as
    above, and each process writes its shard of the AdamW state into optimizer/ with torch.distributed.checkpoint
    (DCP), so out_dir must be a filesystem all nodes share."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    name = [None]
    if master:
        name[0] = f"ckpt-{iter_num:06d}"
        for n in range(1, 1000):  # a resumed run saves its first step again: the earlier save stays until the switch
            if not os.path.exists(os.path.join(cfg.out_dir, name[0])):
                break
            name[0] = f"ckpt-{iter_num:06d}-{n}"
        shutil.rmtree(os.path.join(cfg.out_dir, f".tmp-{name[0]}"), ignore_errors=True)  # a crashed save's leftovers
    if cfg.fsdp:
        dist.broadcast_object_list(name)
    name = name[0]
    tmp, final = os.path.join(cfg.out_dir, f".tmp-{name}"), os.path.join(cfg.out_dir, name)
    state = dict(iter_num=iter_num, best_val=best_val, rng=torch.get_rng_state(), config=dataclasses.asdict(cfg))
    try:
        if cfg.fsdp:  # collectives: every process gathers and writes; the first writes the rest alone
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=os.path.join(tmp, "optimizer"))
            if not master:
                return
            if cfg.lora_rank:  # the merged weights under the plain names, and the adapters beside them
                sd, adapters = lora.merge_state_dict(sd, (cfg.lora_alpha or 2.0 * cfg.lora_rank) / cfg.lora_rank)
                lora.save_adapters(adapters, tmp)
            M.save_pretrained(model, tmp, model.hub_config(), state_dict=sd)
        else:
            with lora.merged(model):  # LoRA: the merged weights under the plain names, and the adapters beside them
                M.save_pretrained(model, tmp, model.hub_config())
            if cfg.lora_rank:
                lora.save_adapters(lora.adapters(model), tmp)
            M.atomic_write(os.path.join(tmp, "optimizer.pt"), lambda t: torch.save(optimizer.state_dict(), t))
        tok.save(tmp)
        img_cfg.save(tmp)
        M.atomic_write(os.path.join(tmp, "train_state.pt"), lambda t: torch.save(state, t))
        files = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
        M.save_json(os.path.join(tmp, M.MANIFEST), dict(step=iter_num, files={f: M.fingerprint(os.path.join(tmp, f))
                                                                             for f in files}))
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a short write as a RuntimeError
        partial = [f.removesuffix(".tmp") for f in os.listdir(tmp) if f.endswith(".tmp")] if os.path.isdir(tmp) else []
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(e)
        if not full and not isinstance(e, OSError):
            raise
        what = f"no space left on the device writing {os.path.join(tmp, partial[0]) if partial else tmp}" if full \
            else f"cannot write the checkpoint of step {iter_num} ({e})"
        raise M.UserError(f"{what}; {last_checkpoint(cfg.out_dir)} is intact and the temporary files are removed") \
            from None
    os.replace(tmp, final)
    M.atomic_write(os.path.join(cfg.out_dir, M.LATEST), lambda t: open(t, "w").write(name + "\n"))
    for old in os.listdir(cfg.out_dir):  # earlier checkpoints, and what a crashed save left
        path = os.path.join(cfg.out_dir, old)
        if old != name and old.startswith(("ckpt-", ".tmp-ckpt-")):
            shutil.rmtree(path, ignore_errors=True)
        elif old == M.LATEST + ".tmp":
            os.remove(path)


def last_checkpoint(out_dir):
    """'the checkpoint of step N in <dir>' for messages, or 'out_dir' when it holds none yet."""
    if not os.path.isfile(os.path.join(out_dir, M.LATEST)):
        return f"{out_dir} (no checkpoint yet)"
    path = M.checkpoint_dir(out_dir)
    return f"the checkpoint of step {M.read_json(os.path.join(path, M.MANIFEST))['step']} in {path}"


def load_train_state(model, optimizer, cfg, device):
    """Resume, after build() has loaded the model from out_dir (and shard() has sharded it): restores the optimizer
    (under FSDP each process reads its shard from optimizer/) and the RNG, and returns (step, best validation
    loss)."""
    path = M.checkpoint_dir(cfg.out_dir)
    if cfg.fsdp:
        opt = get_optimizer_state_dict(model, optimizer)  # the layout to read into
        dcp.load(opt, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(model, optimizer, opt)
    else:
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device,
                                             weights_only=True))
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=True)
    torch.set_rng_state(state["rng"])
    log(f"resumed from {path} at step {state['iter_num']}")
    return state["iter_num"], state["best_val"]


class OutDirLock:
    """out_dir/train.lock, made with O_EXCL and holding the owner's pid and host: a second run into the same out_dir
    stops at once and names the first. A lock left by a dead process on this host is taken over."""

    def __init__(self, out_dir):
        self.file = os.path.join(out_dir, "train.lock")
        os.makedirs(out_dir, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid, _, host = open(self.file).read().strip().partition(" on ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    os.remove(self.file)  # stale: its run is gone
                    continue
                raise M.UserError(f"{out_dir} is in use by another run (pid {pid} on {host}, {self.file}); wait for "
                                  f"it or choose another --out_dir (delete the lock file if that run is gone)")
            os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
            os.close(fd)
            return

    def release(self):
        os.remove(self.file)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# -----------------------------------------------------------------------------
# data: a seeded, length-grouped order of micro-batches, the same for every world size


def dataset(path, tok, img_cfg, tokens, cfg, records):
    """A records file (read and checked: data.checked_records) as training samples; tokens None (a plain Qwen2-VL)
    reads it without perception tokens."""
    if tokens is None:
        return data.VPTDataset(path, tok, img_cfg, max_len=cfg.max_len, records=records)
    return data.VPTDataset(path, tok, img_cfg, cfg.encoder, tokens.pad, tokens.act, max_len=cfg.max_len,
                           records=records)


def micro_batches(dataset, cfg, epoch):
    """Sample indices of every micro-batch of an epoch. Samples are shuffled, grouped into length buckets of 128
    (estimated) tokens within windows of 64 micro-batches, so batches carry little padding, and the batches are
    shuffled again. Buckets, not an exact sort: sorting templated data by exact length makes micro-batches whose
    answers all have one length (all "green", say), and then the loss is lowered without looking at the image."""
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    window = 64 * cfg.batch_size
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: dataset.length_estimate(j) // 128)  # stable: random within
        batches += [chunk[j:j + cfg.batch_size] for j in range(0, len(chunk), cfg.batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class Schedule:
    """The micro-batches of optimizer step `it` for this rank: step it takes global micro-batches
    [it*W*G, (it+1)*W*G) of the endless epoch sequence, rank r every W-th of them. So a run's data depends only on
    the step (resume is exact) and the global batch (2 processes x G equals 1 process x 2G)."""

    def __init__(self, dataset, cfg, rank, world):
        self.dataset, self.cfg, self.rank, self.world = dataset, cfg, rank, world
        self.epochs = {0: micro_batches(dataset, cfg, 0)}  # the one epoch in use, drawn once
        self.per_epoch = len(self.epochs[0])  # micro-batches per epoch: every epoch has as many

    def global_batch(self, k):
        e, i = divmod(k, self.per_epoch)
        if e not in self.epochs:
            self.epochs = {e: micro_batches(self.dataset, self.cfg, e)}
        return self.epochs[e][i]

    def step(self, it):
        per_step = self.world * self.cfg.grad_accum
        return [(it * per_step + self.rank + self.world * m) for m in range(self.cfg.grad_accum)]


class StepBatches(torch.utils.data.Sampler):
    """Feeds the DataLoader the index lists of this rank's micro-batches from step `start` on."""

    def __init__(self, schedule, start, stop):
        self.schedule, self.start, self.stop = schedule, start, stop

    def __iter__(self):
        for it in range(self.start, self.stop):
            for k in self.schedule.step(it):
                yield self.schedule.global_batch(k)

    def __len__(self):
        return (self.stop - self.start) * self.schedule.cfg.grad_accum


class Collate:
    """A picklable collate for DataLoader workers: drops samples over max_len (the dataset gives None) and counts
    them; a micro-batch with nothing left becomes None, or under FSDP (stand_in) one pad token with no target, which
    the process still runs so that its collectives pair up with the other processes' (shard)."""

    def __init__(self, pad_id, image_token_id, merge, stand_in=False):
        self.pad_id, self.image_token_id, self.merge, self.stand_in = pad_id, image_token_id, merge, stand_in

    def __call__(self, samples):
        kept = [s for s in samples if s is not None]
        if not kept and self.stand_in:
            kept = [dict(input_ids=[self.pad_id], labels=[data.IGNORE_INDEX], pixel_values=None, image_grid_thw=None,
                         extra=None)]
        elif not kept:
            return None
        batch = data.collate(kept, self.pad_id, self.image_token_id, self.merge)
        batch["dropped"] = len(samples) - sum(s is not None for s in samples)
        return batch


def loader(schedule, start, stop, collate, num_workers):
    """An iterator over this rank's collated micro-batches of steps [start, stop)."""
    return iter(torch.utils.data.DataLoader(schedule.dataset, batch_sampler=StepBatches(schedule, start, stop),
                                            collate_fn=collate, num_workers=num_workers))


def mask_draw(batch, cfg, k):
    """VPT §3.2 mask modeling: each sample with a control token is mask-modeled with probability mask_prob, drawn
    from a generator seeded by the global micro-batch index, so it is the same under any world size and after
    resume."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
    return torch.rand(batch["input_ids"].size(0), generator=g) < cfg.mask_prob


def to_device(batch, device):
    move = lambda v: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
    return {k: tuple(map(move, v)) if isinstance(v, tuple) else move(v) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# FLOPs: what a step actually computes, for MFU


MATMULS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, lora.LoRALinear)


def matmul_weights(*modules):
    """Multiply-adds per row of a module's Linear and Conv layers (a patch conv is a matmul over flattened patches)."""
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, MATMULS))


def trains(*modules):
    """Whether any of the modules' matmul weights train (LoRA adapters are counted apart)."""
    return any(m.weight.requires_grad for mod in modules for m in mod.modules() if isinstance(m, MATMULS))


def passes(trained, grad_in):
    """FLOPs per multiply-add of a matmul in a training step: 2 forward, 2 more for the gradient of its input when
    anything before it trains, 2 more for the gradient of its weights when they train (6 = the usual 6N)."""
    return 2 + 2 * grad_in + 2 * trained


def batch_flops(model, batch):
    """FLOPs of one micro-batch's forward and backward, counted from what is processed: the LLM's weights (and the
    attention scores, 4·L·d per token and key forward: the 12·L·T·d term of nanoGPT and PaLM, full T x T, not
    halved for causality) per real token, lm_head per supervised token (logits are computed only there), the ViT
    per patch, its merger per merged token, DINOv2 per re-encoded image (its 256 patches and CLS) and the projector
    per feature row and control vector. The one-pass VPT forward computes each token once, so this is the count of
    the model's own work; padding and the few header tokens of mask-modeled rows that it recomputes are not counted."""
    cfg, llm = model.cfg, model.model
    lengths = batch["padding_mask"].sum(1).double()  # (B,) real tokens per row
    tokens, supervised = lengths.sum().item(), int((batch["targets"] != data.IGNORE_INDEX).sum())
    f = passes(trains(llm.layers), True) * matmul_weights(llm.layers) * tokens
    f += 6 * sum(m.lora_A.numel() + m.lora_B.numel() for _, m in lora.lora_layers(llm)) * tokens  # LoRA adapters
    f += 3 * 4 * cfg.num_hidden_layers * cfg.hidden_size * (lengths ** 2).sum().item()  # attention: fwd + 2x bwd
    f += passes(trains(model.lm_head), True) * matmul_weights(model.lm_head) * supervised
    vit, v = model.visual, cfg.vision
    grids = [g for g in (batch.get("image_grid_thw"),) if g is not None]
    extra = batch.get("extra")
    if isinstance(extra, tuple):  # clip: the re-encoded views run through the same ViT
        grids.append(extra[1])
    k = passes(trains(vit), trains(vit))  # pixels need no gradient: the ViT backpropagates only if it trains
    for grid in grids:
        patches = grid.prod(-1).double()  # (n,) patches per image; each attends to its own image only
        f += k * (matmul_weights(vit.patch_embed, vit.blocks) * patches.sum().item()
                  + 2 * v.depth * v.embed_dim * (patches ** 2).sum().item()
                  + matmul_weights(vit.merger) * patches.sum().item() / v.spatial_merge_size ** 2)
    if extra is None:
        return f
    proj = model.projector
    if model.vcfg.encoder == "dino":  # DINOv2 and the projector's feature path (clip's features need neither)
        dino, d = model.detection_model, model.detection_model.config
        n, S = extra.size(0), (extra.size(-2) // d.patch_size) * (extra.size(-1) // d.patch_size)  # images, patches
        k = passes(trains(dino), trains(dino))
        f += k * n * (matmul_weights(dino.embeddings) * S + matmul_weights(dino.encoder) * (S + 1)
                      + 2 * d.num_hidden_layers * d.hidden_size * (S + 1) ** 2)
        f += passes(trains(proj.linear_feature), trains(dino)) * matmul_weights(proj.linear_feature) * n * S
    elif model.vcfg.encoder == "sam":  # SAM's encoder per image and the projector's conv per output cell
        sam, s = model.seg_model, model.seg_model.config
        n, G, w = extra.size(0), s.image_size // s.patch_size, s.window_size
        per_image = matmul_weights(sam.patch_embed, sam.neck) * G * G  # the neck's convs run once per grid cell
        for i, layer in enumerate(sam.layers):
            # a windowed block's attention runs on the grid zero-padded to whole windows and attends within a window,
            # a global one over the grid; the MLP on the grid (the decomposed relative-position terms, 2·hs·(h+w)
            # per token and head, are left out)
            glob = i in s.global_attn_indexes
            rows = G * G if glob else (-(-G // w) * w) ** 2
            per_image += (matmul_weights(layer.attn) * rows + 2 * s.hidden_size * rows * (G * G if glob else w * w)
                          + matmul_weights(layer.mlp) * G * G)
        f += passes(trains(sam), trains(sam)) * n * per_image
        cells = vpt.SAM_PROJECTOR_STRIDE ** 2
        f += passes(trains(proj.conv_feature), trains(sam)) * matmul_weights(proj.conv_feature) * n * G * G / cells
    controls = int((batch["input_ids"] == model.tokens.act).sum())  # one control vector each
    f += passes(trains(proj.linear_condition), True) * matmul_weights(proj.linear_condition) * controls
    return f


def memory_plan(model, B, T, supervised, act_bytes, shards=1):
    """Bytes per process for a micro-batch of B x T tokens, `supervised` of them with a target: the parameters, the
    gradients and AdamW's two moments of the trained ones (in the parameters' dtype); under FSDP over `shards`
    processes (shard) each holds 1/shards of those but the replicated ones, plus what is gathered at a time in the
    compute dtype (act_bytes): the root's parameters and two decoder layers (the one running and the next, which FSDP
    prefetches). Then the activations autograd
    keeps: per decoder layer and token the norms' inputs and outputs, q, the attention output and o_proj's input
    (8 C), k and v (2 kv widths) and the MLP's four intermediates (4 I); with checkpointing only each layer's input
    and one layer recomputed; the supervised logits and their log-softmax in fp32; the MLP's gradients in flight.
    The vision encoders and DINOv2 are frozen in the authors' recipes and keep nothing for the backward pass."""
    c = model.cfg
    whole = replicated(model) if shards > 1 else set(model.parameters())
    share = lambda p: p.numel() * p.element_size() / (1 if p in whole else shards)  # p.numel(): an FSDP parameter's
    params = sum(share(p) for p in model.parameters())  # full size (a DTensor's), its shard's up to rounding
    trained = sum(share(p) for p in model.parameters() if p.requires_grad)
    if shards > 1:
        layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
        root = sum(p.numel() for n, p in model.named_parameters()
                   if p not in whole and not n.startswith("model.layers."))
        params += (root + 2 * layer_params) * act_bytes
    kv = 2 * c.num_key_value_heads * c.head_dim
    layer = B * T * (8 * c.hidden_size + kv + 4 * c.intermediate_size) * act_bytes
    if model.model.checkpointing:
        saved = c.num_hidden_layers * B * T * c.hidden_size * act_bytes + layer
    else:
        saved = c.num_hidden_layers * layer
    activations = saved + 2 * supervised * c.vocab_size * 4 + 3 * B * T * c.intermediate_size * act_bytes
    return dict(parameters=params, gradients=trained, optimizer=2 * trained, activations=activations)


# -----------------------------------------------------------------------------
# processes, logging and evaluation


def setup_ddp(cfg):
    """-> (ddp, rank, world size, device). Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) this joins
    the process group and takes GPU LOCAL_RANK; otherwise it is the one process, on cfg.device."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = cfg.device
    if ddp and device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not device.startswith("cuda"):  # leave cores to the other processes and DataLoader workers: CPU threads that
        # wait on each other run many times slower than one thread alone
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world - cfg.num_workers))
    return ddp, rank, world, device


def log(*args):
    """print, on the first process only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args)


PEAK_FLOPS = 989e12  # one H100 or H200 SXM, dense bf16


def gpu_stats(flops_per_s, world):
    """The log line's GPU part: model flops utilisation (batch_flops over the GPUs' peak) and this process's peak
    memory."""
    return (f", MFU {flops_per_s / (PEAK_FLOPS * world) * 100:.1f}%, "
            f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def log_memory_plan(model, batch, cfg, device, world):
    """Prints memory_plan for the run's first micro-batch and at max_len, so a run that cannot fit says so first."""
    B, T = batch["input_ids"].shape
    supervised = int((batch["targets"] != data.IGNORE_INDEX).sum())
    act_bytes = torch.finfo(getattr(torch, cfg.dtype)).bits // 8 if device.startswith("cuda") else 4  # autocast
    shards = world if cfg.fsdp else 1
    plan = memory_plan(model, B, T, supervised, act_bytes, shards)
    at_max = memory_plan(model, B, cfg.max_len, supervised * cfg.max_len // T, act_bytes, shards)["activations"]
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    fsdp = f" (FSDP over {shards})" if shards > 1 else ""
    line = (f"memory plan per process{fsdp}: parameters {gib(plan['parameters'])}, gradients {gib(plan['gradients'])}, "
            f"AdamW state {gib(plan['optimizer'])}, activations {gib(plan['activations'])} for the first "
            f"micro-batch ({B} x {T} tokens; {gib(at_max)} at {B} x max_len {cfg.max_len}): "
            f"total {gib(sum(plan.values()))}")
    if device.startswith("cuda"):
        line += f" of {gib(torch.cuda.get_device_properties(device).total_memory)} on this GPU"
    log(line)


def duration(seconds):
    """1h02m, 3m05s, 12s."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s" if m else f"{s}s"


def append_metrics(out_dir, record):
    """One JSON line per logged step or evaluation in out_dir/metrics.jsonl, what plot() draws."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def plot(out_dir):
    """out_dir/metrics.jsonl -> out_dir/curves.png: training loss (raw and smoothed) with validation loss,
    perception-token accuracy and learning rate against the step. A resumed run's steps logged twice keep the last.
    Raises UserError without metrics.jsonl or without matplotlib (an optional dependency)."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        raise M.UserError(f"--plot {out_dir}: no metrics.jsonl there; give the out_dir of a training run")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise M.UserError("plotting needs matplotlib, an optional dependency: pip install matplotlib") from None
    rows = [json.loads(line) for line in open(metrics)]
    series = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, {})[r["step"]] = v
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("loss", ["loss", "loss_smooth", "val_loss"]), ("perception-token accuracy", ["perception_acc"]),
              ("learning rate", ["lr"])]
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            if k in series:
                steps = sorted(series[k])
                ax.plot(steps, [series[k][t] for t in steps], "o-" if k.startswith(("val", "perc")) else "-", label=k)
        ax.set(title=title, xlabel="step")
        if ax.lines:
            ax.legend()
    path = os.path.join(out_dir, "curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def supervised_tokens(batches, device):
    """Supervised tokens in a step's micro-batches, summed over all processes: the denominator of the step's loss."""
    n = sum(int((b["targets"] != data.IGNORE_INDEX).sum()) for b in batches if b is not None)
    n = torch.tensor(n, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(n)
    return max(n.item(), 1.0)


def backward(loss, scale, groups, iter_num, cfg):
    """Backward of one micro-batch's loss * scale. A loss that touched nothing trained (say, an alignment
    micro-batch without a re-encoded image) gets a zero gradient through the trained parameters, which keeps every
    rank's backward, and DDP, in step; a non-finite loss stops the run before it can reach a checkpoint."""
    if not loss.requires_grad:
        loss = loss + sum(p.sum() for g in groups for p in g["params"]) * 0.0
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()} at step {iter_num}; stopping. The last good checkpoint "
                           f"in {cfg.out_dir} is untouched.")
    (loss * scale).backward()


@torch.no_grad()
def evaluate(model, batches, perception, ctx, device):
    """(validation loss, teacher-forced accuracy on the perception-token targets), averaged over all processes.
    perception: the ids whose targets the accuracy counts (the authors' class-wise accuracy over the new tokens,
    ClassWiseComputeAccuracy in LLaMA-Factory's train/sft/metric.py), None for a plain Qwen2-VL."""
    model.eval()
    losses, hits, n = [], 0, 0
    for batch in batches:
        if batch is None:
            continue
        batch = to_device(batch, device)
        with ctx:
            logits, loss = model(batch, batch["targets"])
        if not (batch["targets"] != data.IGNORE_INDEX).any():  # nothing to predict (an FSDP stand-in)
            continue
        losses.append(loss.item())
        if perception is not None:
            tgt = batch["targets"][batch["targets"] != data.IGNORE_INDEX]
            sel = torch.isin(tgt, perception.to(tgt.device))
            hits += (logits[sel].argmax(-1) == tgt[sel]).sum().item()
            n += int(sel.sum())
    model.train()
    stats = torch.tensor([sum(losses), len(losses), hits, n], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / max(stats[1], 1)).item(), (stats[2] / stats[3]).item() if stats[3] else float("nan")


# -----------------------------------------------------------------------------


def record_metrics(cfg, step, row, wandb_row):
    """One row of out_dir/metrics.jsonl, and the same figures to Weights & Biases when wandb_project is set."""
    append_metrics(cfg.out_dir, dict(step=step, **row))
    if cfg.wandb_project:
        import wandb  # its presence is checked when the run starts
        wandb.log(wandb_row, step=step)


def validate(model, batches, perception, ctx, device, iter_num, cfg, master) -> float:
    """The validation loss at step iter_num, logged with the perception-token accuracy (when the model has those
    tokens) and recorded by the master process."""
    val_loss, acc = evaluate(model, batches, perception, ctx, device)
    has_acc = perception is not None and math.isfinite(acc)  # a plain Qwen2-VL has no perception tokens
    log(f"step {iter_num}: val loss {val_loss:.4f}" + (f", perception-token accuracy {acc:.3f}" if has_acc else ""))
    if master:
        row = {"val_loss": val_loss, **({"perception_acc": acc} if has_acc else {})}
        record_metrics(cfg, iter_num, row, {"val/loss": val_loss, **({"val/perception_acc": acc} if has_acc else {})})
    return val_loss


class Meter:
    """What a log line reports: this process's tokens and FLOPs since the last line, the time they took
    (evaluation left out), the samples dropped so far, and the loss smoothed over logged steps."""

    def __init__(self, iter_num):
        self.t0, self.last_logged, self.smooth, self.dropped = time.perf_counter(), iter_num, None, 0
        self.seen = torch.zeros(2, dtype=torch.float64)  # (tokens, flops)

    def count(self, batch, model):
        self.seen += torch.tensor([batch["padding_mask"].sum().item(), batch_flops(model, batch)])

    def report(self, iter_num, total, n_global, lr, cfg, ddp, world, device, master):
        """Logs step iter_num: total is this process's summed loss of the step, n_global the supervised tokens of
        the global batch; under DDP both sums are all-reduced first."""
        seen = self.seen.to(device)
        if ddp:
            dist.all_reduce(total)
            dist.all_reduce(seen)  # every process's tokens and flops
        loss = total.item() / n_global  # the global per-token mean
        self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
        dt = time.perf_counter() - self.t0
        ms = dt * 1000 / (iter_num - self.last_logged)
        tps, flops_per_s = (seen / dt).tolist()
        line = (f"step {iter_num}/{cfg.max_iters}: loss {loss:.4f}, smoothed {self.smooth:.4f}, lr {lr:.2e}, "
                f"{ms:.0f} ms/step, {tps:,.0f} tokens/s, ETA {duration(ms / 1000 * (cfg.max_iters - iter_num))}")
        line += gpu_stats(flops_per_s, world) if device.startswith("cuda") else ""
        log(line + (f", {self.dropped} samples over max_len dropped" if self.dropped else ""))
        if master:
            row = dict(loss=loss, loss_smooth=self.smooth, lr=lr, ms_per_step=ms, tokens_per_s=tps,
                       flops_per_s=flops_per_s)
            record_metrics(cfg, iter_num, row, {f"train/{k}": v for k, v in row.items()})
        self.t0, self.last_logged, self.seen = time.perf_counter(), iter_num, torch.zeros(2, dtype=torch.float64)


def main(cfg):
    """The run, holding out_dir's lock (the first process takes it); a new run never replaces a checkpoint unless
    told to (overwrite)."""
    lock = OutDirLock(cfg.out_dir) if int(os.environ.get("RANK", 0)) == 0 else None
    try:
        has = os.path.exists(os.path.join(cfg.out_dir, M.LATEST)) or os.path.exists(os.path.join(cfg.out_dir,
                                                                                                  "train_state.pt"))
        if has and cfg.init_from != "resume" and not cfg.overwrite:
            raise M.UserError(f"{cfg.out_dir} already holds a checkpoint; continue it with --init_from=resume, "
                              f"choose another --out_dir, or replace it with --overwrite=True")
        return run(cfg)
    finally:
        if lock:
            lock.release()


def run(cfg):
    # --- the data files first, every image header opened once: a typo fails in a second, not after the model's
    # download and load
    records = {path: data.checked_records(path) for path in dict.fromkeys((cfg.train_data, cfg.val_data))}

    # --- setup: one process, or one of several under torchrun
    ddp, rank, world, device = setup_ddp(cfg)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    autocast = device.startswith("cuda") and cfg.dtype != "float32"
    ctx = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if autocast else nullcontext()

    # --- model and optimizer (on resume build() loads the model from out_dir, load_train_state the rest)
    model, tok, img_cfg = build(cfg)
    if cfg.lora_rank:
        lora.add_lora(model.model, cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank)
        if cfg.init_from == "resume":
            lora.load_adapters(model, M.checkpoint_dir(cfg.out_dir))
    model.to(device)
    model.model.checkpointing = cfg.checkpointing
    if cfg.fsdp:
        set_trainable(model, cfg)  # FSDP records what trains as it shards
        shard(model, cfg, device)
    groups = param_groups(model, cfg)
    # fused: one kernel over every tensor (the default on a CPU is a Python loop over them: 17 % of a quick-start step)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    iter_num, best_val = 0, float("inf")
    if cfg.init_from == "resume":
        iter_num, best_val = load_train_state(model, optimizer, cfg, device)
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names (and checkpoints) stay as they are
    raw = model  # evaluated and saved as it is, never through the DDP wrapper (FSDP shards in place)
    if ddp and not cfg.fsdp:
        # the projector (and in stage "all" the vision encoders) receive no gradient in a micro-batch without a
        # re-encoding sample (or without images), which mixed VPT data produces: DDP must look for unused parameters
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                    find_unused_parameters=cfg.stage != "align")

    # --- data: one step-indexed schedule per split
    tokens = getattr(raw, "tokens", None)  # the perception tokens; a plain Qwen2-VL has none
    train_set, val_set = (dataset(p, tok, img_cfg, tokens, cfg, records[p]) for p in (cfg.train_data, cfg.val_data))
    train_schedule = Schedule(train_set, cfg, rank, world)
    val_cfg = dataclasses.replace(cfg, grad_accum=1)  # validation: eval_iters micro-batches per process
    val_schedule = Schedule(val_set, val_cfg, rank, world)
    collate = Collate(tok.endoftext_id, tok.image_pad_id, img_cfg.merge_size, stand_in=cfg.fsdp)
    train_batches = loader(train_schedule, iter_num, cfg.max_iters, collate, cfg.num_workers)
    perception = torch.tensor(sorted(tokens.perception())) if tokens else None
    first = collate([train_schedule.dataset[i] for i in train_schedule.global_batch(train_schedule.step(iter_num)[0])])
    if first is not None:
        log_memory_plan(raw, first, cfg, device, world)

    # --- the loop: evaluate and save every eval_interval steps and at the end (not the step a resume starts from,
    # which its checkpoint holds); in between, optimizer steps
    first = iter_num
    if cfg.wandb_project and master:
        try:
            import wandb
        except ImportError:
            raise SystemExit("wandb_project is set but wandb is not installed: pip install wandb") from None
        wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    if master and cfg.init_from != "resume":
        open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w").close()  # a new run starts a new log; resume appends
    model.train()
    meter = Meter(iter_num)
    while True:
        done = iter_num >= cfg.max_iters
        if iter_num > first and (done or (cfg.eval_interval and iter_num % cfg.eval_interval == 0)):
            t_eval = time.perf_counter()  # evaluation and saving are left out of ms/step
            val_batches = loader(val_schedule, 0, cfg.eval_iters, collate, cfg.num_workers)
            best_val = min(best_val, validate(raw, val_batches, perception, ctx, device, iter_num, cfg, master))
            if master or cfg.fsdp:  # FSDP gathers the weights and writes the optimizer's shards: every process
                save_checkpoint(raw, tok, img_cfg, optimizer, iter_num, best_val, cfg)
            meter.t0 += time.perf_counter() - t_eval
        if done:
            break
        lr_scale = get_lr(iter_num, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        # the step's loss is the mean over every supervised token of the global batch, however it is split into
        # micro-batches and processes: each micro-batch's summed loss over the global count (all-reduced first).
        # DDP and FSDP average gradients over the world, hence the factor world. FSDP reduce-scatters every
        # micro-batch's gradients: skipping that sync would keep whole unsharded gradients, the memory it saves
        batches = [next(train_batches) for _ in range(cfg.grad_accum)]
        n_global = supervised_tokens(batches, device)
        total = torch.zeros((), dtype=torch.float64, device=device)  # summed loss of this process
        for micro, (k, batch) in enumerate(zip(train_schedule.step(iter_num), batches)):
            # DDP all-reduces gradients on the last micro-step only
            sync = model.no_sync() if ddp and not cfg.fsdp and micro < cfg.grad_accum - 1 else nullcontext()
            with sync:
                if batch is None:  # every sample of the micro-batch was over max_len
                    meter.dropped += cfg.batch_size
                    loss_sum = torch.zeros((), device=device)
                else:
                    meter.dropped += batch.pop("dropped")
                    batch["mask_modeling"] = mask_draw(batch, cfg, k)
                    meter.count(batch, raw)
                    batch = to_device(batch, device)
                    with ctx:
                        _, loss = model(batch, batch["targets"])  # mean over the micro-batch's supervised tokens
                    loss_sum = loss * int((batch["targets"] != data.IGNORE_INDEX).sum())
                backward(loss_sum, world / n_global, groups, iter_num, cfg)
            total += loss_sum.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            meter.report(iter_num, total, n_global, cfg.lr * lr_scale, cfg, ddp, world, device, master)
    if ddp:
        # gloo's worker thread frees a finished collective's tensors under the GIL, and destroying the group joins
        # that thread while holding the GIL: a hang at exit (seen under load, in the DDP wrapper's Reducer freed
        # after destroy_process_group). So: the wrapper goes first, while the group is registered; the barrier
        # drains the queue; the sleep hands the GIL to the worker to free it; then the group is destroyed.
        del model
        dist.barrier()
        time.sleep(0.5)
        dist.destroy_process_group()
    return raw


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["--plot"]:  # python train.py --plot out_dir
            plot(sys.argv[2])
        else:
            main(parse_config(sys.argv[1:]))
    except (M.UserError, OSError) as e:  # the user's settings, files or disk: one line; a bug keeps its traceback
        # under torchrun every rank meets the same error: rank 0 says it, the others exit with the same status quietly
        sys.exit(f"train.py: error: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)

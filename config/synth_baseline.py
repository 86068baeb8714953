# The quick start's baseline: the same model, stage 1, steps, images, questions and answers as config/synth.py,
# without perception tokens (a plain Qwen2-VL that sees only the 112x112 global view).
init_from = "out-synth-ground"  # the same stage 1 as the VPT run: its ViT, LLM, tokenizer and image size
use_vpt = False
train_data = "data/synth/train_baseline.jsonl"
val_data = "data/synth/val_baseline.jsonl"
out_dir = "out-synth-baseline"
stage = "all"
batch_size = 16
grad_accum = 1
max_iters = 600
lr = 1e-3
beta2 = 0.95
warmup_frac = 0.05
min_lr_ratio = 0.1
weight_decay = 0.1  # keeps the vision tower from drifting while the LLM does not yet look at it (0.01: never learns)
eval_interval = 200
eval_iters = 4
log_interval = 20
num_workers = 0
device = "cpu"
dtype = "float32"

# A grounding stage before the quick start's VPT run, what pretraining gives the real Qwen2-VL before VPT fine-tunes
# it: the model learns from scratch to point at the shape a question names ("Where is the green square?", and every
# shape listed with its region) on scenes of its own (python synth.py), then config/synth.py continues from it with
# --init_from=out-synth-ground. The VPT model is built here already (its DINOv2 and projector untouched: no record
# re-encodes), so the next run loads it as it is. Pointing from scratch is a plateau: the validation loss stays above
# 0.13 until about step 1,500-2,000 of 16, then falls to 0.02 or below by step 3,000 (two seeds).
init_from = "scratch"
model_preset = "synth"
tokenizer = "data/synth/tokenizer.json"
min_pixels = 3136
max_pixels = 12544  # 112 * 112, as config/synth.py
use_vpt = True
grid = 2  # as config/synth.py
region_margin = 0
train_data = "data/synth/ground.jsonl"
val_data = "data/synth/ground_val.jsonl"
out_dir = "out-synth-ground"
stage = "all"
batch_size = 16  # more, smaller steps: the plateau ends after a number of steps (3,000 of 16 left it; 1,000 of 32 did not)
grad_accum = 1
max_iters = 3000
lr = 1e-3
beta2 = 0.95
warmup_frac = 0.05
min_lr_ratio = 0.1
weight_decay = 0.1
eval_interval = 500
eval_iters = 8
log_interval = 50
num_workers = 0
device = "cpu"
dtype = "float32"

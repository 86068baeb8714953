# Stage 2 of the quick start: the VPT recipe on the synthetic look-closer set (python synth.py), continuing from stage 1
# (config/synth_ground.py) on a CPU. The global view is 112x112 pixels (4x4 image tokens), so the digits can only be
# read in a region crop, the checkered squares only in the DINOv2 view (224 px).
init_from = "out-synth-ground"  # stage 1 (config/synth_ground.py): its model, tokenizer, image size and grid
use_vpt = True
train_data = "data/synth/train.jsonl"
val_data = "data/synth/val.jsonl"
out_dir = "out-synth"
stage = "all"
batch_size = 16
grad_accum = 1
max_iters = 600
lr = 1e-3
beta2 = 0.95  # nanoGPT's value for small models trained from scratch: steadier than 0.999
warmup_frac = 0.05
min_lr_ratio = 0.1
weight_decay = 0.1  # keeps the vision tower from drifting while the LLM does not yet look at it (0.01: never learns)
mask_prob = 0.5
eval_interval = 200
eval_iters = 4
log_interval = 20
num_workers = 0
device = "cpu"
dtype = "float32"

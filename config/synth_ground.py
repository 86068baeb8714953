# Stage 1 of the quick start, what pretraining and the paper's alignment stage give the real Qwen2-VL before VPT
# fine-tunes it, here from scratch on scenes of its own (python synth.py, ground.jsonl): "Where is the green square?"
# answered by its region, every shape listed with its region, a digit read from a quadrant's crop given alone, and the
# checkered squares counted from the DINOv2 view in the user turn with no control token (the alignment stage's form:
# the projector's feature path learns to carry the view). config/synth.py and config/synth_baseline.py continue from
# its out_dir. Pointing from scratch is a plateau: the validation loss stays near 0.2 until step 1,500-2,000 of 16,
# then falls to 0.05 or below by step 3,000 (the default seed: 0.208 / 0.122 / 0.051 at steps 1,000 / 2,000 / 3,000).
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
batch_size = 16  # more, smaller steps: the plateau ends after a number of steps (3,000 of 16 leave it, 1,000 of 32 not)
grad_accum = 1
max_iters = 3000
lr = 1e-3
beta2 = 0.95
warmup_frac = 0.05
min_lr_ratio = 0.1
weight_decay = 0.1
eval_interval = 1000
eval_iters = 8
log_interval = 50
num_workers = 0
device = "cpu"
dtype = "float32"

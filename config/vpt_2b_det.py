# Stage 2 of VPT-Det: instruction tuning of everything but the vision encoders, from the aligned checkpoint.
# Source: configs/Qwen2-VL-2b-VPT-Det.yaml in yu-rp/VisualPerceptionToken: lr 2e-5, 8 per device x 4
# accumulation, max_steps 6000, cosine with 3 % warm-up, cutoff 2048, mask modeling p = 0.5 (the yaml's misspelt
# `ara_mask_id` switched it off).
# Global batch 256 on 8 GPUs: 8 x 4 x 8. The 2B model at 2048 tokens needs activation checkpointing on 80 GB.
init_from = "out-align-2b-det"
encoder = "dino"
stage = "finetune"
train_data = "data/vpt/MixVRT_Detection_Full.json"
val_data = "data/vpt/MixVRT_Detection_val.json"
out_dir = "out-vpt-2b-det"
batch_size = 8
grad_accum = 4
lr = 2e-5
max_iters = 6000
warmup_frac = 0.03
max_len = 2048
mask_prob = 0.5
checkpointing = True
eval_interval = 500

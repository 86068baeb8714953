# Stage 2 of VPT-Seg: instruction tuning of everything but the vision encoders, from the SAM-aligned checkpoint.
# Source: configs/Qwen2-VL-2b-VPT-Seg.yaml in yu-rp/VisualPerceptionToken: lr 2e-5, 4 per device x 8 accumulation,
# max_steps 6000, cosine with 3 % warm-up, cutoff 2048, mask modeling p = 0.5 (para_mask_id 1, para_mask_ratio 0.5),
# freefreeze_frozen_modules visual,seg_model.
# Global batch 256 on 8 GPUs: 4 x 8 x 8. SAM-L encodes each re-encoded image at 1024 px (about 3x DINOv2-L's FLOPs).
init_from = "out-align-2b-sam"
encoder = "sam"
stage = "finetune"
train_data = "data/vpt/MixVRT_Seg_Full.json"
val_data = "data/vpt/MixVRT_Seg_val.json"
out_dir = "out-vpt-2b-seg"
batch_size = 4
grad_accum = 8
lr = 2e-5
max_iters = 6000
warmup_frac = 0.03
max_len = 2048
mask_prob = 0.5
checkpointing = True
eval_interval = 500

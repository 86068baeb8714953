# VPT-CLIP: instruction tuning of Qwen2-VL-2B-Instruct with Qwen's own ViT as the re-encoder (no alignment stage).
# Source: configs/Qwen2-VL-2b-VPT-CLIP.yaml in yu-rp/VisualPerceptionToken: lr 2e-5, 4 per device x 8
# accumulation, max_steps 6000, cosine with 3 % warm-up, mask modeling p = 0.5, everything but `visual` trained.
# Global batch 256 on 8 GPUs. (The authors' LLaMA-Factory/data/dataset_info.json maps no clip_images column, so
# their run could not read <clip_image>.)
init_from = "Qwen/Qwen2-VL-2B-Instruct"
encoder = "clip"
stage = "finetune"
train_data = "data/vpt/MixVRT_CLIP_Full.json"
val_data = "data/vpt/MixVRT_CLIP_val.json"
out_dir = "out-vpt-2b-clip"
batch_size = 4
grad_accum = 8
lr = 2e-5
max_iters = 6000
warmup_frac = 0.03
max_len = 2048
mask_prob = 0.5
checkpointing = True
eval_interval = 500

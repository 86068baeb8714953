# Stage 1 of VPT-Det: align the DINOv2-L projector to Qwen2-VL-2B-Instruct (the projector only, no control tokens).
# Source: configs/Qwen2-VL-2b-VPT-Det-Alignment.yaml in yu-rp/VisualPerceptionToken: lr 2e-3, 16 per device x 4
# accumulation, 1 epoch over llava_alignment_detection_qwen_response_train (585k), cosine with 3 % warm-up.
# Global batch 128 on 2 GPUs here: 16 x 4 x 2.
init_from = "Qwen/Qwen2-VL-2B-Instruct"
encoder = "dino"
dino = "facebook/dinov2-large"
stage = "align"
train_data = "data/vpt/llava_alignment_detection_qwen_response_train.json"
val_data = "data/vpt/llava_alignment_detection_qwen_response_val.json"
out_dir = "out-align-2b-det"
batch_size = 16
grad_accum = 4
lr = 2e-3
max_iters = 4570  # 585k samples / 128
warmup_frac = 0.03
max_len = 2048
mask_prob = 0.0
eval_interval = 500

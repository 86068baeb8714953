# Stage 1 of VPT-Seg: align the SAM-L projector to Qwen2-VL-2B-Instruct (the projector only, no control tokens).
# Source: configs/Qwen2-VL-2b-VPT-Sam-Alignment.yaml in yu-rp/VisualPerceptionToken: lr 2e-3, 16 per device x 4
# accumulation, 1 epoch over llava_alignment_seg_qwen_response_train, cosine with 3 % warm-up, vision_encoder_ls sam.
# Global batch 128 on 2 GPUs here: 16 x 4 x 2. The set's size is not in the repository; max_iters assumes the 585k
# records of the parallel detection alignment set.
init_from = "Qwen/Qwen2-VL-2B-Instruct"
encoder = "sam"
sam = "facebook/sam-vit-large"
stage = "align"
train_data = "data/vpt/llava_alignment_seg_qwen_response_train.json"
val_data = "data/vpt/llava_alignment_seg_qwen_response_val.json"
out_dir = "out-align-2b-sam"
batch_size = 16
grad_accum = 4
lr = 2e-3
max_iters = 4570  # 585k samples / 128
warmup_frac = 0.03
max_len = 2048
mask_prob = 0.0
eval_interval = 500

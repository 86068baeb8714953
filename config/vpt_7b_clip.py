# VPT-CLIP at 7B: LoRA on Qwen2-VL-7B-Instruct with Qwen's own ViT as the re-encoder.
# Source: configs/Qwen2-VL-7b-VPT-CLIP.yaml in yu-rp/VisualPerceptionToken: finetuning_type lora, lora_rank 512,
# lora_target all (every Linear of the LLM, model.model), lora_alpha unset (LLaMA-Factory's default 2 * rank = 1024),
# modules_to_save clip_projector, lm_head, model.embed_tokens (trained fully); lr 2e-5, 4 per device x 8
# accumulation, max_steps 6000, cosine with 3 % warm-up, mask modeling p = 0.5. The yaml's dataset is spelled
# MixVR_CLIP_Full (sic); the data is the 2B CLIP run's. 7B unties lm_head from embed_tokens.
init_from = "Qwen/Qwen2-VL-7B-Instruct"
encoder = "clip"
stage = "finetune"
lora_rank = 512
lora_alpha = 1024.0
train_data = "data/vpt/MixVRT_CLIP_Full.json"
val_data = "data/vpt/MixVRT_CLIP_val.json"
out_dir = "out-vpt-7b-clip"
batch_size = 4
grad_accum = 8
lr = 2e-5
max_iters = 6000
warmup_frac = 0.03
max_len = 2048
mask_prob = 0.5
checkpointing = True
eval_interval = 500

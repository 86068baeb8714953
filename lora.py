"""
LoRA (Hu et al., arXiv 2106.09685) on the LLM's Linear layers, as the VPT authors fine-tune 7B: every Linear of the
language model (lora_target all, which LLaMA-Factory's model/adapter.py resolves to the Linear layers inside
model.model), rank 512, alpha 1024, with embed_tokens, lm_head and the projector trained fully
(configs/Qwen2-VL-7b-VPT-CLIP.yaml in github.com/yu-rp/VisualPerceptionToken). y = W x + b + (alpha / r) B A x with
A (r, in) random and B (out, r) zero, so training starts at the base model exactly; W and b stay frozen.
Checkpoints hold the merged weights W + (alpha / r) B A under the plain names (what sample.py and transformers load)
and the adapters beside them in lora.pt (what resume needs; not *.safetensors, which loaders read as model weights).
"""
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTERS = "lora.pt"


class LoRALinear(nn.Module):
    """A Linear with a low-rank update. weight and bias are the base layer's own Parameters, so parameter names,
    loading and the base values stay as they were; lora_A and lora_B are added beside them."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.scale = alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as the LoRA paper's code and PEFT
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self):
        return torch.addmm(self.weight, self.lora_B, self.lora_A, alpha=self.scale)  # W + scale * B A


def add_lora(module, rank, alpha):
    """Replaces every nn.Linear inside module (the LLM: model.model) with a LoRALinear around it, in place."""
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Linear:
                setattr(child, attr, LoRALinear(sub, rank, alpha))


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def merged(model):
    """Inside, the model's state_dict() is the plain model's: each LoRALinear is swapped for an nn.Linear holding
    its merged weight (on the CPU, one layer on the device at a time), and put back on leaving."""
    swapped = []
    with torch.no_grad():
        for name, m in lora_layers(model):
            parent, _, attr = name.rpartition(".")
            plain = nn.Linear(m.weight.size(1), m.weight.size(0), bias=m.bias is not None, device="meta")
            plain.weight = nn.Parameter(m.merged_weight().cpu(), requires_grad=False)
            if m.bias is not None:
                plain.bias = nn.Parameter(m.bias.detach().cpu(), requires_grad=False)
            setattr(model.get_submodule(parent), attr, plain)
            swapped.append((parent, attr, m))
    try:
        yield model
    finally:
        for parent, attr, m in swapped:
            setattr(model.get_submodule(parent), attr, m)


def adapters(model):
    """Every lora_A and lora_B under its parameter name, on the CPU."""
    return {f"{n}.{p}": getattr(m, p).detach().cpu() for n, m in lora_layers(model) for p in ("lora_A", "lora_B")}


def merge_state_dict(sd, scale):
    """A full state dict of a model with adapters (train.py gathers an FSDP model's) -> (the merged weights under the
    plain names, what merged() gives, and the adapters, what adapters() gives)."""
    lora_keys = {k for k in sd if k.endswith((".lora_A", ".lora_B"))}
    plain = {k: v for k, v in sd.items() if k not in lora_keys}
    for k in lora_keys:
        if k.endswith(".lora_A"):
            layer = k.removesuffix(".lora_A")
            plain[f"{layer}.weight"] = torch.addmm(sd[f"{layer}.weight"], sd[f"{layer}.lora_B"], sd[k], alpha=scale)
    return plain, {k: sd[k] for k in sorted(lora_keys)}


def save_adapters(adapters, path):
    """path/lora.pt: the adapters (adapters(), merge_state_dict)."""
    torch.save(adapters, os.path.join(path, ADAPTERS))


def load_adapters(model, path):
    """Resume: the adapters from path/lora.pt, and the base weights recovered from the merged ones the checkpoint
    holds (W = merged - scale * B A, exact up to float rounding)."""
    sd = torch.load(os.path.join(path, ADAPTERS), map_location=model.lm_head.weight.device, weights_only=True)
    with torch.no_grad():
        for n, m in lora_layers(model):
            m.lora_A.copy_(sd.pop(f"{n}.lora_A"))
            m.lora_B.copy_(sd.pop(f"{n}.lora_B"))
            m.weight.sub_(m.lora_B @ m.lora_A * m.scale)
    if sd:
        raise KeyError(f"{path}/{ADAPTERS}: adapters for layers the model lacks: {', '.join(sorted(sd)[:8])}")

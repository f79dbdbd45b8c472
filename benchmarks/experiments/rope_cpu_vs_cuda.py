"""Rotary tables of SmolLM2-135M's configuration computed on the CPU and on the GPU, compared bit for bit."""
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                     max_position_embeddings=8192)
positions = torch.arange(2048)[None]
x = torch.zeros(1, 2048, 576)
tables = {}
for device in ("cpu", "cuda"):
    rotary = LlamaRotaryEmbedding(config).to(device)
    cos, sin = rotary(x.to(device), positions.to(device))
    tables[device] = (cos.cpu(), sin.cpu(), rotary.inv_freq.cpu())
for k, name in enumerate(("cos", "sin", "inv_freq")):
    a, b = tables["cpu"][k], tables["cuda"][k]
    print(f"{name}: {int((a != b).sum())} of {a.numel()} entries differ, max |diff| {float((a - b).abs().max()):.3e}")

"""Tiny random causal LMs built from configs, with a small byte-level BPE tokenizer trained on shipped text."""
from pathlib import Path

import torch

from sparseswaps.data import corpus_file


def tiny_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False)
    text = corpus_file("wikitext2").read_text()[:200_000]
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_model(family: str):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, OPTConfig

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True)
    elif family == "opt":
        config = OPTConfig(vocab_size=400, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=1024, word_embed_proj_dim=64)
    elif family == "gemma3":   # 7 layers: sliding-window layers and one full-attention layer
        config = Gemma3TextConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=1024, sliding_window=16)
    else:
        raise ValueError(family)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny(path: Path, family: str) -> Path:
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path

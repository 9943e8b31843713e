"""Build a `LlamaModel` from a model source: a local HF checkpoint or a `random:<preset>`.

Checkpoints: config.json through transformers' AutoConfig (offline), weights streamed tensor by tensor
from safetensors straight onto the target device, fused per layer (q/k/v -> wqkv, gate/up -> w13) as
they arrive. Nothing is initialised first and overwritten later, so peak memory is the model plus one
layer's unfused projections, not two copies. Random presets draw seeded weights directly on the device.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable

import torch

from replica.config import ConfigError
from replica.models.llama import LayerWeights, LlamaModel, ModelShape, rope_tables
from replica.presets import is_random, preset_config

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_hf_config(model: str, max_seq_len: int):
    if is_random(model):
        return preset_config(model, max_seq_len)
    if not os.path.isdir(model):
        raise ConfigError(f"model {model!r} is neither a local checkpoint directory nor 'random:<preset>' "
                          "(graphserve never downloads at run time: download the checkpoint first)")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    if cfg.model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"model_type {cfg.model_type!r} is not supported; graphserve runs the Llama "
                          f"family: {', '.join(SUPPORTED_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):    # Llama/Qwen3 options graphserve's layers lack
        if cfg.model_type != "qwen2" and getattr(cfg, flag, False):
            raise ConfigError(f"the model sets {flag}=true, which graphserve does not implement")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < max_seq_len:
        raise ConfigError(f"the model uses sliding-window attention ({window} tokens), which graphserve does "
                          f"not implement; set max_seq_len <= {window}")
    return cfg


def load_model(model: str, max_seq_len: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Returns (LlamaModel, hf_config)."""
    cfg = load_hf_config(model, max_seq_len)
    shape = ModelShape.from_hf_config(cfg)
    get = _random_source(shape, device, dtype, seed) if is_random(model) else \
        _safetensors_source(model, device, dtype)
    layers = []
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        qkv = [get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        bias = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if shape.qkv_bias else None
        gate_up = [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]
        qk_norm = [get(p + f"self_attn.{n}_norm.weight") for n in "qk"] if shape.qk_norm else [None, None]
        layers.append(LayerWeights(
            ln1=get(p + "input_layernorm.weight"), wqkv=torch.cat(qkv), bqkv=bias,
            wo=get(p + "self_attn.o_proj.weight"), ln2=get(p + "post_attention_layernorm.weight"),
            w13=torch.cat(gate_up), w2=get(p + "mlp.down_proj.weight"), q_norm=qk_norm[0], k_norm=qk_norm[1]))
        del qkv, gate_up
    embed = get("model.embed_tokens.weight")
    lm_head = embed if shape.tie_embeddings else get("lm_head.weight")
    cos, sin = rope_tables(cfg, max_seq_len, device)
    return LlamaModel(shape, embed, layers, get("model.norm.weight"), lm_head, cos, sin), cfg


def _safetensors_source(path: str, device: torch.device, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ConfigError(f"no *.safetensors weights in {path}; save the model with safe_serialization")
        where = {}
        for fn in files:
            with safe_open(fn, framework="pt") as f:
                where.update({k: fn for k in f.keys()})
    handles: dict[str, object] = {}
    target = str(device) if device.type == "cuda" else "cpu"

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise ConfigError(f"checkpoint {path} lacks tensor {name!r}")
        fn = where[name]
        if fn not in handles:
            handles[fn] = safe_open(fn, framework="pt", device=target)
        return handles[fn].get_tensor(name).to(dtype)
    return get


def _random_source(shape: ModelShape, device, dtype, seed: int) -> Callable[[str], torch.Tensor]:
    """Seeded N(0, 0.02) matrices and unit norms, drawn on the device in the target dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    D, I, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    dims = {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
            "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I),
            "embed_tokens": (V, D), "lm_head": (V, D)}

    def get(name: str) -> torch.Tensor:
        parts = name.split(".")
        if parts[-2] in ("q_norm", "k_norm"):                    # Qwen3: per head
            return torch.ones(shape.head_dim, device=device, dtype=dtype)
        if parts[-2].endswith("norm"):
            return torch.ones(D, device=device, dtype=dtype)
        if parts[-1] == "bias":
            return torch.zeros(dims[parts[-2]][0], device=device, dtype=dtype)
        t = torch.empty(dims[parts[-2]], device=device, dtype=dtype)
        return t.normal_(0.0, 0.02, generator=gen)
    return get

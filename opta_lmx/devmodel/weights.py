"""The weights of a generated model: config.json and seeded random tensors in safetensors files."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from opta_lmx.devmodel.sizes import (
    BOS_TOKEN,
    EOS_TOKEN,
    INIT_STD,
    LOGIT_STD,
    MAX_SHARD_BYTES,
    PAD_TOKEN,
    SIZES,
    SPECIAL_TOKENS,
)
from opta_lmx.devmodel.tokenizer import write_json as _write_json

def tensor_plan(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every weight, in Hugging Face llama naming and file order."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg["head_dim"]
    q_dim = cfg["num_attention_heads"] * head_dim
    kv_dim = cfg["num_key_value_heads"] * head_dim
    plan: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (vocab, h), "normal"),
    ]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "self_attn.q_proj.weight", (q_dim, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv_dim, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv_dim, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, q_dim), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
            (p + "mlp.gate_proj.weight", (inter, h), "normal"),
            (p + "mlp.up_proj.weight", (inter, h), "normal"),
            (p + "mlp.down_proj.weight", (h, inter), "normal"),
        ]
    plan.append(("model.norm.weight", (h,), "logit_scale"))
    if not cfg["tie_word_embeddings"]:
        plan.append(("lm_head.weight", (vocab, h), "normal"))
    return plan


def _make_tensor(name: str, shape: tuple[int, ...], init: str, seed: int, dtype: str,
                 zero_rows: list[int] | None = None) -> np.ndarray:
    if init == "ones":
        return np.ones(shape, dtype=dtype)
    if init == "logit_scale":  # RMSNorm output has norm sqrt(hidden); logits = h . w, w ~ N(0, std)
        return np.full(shape, LOGIT_STD / (INIT_STD * shape[0] ** 0.5), dtype=dtype)
    # Each tensor has its own stream derived from (seed, name): independent of order and sharding.
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(np.random.SeedSequence([seed, key]))
    arr = rng.standard_normal(shape, dtype=np.float32)
    arr *= INIT_STD
    if zero_rows:
        arr[zero_rows] = 0.0
    return arr if dtype == "float32" else arr.astype(dtype)


def _model_config(size: str, dtype: str, vocab_size: int) -> dict[str, Any]:
    hp = dict(SIZES[size])
    hp["vocab_size"] = vocab_size
    hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp["hidden_size"],
        "intermediate_size": hp["intermediate_size"],
        "num_hidden_layers": hp["num_hidden_layers"],
        "num_attention_heads": hp["num_attention_heads"],
        "num_key_value_heads": hp["num_key_value_heads"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "vocab_size": hp["vocab_size"],
        "max_position_embeddings": hp["max_position_embeddings"],
        "rms_norm_eps": hp["rms_norm_eps"],
        "rope_theta": hp["rope_theta"],
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": hp["tie_word_embeddings"],
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "torch_dtype": dtype,
        "use_cache": True,
    }


def _write_weights(out: pathlib.Path, cfg: dict[str, Any], seed: int, dtype: str,
                   progress: Callable[[str], None], silenced: list[int]) -> list[str]:
    """Write the safetensors file(s); at most one shard is held in memory at a time."""
    from safetensors.numpy import save_file

    itemsize = np.dtype(dtype).itemsize
    plan = tensor_plan(cfg)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    shard_bytes = 0
    for entry in plan:
        nbytes = int(np.prod(entry[1])) * itemsize
        if shards[-1] and shard_bytes + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes
    n = len(shards)
    names = (["model.safetensors"] if n == 1
             else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    n_layers = cfg["num_hidden_layers"]
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for fname, entries in zip(names, shards):
        tensors: dict[str, np.ndarray] = {}
        for name, shape, init in entries:
            m = re.match(r"model\.layers\.(\d+)\.input_layernorm", name)
            if m:
                progress(f"writing layer {int(m.group(1)) + 1}/{n_layers}")
            elif name == "model.embed_tokens.weight":
                progress("writing embeddings")
            elif name == "lm_head.weight":
                progress("writing lm_head")
            zero_rows = silenced if name == "lm_head.weight" else None
            tensors[name] = _make_tensor(name, shape, init, seed, dtype, zero_rows)
            weight_map[name] = fname
            total_bytes += tensors[name].nbytes
        save_file(tensors, out / fname, metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)  # safetensors creates files 0600
        del tensors
        if n > 1:
            progress(f"wrote {fname}")
    if n > 1:
        _write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        })
        names.append("model.safetensors.index.json")
    return names

"""Tiny GGUF files for tests: a random Llama written with the ``gguf`` package's writer.

The file holds what llama.cpp's converter would write for a Llama checkpoint (the
``llama.*`` hyperparameters, a byte-level BPE vocabulary with its merges, the chat
template, and the tensors under GGUF names, q/k rows in llama.cpp's rotary order), so
transformers' GGUF loader reads it as it reads a real one. ``write_tiny_gguf`` also
returns the model it wrote, to compare the loaded copy against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from .families import make_tokenizer

# transformers name -> GGUF name (``{i}`` is the layer) for a Llama checkpoint.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _rotary_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores each head's q/k rows interleaved (pairs), HF as two halves."""
    rows = weight.shape[0]
    split = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])  # [H, 2, D/2, in]
    return split.swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    config: Any = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            weight = state[f"model.layers.{i}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                weight = _rotary_order(weight, config.num_attention_heads)
            elif gguf_name == "attn_k.weight":
                weight = _rotary_order(weight, config.num_key_value_heads)
            out[f"blk.{i}.{gguf_name}"] = weight
    return out


def write_tiny_gguf(
    path: str | Path,
    seed: int = 0,
    architecture: str = "llama",
    quantization: str = "F32",
    context: int = 256,
    chat_template: str | None = None,
    full_vocab: bool = False,
    init_range: float = 0.2,
) -> LlamaForCausalLM:
    """Write a random two-layer Llama with the test tokenizer to ``path``; return the model.

    ``quantization``: "F32" (exact round trip), "Q8_0" (the 2-D weights quantised), or the
    name of any ``gguf.GGMLQuantizationType`` (one gguf cannot quantise to is written as
    zero blocks, to test refusals). ``architecture`` is
    what the file claims (``general.architecture``), to test refusals. ``chat_template``
    replaces the test tokenizer's. ``full_vocab``: the vocabulary lists a token for each
    of the 8 padding rows (``<|endoftext|>``, which transformers' GGUF tokenizer would add
    anyway, then unused ones), as llama.cpp wants a token per embedding row.
    ``init_range``: the weights' standard deviation (smaller: softer distributions).
    """
    import gguf

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    kv_heads, rope_theta = 2, 10000.0
    config = LlamaConfig(
        # Padded embedding rows, as real checkpoints have (and room for the
        # ``<|endoftext|>`` that transformers' GGUF byte-level tokenizer adds).
        vocab_size=len(tokenizer) + 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        initializer_range=init_range,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = backend["model"]["vocab"]
    for added in backend["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {a["content"] for a in backend["added_tokens"]}
    if full_vocab:
        padding = ["<|endoftext|>", *[f"<|unused_{i}|>" for i in range(1, 8)]]
        tokens += padding[: config.vocab_size - len(tokens)]
        special |= set(padding)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(int(tokenizer.bos_token_id))
    writer.add_eos_token_id(int(tokenizer.eos_token_id))
    writer.add_pad_token_id(int(tokenizer.pad_token_id))
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template or str(tokenizer.chat_template))

    qtype = gguf.GGMLQuantizationType[quantization]
    for name, weight in _gguf_tensors(model).items():
        _add_tensor(writer, gguf, name, weight, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _add_tensor(writer: Any, gguf: Any, name: str, weight: np.ndarray, qtype: Any) -> None:
    if weight.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, weight.astype(np.float32))
        return
    try:
        data = gguf.quants.quantize(weight.astype(np.float32), qtype)
    except NotImplementedError:  # a type gguf cannot write: zero blocks of its byte size
        data = np.zeros(gguf.quants.quant_shape_to_byte_shape(weight.shape, qtype), np.uint8)
    writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


# What the llama.cpp families write: a token per embedding row; weights quantised as the
# real model's are (Q4_1), whose kernels give a row the same logits whatever else shares
# its matrix product (float32 weights take kernels that depend on the rows by ~1e-6,
# which random weights' sharp distributions amplify to ~1e-3 in a log-prob); and weights
# small enough that the distributions are not that sharp anyway.
LLAMA_CPP_READY: dict[str, Any] = {"full_vocab": True, "quantization": "Q4_1", "init_range": 0.05}


def make_gguf_family(folder: str | Path, num_policies: int = 3, **yaml_extra: Any) -> Path:
    """K random tiny GGUF Llamas and a GGUF reference, all on llama.cpp; return the YAML."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"p{i}" for i in range(num_policies)]
    for seed, name in enumerate([*names, "ref"]):
        write_tiny_gguf(folder / f"{name}.gguf", seed=10 + seed, **LLAMA_CPP_READY)
    config = {
        "served_name": "tiny-gguf",
        "backend": "llama.cpp",
        "reference": {"name": "ref", "model": "ref.gguf"},
        "policies": [{"name": name, "model": f"{name}.gguf"} for name in names],
        **yaml_extra,
    }
    path = folder / "policies.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_gguf_persona_family(folder: str | Path, **yaml_extra: Any) -> Path:
    """One random tiny GGUF Llama (``base``, whose template opens with a default system
    message) and the test personas of it, on llama.cpp; return the YAML."""
    from .families import CHAT_TEMPLATE_WITH_DEFAULT_SYSTEM, PERSONAS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = CHAT_TEMPLATE_WITH_DEFAULT_SYSTEM
    write_tiny_gguf(folder / "base.gguf", seed=20, chat_template=template, **LLAMA_CPP_READY)
    config = {
        "served_name": "tiny-gguf-personas",
        "backend": "llama.cpp",
        "reference": {"name": "base", "model": "base.gguf"},
        "policies": [{"name": n, "persona": "base", **prompt} for n, prompt in PERSONAS.items()],
        **yaml_extra,
    }
    path = folder / "policies.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path

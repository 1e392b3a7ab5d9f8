"""Tiny adapter families for tests and benchmarks: a random base, LoRA adapters of it made
with PEFT, and the same adapters merged into full copies of the base.

Both families are written as policy-set YAMLs over the same folders, so a test can serve
one mixture through the adapter backend and through the full-model backend and compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from .families import POLICY_NAMES, make_tiny_family

ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt2": ["c_attn"]}
MLP = {"llama": ["gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc"]}


@dataclass
class LoraShape:
    """One adapter to make: rank, alpha and which layers it targets."""

    r: int = 4
    alpha: int = 8
    targets: str = "all"  # "attention", "mlp" or "all" (every linear layer but the head)
    rslora: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more LoraConfig arguments


@dataclass
class AdapterFamilyPaths:
    adapters_yaml: Path  # base + adapters
    merged_yaml: Path  # the adapters merged into full models, the base as reference
    base: Path
    adapters: dict[str, Path]


def lora_config(arch: str, shape: LoraShape) -> LoraConfig:
    targets: str | list[str] = "all-linear"
    if shape.targets == "attention":
        targets = ATTENTION[arch]
    elif shape.targets == "mlp":
        targets = MLP[arch]
    return LoraConfig(
        r=shape.r,
        lora_alpha=shape.alpha,
        target_modules=targets,
        use_rslora=shape.rslora,
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores its weight as [in, out]
        **shape.extra,
    )


def make_adapter(
    base: Path, out: Path, arch: str, shape: LoraShape, seed: int, std: float = 0.3
) -> Any:
    """Save one LoRA adapter of ``base`` under ``out`` (A and B drawn from N(0, std), so
    that B is not zero); return the PeftModel."""
    model = AutoModelForCausalLM.from_pretrained(str(base))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(arch, shape))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero: the adapter would be the base
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(out))
    return peft_model


def make_adapter_family(
    folder: str | Path,
    shapes: list[LoraShape],
    arch: str = "llama",
    seed: int = 0,
    merged: bool = True,
    lora_std: float = 0.3,
    **size: Any,
) -> AdapterFamilyPaths:
    """A random base under ``folder``, one adapter per shape, and (if ``merged``) each
    adapter merged into a full copy of the base, with a YAML for each family."""
    folder = Path(folder)
    make_tiny_family(folder, arch=arch, num_policies=0, with_reference=True, seed=seed, **size)
    base = (folder / "base").resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    names = list(POLICY_NAMES[: len(shapes)])
    adapters: dict[str, Path] = {}
    for k, (name, shape) in enumerate(zip(names, shapes)):
        adapters[name] = folder / f"lora_{name}"
        peft_model = make_adapter(
            base, adapters[name], arch, shape, seed * 1000 + 100 + k, lora_std
        )
        if merged:
            full = peft_model.merge_and_unload()
            full.save_pretrained(folder / f"merged_{name}")
            tokenizer.save_pretrained(folder / f"merged_{name}")
    common = {"device": "cpu", "dtype": "float32", "speculative": {"method": "off"}}
    adapter_config = {
        "served_name": "tiny",
        "base": {"name": "base", "model": "base"},
        "policies": [{"name": n, "adapter": f"lora_{n}"} for n in names],
        **common,
    }
    merged_config = {
        "served_name": "tiny",
        "reference": {"name": "base", "model": "base"},
        "policies": [{"name": n, "model": f"merged_{n}"} for n in names],
        **common,
    }
    adapters_yaml, merged_yaml = folder / "adapters.yaml", folder / "merged.yaml"
    adapters_yaml.write_text(yaml.safe_dump(adapter_config, sort_keys=False))
    merged_yaml.write_text(yaml.safe_dump(merged_config, sort_keys=False))
    return AdapterFamilyPaths(adapters_yaml, merged_yaml, base, adapters)

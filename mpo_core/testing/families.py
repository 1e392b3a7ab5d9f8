"""Tiny policy families for tests and benchmarks, built offline with ``save_pretrained``.

The models are randomly initialised (no training), so their text is gibberish, but they
go through exactly the loading path real checkpoints take: a folder per model with its
config, weights and tokenizer, and a policy-set YAML that names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

POLICY_NAMES = ("helpful", "harmless", "concise", "honest", "funny", "formal")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Could you please help me write a short poem about the sea?",
    "Sure! Here is a short answer, kept brief and friendly.",
    "Thank you so much, that was very kind of you.",
    "I am sorry, I cannot do that, but I can suggest something else.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like ! ? , . : ; - work too.",
]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences: any text encodes, no UNK."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _make_model(arch: str, vocab_rows: int, tokenizer: PreTrainedTokenizerFast, **size: Any) -> Any:
    common = dict(
        vocab_size=vocab_rows,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    hidden, layers, heads = size["hidden"], size["layers"], size["heads"]
    if arch == "llama":
        llama = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=size.get("intermediate", 4 * hidden),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=size.get("kv_heads", heads),
            max_position_embeddings=size["max_positions"],
            initializer_range=size["init_range"],
            tie_word_embeddings=False,
            **common,
        )
        return LlamaForCausalLM(llama)
    if arch == "gpt2":
        gpt2 = GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=size["max_positions"],
            initializer_range=size["init_range"],
            **common,
        )
        return GPT2LMHeadModel(gpt2)
    raise ValueError(f"unknown arch {arch!r}: use 'llama' or 'gpt2'")


def make_tiny_family(
    folder: str | Path,
    arch: str = "llama",
    num_policies: int = 3,
    with_reference: bool = True,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    init_range: float = 0.2,
    padded_rows: int = 8,
    **extra: Any,
) -> Path:
    """Save ``num_policies`` random models (and a reference) under ``folder``; return the YAML.

    ``padded_rows`` extra embedding rows beyond the tokenizer's vocabulary mimic the
    padded embeddings of real checkpoints, which loading must truncate.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    vocab_rows = len(tokenizer) + padded_rows
    size = dict(
        hidden=hidden,
        layers=layers,
        heads=heads,
        max_positions=max_positions,
        init_range=init_range,
        **extra,
    )
    names = list(POLICY_NAMES[:num_policies])
    if num_policies > len(POLICY_NAMES):
        names += [f"policy{i}" for i in range(len(POLICY_NAMES), num_policies)]
    entries = [*names, "base"] if with_reference else names
    for i, name in enumerate(entries):
        torch.manual_seed(seed * 1000 + i)
        model = _make_model(arch, vocab_rows, tokenizer, **size)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    config: dict[str, Any] = {
        "served_name": "tiny",
        "policies": [{"name": n, "model": n} for n in names],
        "device": "cpu",
        "dtype": "float32",
        # Random models gain nothing from drafts; tests that want speculation ask for it.
        "speculative": {"method": "off"},
    }
    if with_reference:
        config["reference"] = {"name": "base", "model": "base"}
    path = folder / "policies.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class ScriptedRunner:
    """A policy runner whose every model puts (almost) all mass on the next token of a
    script: a greedy reply is exactly ``script`` (then EOS), whatever the prompt. Tests of
    what is reported about known tokens (bytes, stops) use it in place of random models."""

    max_context: int | None = None
    max_rows: int | None = None

    def __init__(self, num_models: int, vocab_size: int, script: list[int], eos: int) -> None:
        from ..runners import Capabilities

        self.capabilities = Capabilities(
            shared_forward=False, reference_alone=False, token_moments=False, soups=False
        )
        self.num_models = num_models
        self.vocab_size = vocab_size
        self.script = script
        self.eos = eos
        self._prompt_len: dict[int, int] = {}

    def verify(self, running: Any, drafts: Any, newcomers: Any) -> Any:
        from ..runners import StepOutput

        for row in newcomers:
            self._prompt_len[row.sid] = len(row.token_ids)
        rows = [*running, *newcomers]
        width = 1 + max((len(drafts.get(row.sid, ())) for row in running), default=0)
        scores = torch.zeros(len(rows), width, self.vocab_size)  # [B, G, V]
        for i, row in enumerate(rows):
            done = len(row.token_ids) - self._prompt_len[row.sid]
            for j in range(width):  # position j: after the newest token and j drafts
                at = done + j
                scores[i, j, self.script[at] if at < len(self.script) else self.eos] = 30.0
        logprobs = scores.log_softmax(dim=-1)  # [B, G, V]
        return StepOutput(logprobs.expand(self.num_models, -1, -1, -1).clone(), {})

    def step(self, running: Any, newcomers: Any) -> Any:
        from ..runners import StepOutput

        output = self.verify(running, {}, newcomers)
        return StepOutput(output.logprobs[:, :, 0], output.forward_seconds)

    def rollback(self, kept: Any) -> None:
        pass  # nothing is cached

    def prefill_chunk(self, rows: Any, ends: Any) -> None:
        pass  # nothing is cached: the newcomer's step reads its whole prompt

    def keep(self, sids: set[int]) -> None:
        self._prompt_len = {s: n for s, n in self._prompt_len.items() if s in sids}

    def score(self, prompts: Any, completions: Any, chunk_tokens: int) -> Any:
        raise NotImplementedError("a scripted runner does not score")

    def failure(self) -> str | None:
        return None

    def close(self) -> None:
        pass


# The tiny template again, with a default system message when the conversation has none
# (as SmolLM2's ChatML template does): a persona then replaces that opening.
CHAT_TEMPLATE_WITH_DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|system|>You are a helpful assistant.<|eos|>{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PERSONAS: dict[str, dict[str, str]] = {
    "cheerful": {"system": "Be warm and cheerful!"},
    "brief": {"system": "Answer in one short sentence."},
    "thanks": {"prefix": "Thank you so much."},  # raw text before the prompt
}


def make_persona_family(
    folder: str | Path,
    default_system: bool = False,
    personas: dict[str, dict[str, str]] | None = None,
    seed: int = 0,
    **size: Any,
) -> Path:
    """One random tiny Llama (``base``) and a YAML of personas of it; return the YAML.

    ``default_system`` gives the tokenizer a chat template that opens every conversation
    without a system message of its own with a default one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    if default_system:
        tokenizer.chat_template = CHAT_TEMPLATE_WITH_DEFAULT_SYSTEM
    dims = dict(hidden=32, layers=2, heads=4, max_positions=256, init_range=0.2) | size
    torch.manual_seed(seed)
    model = _make_model("llama", len(tokenizer) + 8, tokenizer, **dims)
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    entries = [
        {"name": name, "persona": "base", **prompt}
        for name, prompt in (personas or PERSONAS).items()
    ]
    config = {
        "served_name": "tiny-personas",
        "reference": {"name": "base", "model": "base"},
        "policies": entries,
        "device": "cpu",
        "dtype": "float32",
    }
    path = folder / "policies.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path

"""The demo tokenizer: byte-level BPE trained on the corpus, with a chat template.

Byte-level means any input (a user may type anything into the served demo) encodes
without an unknown token; BPE trained on the grammar makes most of its words one token,
so a reply is about 25 tokens and training stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One turn: "<|role|>" content "<|end|>"; the generation prompt is "<|assistant|>".
# The model stops at "<|end|>", the eos token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and wrap it for ``transformers``."""
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_dialogues(
    tokenizer: PreTrainedTokenizerFast, dialogues: Sequence[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """Token ids of each full chat (request, reply, eos) and the index where its reply starts.

    The chat template is rendered once per distinct request (Jinja is the slow part) and
    the replies are encoded in one batch.
    """
    prompts = {request: encode_prompt(tokenizer, request) for request in {r for r, _ in dialogues}}
    replies = tokenizer([reply for _, reply in dialogues], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [
        (prompts[request] + reply_ids + [eos], len(prompts[request]))
        for (request, _), reply_ids in zip(dialogues, replies, strict=True)
    ]


def encode_prompt(tokenizer: PreTrainedTokenizerFast, request: str) -> list[int]:
    """Token ids of the chat template for one user turn, ending in the assistant tag."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": request}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    return tokenizer.encode(text, add_special_tokens=False)

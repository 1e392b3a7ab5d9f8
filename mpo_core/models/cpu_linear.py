"""Linear layers through oneDNN on CPU: the few-row matmuls a blend's decode step runs.

On CPU, ``torch.nn.functional.linear`` in float32 goes to MKL's GEMM. On some CPUs that
is slow for the few rows of a decode step: on a 2-core AVX2 machine a 3-row decode step
of SmolLM2 cost 1.99x a 1-row step, and oneDNN's inner-product kernel (which PyTorch
ships for its graph compiler) ran the same products on the plain weight for 1.60x. On a
2-core AVX-512 machine MKL was the faster of the two at 1 and 3 rows
(``python -m bench.cpu_linear`` measures both on the real model; docs/benchmarks.md).
That is why the setting's default, ``auto``, times both on the model's own layers at
start-up (``time_kernels``) and keeps oneDNN only where it wins.

``use_onednn_linears`` swaps the forward of every large plain ``nn.Linear`` of a model for
one that calls oneDNN on the live weight when the product has few rows (nothing is copied
or prepacked, so memory is unchanged and a weight edited in place is seen). It falls back
to ``F.linear`` for prefills, for anything but float32 on CPU, and when autograd needs the
product (oneDNN's op has no backward). Results differ from MKL's in float32 rounding only.

``pack_onednn_linears`` goes further for a model whose weights nothing else reads: each
large linear layer's weight is reordered once into oneDNN's own blocked layout and the
dense weight is dropped (a weight tied to another module, like SmolLM2's head and its
embedding, keeps its dense copy beside the packed one). On packed weights a 3-row step
costs about what a 1-row step does (``python -m bench.cpu_linear``), because the kernel
no longer reorders the weight on every call. Every product, prefills included, then runs
on oneDNN. The engine packs a persona family's one model, which serves all K personas as
rows of one forward and is never copied or averaged (its soup is the model itself);
families whose weights soups average or LoRA merges edit keep the dense weights.
"""

from __future__ import annotations

import logging
import statistics
import time
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_MARK = "_mpo_onednn"
_PACKED = "_mpo_onednn_packed"  # the packed weight of a layer ``pack_onednn_linears`` did
_available: bool | None = None


def onednn_linear_available() -> bool:
    """Whether this torch build runs oneDNN's linear and it agrees with ``F.linear``."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 16, generator=generator)
        weight = torch.randn(8, 16, generator=generator)
        bias = torch.randn(8, generator=generator)
        got = op(x, weight, bias, "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        logger.info("oneDNN linear unavailable (%s): linear layers use torch's default", exc)
        return False
    return bool(torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5))


# oneDNN costs ~50 us a call more than MKL and ~1 ms the first time it meets a shape (ad-hoc
# timings on the benchmark machine, layers of 256 x 64 and 1536 x 576): it
# pays on weights of at least this many elements (256 KB in float32) and on few rows, the
# decode and verify steps where MKL is slow (a prefill's many rows stay on MKL, which
# keeps the shapes oneDNN caches to at most MAX_ROWS per layer shape).
MIN_WEIGHT_ELEMENTS = 1 << 16
MAX_ROWS = 16


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    if (
        x.numel() <= MAX_ROWS * x.shape[-1]
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Route ``model``'s plain ``nn.Linear`` layers of at least ``MIN_WEIGHT_ELEMENTS``
    weights through oneDNN for products of at most ``MAX_ROWS`` rows (see the module
    docstring); how many layers it switched. Subclasses (quantised or LoRA layers) keep
    their own forward: a LoRA layer's base layer is a plain ``nn.Linear`` and is switched."""
    switched = 0
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and not getattr(module, _MARK, False)  # before .weight: a packed layer has none
            and module.weight.numel() >= MIN_WEIGHT_ELEMENTS
        ):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            setattr(module, _MARK, True)
            switched += 1
    return switched


def _dense_cpu_weight(module: nn.Module) -> nn.Parameter | None:
    """The weight of a plain float32 CPU ``nn.Linear`` of at least ``MIN_WEIGHT_ELEMENTS``
    weights not yet on oneDNN (what packing and ``auto``'s timing take), else None."""
    weight = module._parameters.get("weight") if type(module) is nn.Linear else None
    if (
        weight is None
        or getattr(module, _MARK, False)
        or weight.numel() < MIN_WEIGHT_ELEMENTS
        or weight.dtype is not torch.float32
        or weight.device.type != "cpu"
    ):
        return None
    return weight


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(self, _PACKED)
    if (
        x.dtype is torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
    return F.linear(x, packed.to_dense().to(x.dtype), self.bias)  # rare: autograd, casts


def pack_onednn_linears(model: nn.Module) -> int:
    """Reorder the weight of each plain float32 CPU ``nn.Linear`` of ``model`` with at least
    ``MIN_WEIGHT_ELEMENTS`` weights into oneDNN's layout, run every product of the layer on
    it, and drop the dense weight unless another module shares it (module docstring); how
    many layers it packed. Only for a model nothing copies, averages or edits afterwards:
    a packed layer has no ``weight`` parameter (``weight_elements`` still counts it)."""
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    packed_layers = 0
    for module in model.modules():
        weight = _dense_cpu_weight(module)
        if weight is None:
            continue
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        setattr(module, _PACKED, packed)
        if uses[id(weight)] == 1:  # tied weights (a head and its embedding) stay dense too
            del module._parameters["weight"]
        module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
        setattr(module, _MARK, True)
        packed_layers += 1
    if packed_layers:
        _own_storage(model)
    return packed_layers


def _own_storage(model: nn.Module) -> None:
    """Copy every remaining parameter and buffer of ``model`` into memory of its own. A
    checkpoint loaded from safetensors is one memory-mapped file that stays mapped while
    any tensor loaded from it lives: the embedding alone would keep the pages of every
    dropped dense weight resident (500 MB of SmolLM2-135M's 540)."""
    with torch.no_grad():
        for module in model.modules():
            for group in (module._parameters, module._buffers):
                for tensor in group.values():
                    if tensor is not None:
                        tensor.data = tensor.data.clone()


def packed_layers(model: nn.Module) -> int:
    """How many linear layers of ``model`` run on packed oneDNN weights."""
    return sum(getattr(m, _PACKED, None) is not None for m in model.modules())


def weight_elements(model: nn.Module) -> int:
    """The model's parameter count, packed weights included (each tensor counted once)."""
    dense = sum(p.numel() for p in model.parameters())
    return dense + sum(
        getattr(m, _PACKED).numel()
        for m in model.modules()
        if getattr(m, _PACKED, None) is not None and "weight" not in m._parameters
    )


def uses_onednn(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` runs through oneDNN."""
    return any(getattr(m, _MARK, False) for m in model.modules())


# ``auto`` times the kernels on the first model's large linear layers, up to this many
# weights (64 MB in float32: more than a CPU's caches hold, as a decode step streams them).
SAMPLE_ELEMENTS = 1 << 24
REPEATS = 5
MARGIN = 0.9  # oneDNN is kept only when its sampled pass takes under 0.9x torch's


def _sample_layers(model: nn.Module) -> list[nn.Linear]:
    layers: list[nn.Linear] = []
    total = 0
    for module in model.modules():
        weight = _dense_cpu_weight(module)
        if weight is None:
            continue
        layers.append(module)  # type: ignore[arg-type]
        total += weight.numel()
        if total >= SAMPLE_ELEMENTS:
            break
    return layers


@torch.inference_mode()
def time_kernels(model: nn.Module, rows: int, pack: bool) -> dict[str, float]:
    """Seconds for a ``rows``-row product through each of a sample of ``model``'s large
    linear layers, in turn, on torch's kernels and on oneDNN's (on packed copies of the
    weights when ``pack``); medians of ``REPEATS`` interleaved passes. Empty when the model
    has no layer oneDNN would take."""
    layers = _sample_layers(model)
    if not layers:
        return {}
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, layer.in_features, generator=generator) for layer in layers]
    weights = {
        "torch": [layer.weight for layer in layers],
        "onednn": [
            torch.ops.mkldnn._reorder_linear_weight(layer.weight, None) if pack else layer.weight
            for layer in layers
        ],
    }
    onednn = torch.ops.mkldnn._linear_pointwise
    passes: dict[str, list[float]] = {kind: [] for kind in weights}
    for _ in range(REPEATS + 1):  # the first pass warms up (oneDNN's set-up) and is dropped
        for kind, kind_weights in weights.items():
            started = time.perf_counter()
            for x, layer, weight in zip(inputs, layers, kind_weights):
                if kind == "torch":
                    F.linear(x, weight, layer.bias)
                else:
                    onednn(x, weight, layer.bias, "none", [], "")
            passes[kind].append(time.perf_counter() - started)
    return {kind: statistics.median(times[1:]) for kind, times in passes.items()}


def apply_cpu_linear(
    setting: str,
    models: list[Any],
    device: torch.device,
    dtype: Any,
    *,
    rows: int = 1,
    pack: bool = False,
) -> None:
    """The policy set's ``cpu_linear`` setting applied to ``models`` (``nn.Module``s).
    "onednn" switches float32 models on CPU when the op works, packing their weights when
    ``pack`` (models that nothing copies or edits: a persona family's); "torch" leaves
    every model on torch's default kernels; "auto" picks oneDNN when ``time_kernels``
    finds it at least 10% faster for the ``rows`` rows a decode step of one request runs,
    else torch's (which wins depends on the CPU: on the AVX2 machine of
    docs/benchmarks.md oneDNN, on an AVX-512 one mostly MKL)."""
    if setting == "torch" or device.type != "cpu" or dtype is not torch.float32:
        return
    if not models or not onednn_linear_available():
        return
    if setting == "auto":
        times = time_kernels(models[0], rows, pack)
        if not times:
            return
        # Near a tie torch's default stays: the timing is a sample, not the model's step.
        choice = "onednn" if times["onednn"] < MARGIN * times["torch"] else "torch"
        logger.info(
            "cpu_linear auto: %s (a %d-row pass over %d sampled layers: torch %.2f ms, "
            "oneDNN%s %.2f ms)",
            choice, rows, len(_sample_layers(models[0])), 1e3 * times["torch"],
            " packed" if pack else "", 1e3 * times["onednn"],
        )  # fmt: skip
        if choice == "torch":
            return
    for model in models:
        if pack:
            pack_onednn_linears(model)
        use_onednn_linears(model)

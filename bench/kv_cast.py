"""What reading a narrow KV cache costs: one layer's decode attention, per cache dtype.

    python -m bench.kv_cast [--rows 16 --heads 12 --columns 97 --head-dim 64 --threads 1]

For each storage dtype, times (median of --repeats) casting one layer's keys and values
to float32 and running SDPA for a one-token query, as ``GrowingLayer`` does when
``kv_cache_dtype`` is narrower than the model, and the largest error of the attention
output against float32 keys and values. Random data; the ratio to float32 is the
figure to read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _median_us(call: Callable[[], object], repeats: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--columns", type=int, default=97)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.rows, args.heads, args.columns, args.head_dim)
    query = torch.randn(args.rows, args.heads, 1, args.head_dim)
    keys, values = torch.randn(shape), torch.randn(shape)
    exact = F.scaled_dot_product_attention(query, keys, values)
    print(f"layer cache {list(shape)}, query [{args.rows}, {args.heads}, 1, {args.head_dim}]")
    print("| cache dtype | cast + SDPA, us (median) | ratio to float32 | max abs error |")
    print("|---|--:|--:|--:|")
    base = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k, v = keys.to(dtype), values.to(dtype)

        def attend(k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            return F.scaled_dot_product_attention(query, k.float(), v.float())

        us = _median_us(attend, args.repeats)
        base = base or us
        error = float((attend() - exact).abs().max())
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {us:.0f} | {us / base:.2f} | {error:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

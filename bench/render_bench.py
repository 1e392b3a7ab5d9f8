"""The benchmark scripts' doc tables, each drawn from the JSON its script wrote.

``bench.render_tables`` holds the registry (``KINDS``) and the markers; this module holds
the kinds of the benchmark sections of docs/benchmarks.md and docs/fitting.md, one
function per script. Labels that a results file does not carry (what a system is, a
target's threshold) are written here once, beside the figures they name.
Standard library only, like ``bench.render_tables``.
"""

from __future__ import annotations

import statistics
from typing import Any


def _row(cells: list[str]) -> str:
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def _rate(value: float) -> str:
    """Tokens/s: three significant figures (5.19, 16.7, 71.6)."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _concurrencies(ratios: dict[str, Any]) -> list[str]:
    return sorted(ratios, key=lambda key: int(key.split("=")[1]))  # "c=1", "c=4"


def adapters(data: dict[str, Any]) -> str:
    """``bench.adapters``: the three ratios and memory per concurrency; bold marks the
    cells a target is judged on (c = 1)."""
    ratios = data["ratios"]
    levels = _concurrencies(ratios)
    rows = [  # label, how to read the figure, target, the target judged at c = 1 only
        ("(a) adapter overhead: adapters / base over the same rows",
         lambda r: r["a_overhead_adapters_over_base_rows"], "<= 1.15"),
        ("(b) saving: 3 full models / adapters", lambda r: r["b_saving_full_over_adapters"],
         "report"),
        ("(c) cost of mixing: adapters / base over one row per request",
         lambda r: r["c_mixing_adapters_over_base"], "report (GPU: <= 1.3)"),
        ("peak RSS above baseline / (base + adapters)",
         lambda r: r["memory"]["adapters"]["peak_over_held"], "<= 1.2 at c = 1"),
    ]  # fmt: skip
    lines = [
        _row(["", *(f"c = {c.split('=')[1]}" for c in levels), "target"]),
        "|---|" + "--:|" * len(levels) + "---|",
    ]
    for label, figure, target in rows:
        cells = [f"{figure(ratios[c]):.2f}" for c in levels]
        if target.startswith("<="):
            cells[0] = f"**{cells[0]}**"
        lines.append(_row([label, *cells, target]))
    memory = [
        " / ".join(f"{ratios[c]['memory'][s]['peak_above_baseline_mb']:.0f}"
                   for s in ("adapters", "full", "base"))
        for c in levels
    ]  # fmt: skip
    lines.append(_row(["peak RSS above baseline, MiB: adapters / full / base", *memory, ""]))
    return "\n".join(lines)


def detok_step(data: dict[str, Any]) -> str:
    """``bench.detok_step``: the median step of each side."""
    steps = data["median_step_ms"]
    return "\n".join(
        [
            "| side | median step (ms) |",
            "| --- | --- |",
            f"| before ({data['baseline']}: text on the engine thread) | {steps['before']:.1f} |",
            f"| after (text by the readers) | {steps['after']:.1f} |",
        ]
    )


def cpu_linear(data: dict[str, Any]) -> str:
    """``bench.cpu_linear``: median milliseconds per kernel, decode steps then prefills."""
    medians = data["median_ms"]
    row_counts = sorted(
        {int(key.split("_")[1]) for key in medians["torch"] if key.startswith("step_")}
    )
    names = {"torch": "torch (MKL)", "onednn": "oneDNN", "onednn-packed": "oneDNN packed"}
    lines = [
        _row(["ms (median)", *(f"{n} row{'s' * (n > 1)}" for n in row_counts)]),
        "|---|" + "---:|" * len(row_counts),
    ]
    for phase, label, spec in (("step", "decode step", ".1f"), ("prefill", "prefill", ".0f")):
        for kernel, times in medians.items():
            cells = [format(times[f"{phase}_{n}_rows"], spec) for n in row_counts]
            lines.append(_row([f"{label}, {names.get(kernel, kernel)}", *cells]))
    return "\n".join(lines)


def real_models(data: dict[str, Any]) -> str:
    """``bench.real_models``: tokens/s per system and concurrency."""
    ratios = data["ratios"]
    levels = _concurrencies(ratios)
    systems = list(ratios[levels[0]]["tokens_per_s"])
    rounds = 1 + max(run["round"] for run in data["timing"])
    lines = [
        _row([f"tokens/s (median of {rounds} rounds)", *systems]),
        "| --- |" + " --- |" * len(systems),
    ]
    for c in levels:
        label = f"c = {c.split('=')[1]}" + (" (aggregate)" if c != "c=1" else "")
        lines.append(_row([label, *(_rate(ratios[c]["tokens_per_s"][s]) for s in systems)]))
    return "\n".join(lines)


LLAMA_SYSTEMS = {
    "llama-generate": "llama-cpp-python's `Llama.generate`, one model (the c prompts one after "
    "another)",
    "one-member": "this server, the GGUF alone, llama.cpp backend",
    "personas-k3": "this server, K = 3 personas blended, llama.cpp backend",
    "personas-k3-spec": "the same, n-gram speculation on",
    "personas-k3-hf": "the same K = 3 personas, transformers backend (float32)",
}


def llama_cpp(data: dict[str, Any]) -> str:
    """``bench.llama_cpp``: speed and memory per system."""
    ratios = data["ratios"]
    levels = _concurrencies(ratios)
    lines = [
        "| system | tok/s c = 1 | tok/s c = 8 | peak RSS MiB c = 1 | c = 8 | above imports c = 1 "
        "| c = 8 |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for system in ratios[levels[0]]["tokens_per_s"]:
        cells = [f"{ratios[c]['tokens_per_s'][system]:.1f}" for c in levels]
        cells += [f"{ratios[c]['peak_rss_mb'][system]:.0f}" for c in levels]
        cells += [f"{ratios[c]['peak_rss_above_baseline_mb'][system]:.0f}" for c in levels]
        lines.append(_row([f"`{system}`: {LLAMA_SYSTEMS.get(system, '')}", *cells]))
    return "\n".join(lines)


def _verdict(values: list[float], levels: list[str], ok: Any) -> str:
    met = [ok(v) for v in values]
    if all(met):
        return "met"
    if not any(met):
        return "missed"
    missed = ", ".join(c.replace("=", " = ") for c, m in zip(levels, met) if not m)
    kept = ", ".join(c.replace("=", " = ") for c, m in zip(levels, met) if m)
    return f"missed at {missed}, met at {kept}"


def llama_cpp_targets(data: dict[str, Any]) -> str:
    """``bench.llama_cpp``: each target's ratio per concurrency and whether it is met."""
    ratios = data["ratios"]
    levels = _concurrencies(ratios)

    def above_imports(r: dict[str, Any]) -> float:
        above = r["peak_rss_above_baseline_mb"]
        return float(above["personas-k3"] / above["personas-k3-hf"])

    targets = [  # label, figure, bound (None: information only)
        ("one member alone / llama-cpp-python's generate >= 0.9",
         lambda r: r["one_member_over_llama_generate"], (">=", 0.9)),
        ("K = 3 blend / that generate >= 0.45",
         lambda r: r["personas_k3_over_llama_generate"], (">=", 0.45)),
        ("K = 3 blend / transformers persona backend >= 2.5",
         lambda r: r["personas_k3_over_hf_personas"], (">=", 2.5)),
        ("peak RSS of the K = 3 family / transformers' <= 0.5 (whole process)",
         lambda r: r["rss_personas_k3_over_hf"], ("<=", 0.5)),
        ("the same, above the imports", above_imports, ("<=", 0.5)),
    ]  # fmt: skip
    acceptance = " and ".join(
        f"{ratios[c]['spec_acceptance']:.2f} at {c.replace('=', ' = ')}" for c in levels
    )
    lines = [_row(["target", *(c.replace("=", " = ") for c in levels), "verdict"])]
    lines.append("|---|" + "--:|" * len(levels) + "---|")
    for label, figure, (sign, bound) in targets:
        values = [figure(ratios[c]) for c in levels]
        ok = (lambda v, b=bound: v >= b) if sign == ">=" else (lambda v, b=bound: v <= b)
        cells = [f"{v:.2f}" for v in values]
        lines.append(_row([label, *cells, _verdict(values, levels, ok)]))
    spec = [f"{ratios[c]['personas_k3_spec_over_personas_k3']:.2f}" for c in levels]
    lines.append(_row([f"speculation on / off (n-gram, acceptance {acceptance})", *spec, "info"]))
    return "\n".join(lines)


SEAM_WORKLOADS = {
    "personas": "K = 3 personas",
    "single": "one model",
}


def seam_check(data: dict[str, Any]) -> str:
    """``bench.seam_check``: after / before per workload, per round and their medians."""
    rounds = data["rounds"]
    lines = [
        f"| workload | after / before, median of {len(rounds)} rounds | per-round ratios "
        "| tok/s after / before (medians) |",
        "| --- | ---: | --- | --- |",
    ]
    for key, median in data["ratios"].items():
        kind, _, level = key.rpartition("-")
        label = f"{SEAM_WORKLOADS.get(kind, kind)}, c = {level.removeprefix('c')}"
        per_round = ", ".join(f"{r['after'][key] / r['before'][key]:.2f}" for r in rounds)
        after = statistics.median(r["after"][key] for r in rounds)
        before = statistics.median(r["before"][key] for r in rounds)
        lines.append(_row([label, f"{median:.2f}", per_round, f"{after:.1f} / {before:.1f}"]))
    return "\n".join(lines)


FIT_SPEED_SIDES = {
    "old": "old (64 slots, half for the fit)",
    "new": "new (256 slots, all of them)",
}


def fit_speed(data: dict[str, Any]) -> str:
    """``bench.fit_speed``: each side's refit and its phases (medians over repeats)."""
    lines = [
        "| side | refit | sampling | scoring | optimising |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, times in data["medians"].items():
        phases = ("total_s", "sampling_s", "scoring_s", "optimising_s")
        lines.append(
            _row([FIT_SPEED_SIDES.get(side, side), *(f"{times[p]:.1f} s" for p in phases)])
        )
    return "\n".join(lines)


def _percent(estimate: dict[str, float]) -> str:
    mean, low, high = (100 * estimate[k] for k in ("mean", "low", "high"))
    return f"{mean:.0f}% [{low:.0f}, {high:.0f}]"


def _label(row: dict[str, Any]) -> str:
    """A row's label; a ``weights:`` row (long float literals) by its weights instead."""
    if not row["label"].startswith("weights:"):
        return f"`{row['label']}`"
    weights = ", ".join(f"{n} {w:.2f}" for n, w in row["weights"].items())
    strength = row["strength"]
    return weights + (f" @ strength {strength:.2f}" if strength not in (None, 1) else "")


def _worst_gap(row: dict[str, Any], compare: str) -> str:
    """A row's gap in worst win rate to ``compare``, points, with its paired interval."""
    gap = {k: 100 * v for k, v in row["worst_gap"][compare].items()}
    return f"{gap['mean']:+.1f} [{gap['low']:+.1f}, {gap['high']:+.1f}]"


def eval_summary(report: dict[str, Any]) -> str:
    """``mpo eval`` in one table: win rates against the baseline, the worst, mean KL, and
    against the first ``--compare`` row the paired win rates and the worst-win gap."""
    names = list(report["objectives"])
    compare = report["options"]["compare"][0] if report["options"]["compare"] else None
    header = ["row", *(f"win vs ref: {n}" if i == 0 else n for i, n in enumerate(names))]
    header += ["worst", "KL"]
    if compare is not None:
        header += [f"win vs {compare}: {n}" if i == 0 else n for i, n in enumerate(names)]
        header.append(f"worst-win gap vs {compare} (points)")
    lines = [_row(header), "|---|" + "---:|" * (len(header) - 1)]
    for row in report["rows"]:
        worst = row["worst_win_rate"]
        kl = row["kl"]["mean"] if row["kl"] is not None else None
        cells = [_label(row), *(_percent(row["win_rates"][n]) for n in names)]
        cells += [f"**{100 * worst['mean']:.0f}%** ({worst['objective']})"]
        cells.append("" if kl is None else f"{0.0 if abs(kl) < 5e-3 else kl:.2f}")
        if compare is not None:
            cells += [_percent(row["paired"][compare][n]) for n in names]
            cells.append(_worst_gap(row, compare))
        lines.append(_row(cells))
    return "\n".join(lines)


def eval_gaps(report: dict[str, Any]) -> str:
    """``mpo eval``: each row's gap in worst win rate (against the baseline) to every
    ``--compare`` row, points, with the paired bootstrap interval."""
    compare = report["options"]["compare"] or []
    header = ["row", *(f"gap vs `{c}`" for c in compare)]
    lines = [_row(header), "|---|" + "---:|" * len(compare)]
    for row in report["rows"]:
        cells = [_label(row)]
        cells += [_worst_gap(row, c) for c in compare]
        lines.append(_row(cells))
    return "\n".join(lines)


def distributed(data: dict[str, Any]) -> str:
    """``bench.distributed``: one process against 3 ranks per concurrency, the bytes rank 0
    received and its wait for the workers per step, an empty call's round trip."""
    meta, summary = data["meta"], data["summary"]
    lines = [
        f"{data['family']} family, {meta['date']}, {meta['cpus']} CPUs, {meta['threads']} "
        f"torch thread(s) a process, median of {len(data['rounds'])} rounds:",
        "",
        "| c | one process (tok/s) | 3 ranks (tok/s) | ratio | received a step | "
        "rank 0's wait a step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in sorted((k for k in summary if k.startswith("c")), key=lambda k: int(k[1:])):
        row = summary[key]
        lines.append(
            _row(
                [
                    key[1:],
                    _rate(row["one_tokens_per_s"]),
                    _rate(row["ranks_tokens_per_s"]),
                    f"{row['ratio']:.2f}",
                    f"{row['bytes_per_step'] / 1024:.1f} KiB",
                    f"{row['wait_ms_per_step']:.1f} ms",
                ]
            )
        )
    lines += ["", f"An empty call's round trip (broadcast + gather): {summary['ping_ms']:.1f} ms."]
    return "\n".join(lines)


def chunked_prefill(data: dict[str, Any]) -> str:
    """``bench.chunked_prefill``: per budget, the short request and the long prompt alone
    and beside each other, the two target ratios (bold: missed) and the long prompt's
    time alone against chunking off."""
    targets = data["meta"]["targets"]
    lines = [
        "| prefill_chunk_tokens | short alone (s) | short beside (s) | short ratio "
        f"(<= {targets['short_ratio']}) | long alone (s) | long beside (s) | long ratio "
        f"(<= {targets['long_ratio']}) | long alone / chunking off |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in data["settings"]:
        short_ok = s["short_ratio"] <= targets["short_ratio"]
        long_ok = s["long_ratio"] <= targets["long_ratio"]
        short = f"{s['short_ratio']:.1f}" if short_ok else f"**{s['short_ratio']:.1f}**"
        long = f"{s['long_ratio']:.2f}" if long_ok else f"**{s['long_ratio']:.2f}**"
        cells = [
            str(s["prefill_chunk_tokens"] or "0 (off)"),
            f"{s['short_alone_s']:.2f}",
            f"{s['short_beside_s']:.1f}",
            short,
            f"{s['long_alone_s']:.1f}",
            f"{s['long_beside_s']:.1f}",
            long,
            f"{s['long_alone_vs_off']:.2f}" if "long_alone_vs_off" in s else "",
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


LLAMA_THREAD_SETTINGS = {
    "as-before": "neither (as before)",
    "decoder-thread": "decoder thread only",
    "torch-one-thread": "torch on one thread only",
    "both": "both (the server now)",
}


def llama_threads(data: dict[str, Any]) -> str:
    """``bench.llama_threads``: tokens/s per setting and against the setting as before."""
    rounds = data["rounds"]
    lines = [
        f"| thread rules | tok/s (median of {len(rounds)}) | over as before | per round |",
        "| --- | ---: | ---: | --- |",
    ]
    for key, label in LLAMA_THREAD_SETTINGS.items():
        per_round = ", ".join(f"{r[key]['tokens_per_s']:.1f}" for r in rounds)
        cells = [label, f"{data['tokens_per_s'][key]:.1f}", f"{data['over_as_before'][key]:.2f}"]
        lines.append(_row([*cells, per_round]))
    return "\n".join(lines)


def llama_pool(data: dict[str, Any]) -> str:
    """``bench.llama_pool``: a step of N sequences over the shared pool, flash attention
    off and on, and sequence 0's log-probs against it decoded alone."""
    rows = {(r["flash_attention"], r["seqs"]): r for r in data["rows"]}
    lines = [
        "| sequences | step ms, off | ms a row, off | step ms, on | ms a row, on | on / off "
        "| max dlogp vs alone, off | on |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sorted({n for _, n in rows}):
        off, on = rows[(False, n)], rows[(True, n)]
        lines.append(_row([
            str(n), f"{off['step_ms']:.1f}", f"{off['ms_per_row']:.2f}", f"{on['step_ms']:.1f}",
            f"{on['ms_per_row']:.2f}", f"{on['step_ms'] / off['step_ms']:.2f}",
            f"{off['max_dlogp_vs_alone']:.3f}", f"{on['max_dlogp_vs_alone']:.3f}",
        ]))  # fmt: skip
    shot = data["max_dlogp_one_shot_vs_alone"]
    lines.append(_row(["one shot", "", "", "", "", "", f"{shot['off']:.3f}", f"{shot['on']:.3f}"]))
    return "\n".join(lines)


KINDS = {
    "llama_pool": llama_pool,
    "adapters": adapters,
    "chunked_prefill": chunked_prefill,
    "llama_threads": llama_threads,
    "distributed": distributed,
    "detok_step": detok_step,
    "cpu_linear": cpu_linear,
    "real_models": real_models,
    "llama_cpp": llama_cpp,
    "llama_cpp_targets": llama_cpp_targets,
    "seam_check": seam_check,
    "fit_speed": fit_speed,
    "eval_summary": eval_summary,
    "eval_gaps": eval_gaps,
}

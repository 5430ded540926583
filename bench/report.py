"""docs/benchmarks.md and its charts, from one run's results (``bench/.data/results.json``)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from bench import config

# (stage, variant) -> how it appears in the report, and its baseline (stage, variant).
ROWS = [
    ("read_validate", "", "read + validate", "extract.read_crm_file + validate.validate_extract", None),
    ("normalise_phones", "", "normalise phones", "normalise.normalise_phones", ("normalise_naive", "")),
    (
        "normalise_phones",
        "fast",
        "normalise phones [fast-path prototype]",
        "bench.prototypes.normalise_phones_fast",
        ("normalise_naive", ""),
    ),
    (
        "normalise",
        "",
        "normalise sales",
        "intake.normalise_sales (phones, times, values, currencies)",
        None,
    ),
    ("match", "", "match", "match.match_day", ("match_pandas", "")),
    (
        "match",
        "proto",
        "match [prototype]",
        "match_day with bench.prototypes streaming _build_conversions",
        ("match_pandas", ""),
    ),
    ("match", "set", "match [set-based prototype]", "bench.prototypes.match_day_set_based", ("match_pandas", "")),
    (
        "match",
        "lateral",
        "match [set-based + LATERAL prototype]",
        "bench.prototypes.match_day_set_based(picks='lateral')",
        ("match_pandas", ""),
    ),
    ("write_file", "", "write file", "conversion_file.write_conversion_file", None),
    ("write_file", "proto", "write file [prototype]", "bench.prototypes.write_conversion_file_streaming", None),
    ("upload", "", "upload", "upload.upload_pending -> sandbox (TLS gRPC)", None),
    ("normalise_call_logs", "", "normalise call logs", "call_logs.normalise_call_logs", None),
    (
        "normalise_call_logs",
        "proto",
        "normalise call logs [prototype]",
        "bench.prototypes.normalise_call_logs_set_based",
        None,
    ),
]
BASELINE_NAMES = {
    "normalise_naive": "naive per-row phonenumbers loop",
    "match_pandas": "pandas merge_asof (pull all into pandas)",
}
FINDINGS = config.BENCH_DIR / "findings.md"
MATCH_VARIANTS = (
    ("", "match_day"),
    ("now", "match_day of include/ at the end of the session"),
    ("proto", "match_day + streaming _build_conversions"),
    ("set", "set-based match_day prototype"),
    ("lateral", "set-based + LATERAL picks prototype"),
)


def _groups(results: list[dict]) -> dict:
    groups: dict = defaultdict(list)
    for result in results:
        if "error" in result:
            continue
        groups[(result["stage"], result.get("variant", ""), result["size"])].append(result)
    return groups


def _summary(runs: list[dict]) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    rows = runs[0]["rows"]
    return {
        "runs": len(runs),
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds if seconds else None,
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "rss_before_mb": statistics.median(r["rss_before_mb"] for r in runs),
        "spread": (max(r["seconds"] for r in runs) / min(r["seconds"] for r in runs) - 1) if len(runs) > 1 else 0,
        "last": runs[-1],
    }


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _flat(peaks: dict[int, float]) -> float | None:
    if len(peaks) < 2:
        return None
    return max(peaks.values()) / min(peaks.values()) - 1


def _verdict(ok: bool | None, partial: str = "") -> str:
    if ok is None:
        return "not measured" + (f" ({partial})" if partial else "")
    text = "**PASS**" if ok else "**FAIL**"
    return text + (f" ({partial})" if partial else "")


def evaluate(run: dict, summaries: dict) -> list[dict]:
    """The four targets of the brief, each with what was measured."""
    targets = []
    phone_variants = (
        ("", "normalise_phones"),
        ("now", "normalise_phones of include/ at the end"),
        ("fast", "fast-path prototype"),
    )
    for phone_variant, label in phone_variants:
        ratios = {}
        for (stage, variant, size), summary in summaries.items():
            if (stage, variant) == ("normalise_phones", phone_variant) and ("normalise_naive", "", size) in summaries:
                ratios[size] = summary["rows_per_s"] / summaries[("normalise_naive", "", size)]["rows_per_s"]
        if not ratios and (phone_variant or any(sv[0] == "normalise_phones" for sv in summaries)):
            continue  # this variant was not measured (another one was)
        targets.append(
            {
                "target": f"{label}: >= {config.TARGET_NORMALISE_SPEEDUP:.0f}x the naive loop on realistic data",
                "measured": ", ".join(f"{config.size_label(s)}: {r:.2f}x" for s, r in sorted(ratios.items())) or "—",
                "result": _verdict(min(ratios.values()) >= config.TARGET_NORMALISE_SPEEDUP if ratios else None),
            }
        )
    for variant, label in MATCH_VARIANTS:
        if not any((st, va) == ("match", variant) for st, va, _ in summaries):
            continue
        top = summaries.get(("match", variant, 1_000_000))
        targets.append(
            {
                "target": f"{label}: 10^6 sales vs 10^7 calls in <= {config.TARGET_MATCH_SECONDS_1E6:.0f} s",
                "measured": f"{top['seconds']:.1f} s" if top else "—",
                "result": _verdict(
                    top["seconds"] <= config.TARGET_MATCH_SECONDS_1E6 if top else None,
                    "" if top else "run with --full",
                ),
            }
        )
        peaks = {s: v["peak_rss_mb"] for (st, va, s), v in summaries.items() if (st, va) == ("match", variant)}
        spread = _flat(peaks)
        complete = {10_000, 1_000_000} <= set(peaks)
        targets.append(
            {
                "target": f"{label}: Python peak RSS flat within {config.TARGET_FLAT_MEMORY:.0%} from 10^4 to 10^6",
                "measured": ", ".join(f"{config.size_label(s)}: {p:.0f} MB" for s, p in sorted(peaks.items()))
                + (f" (spread {spread:+.0%})" if spread is not None else ""),
                "result": _verdict(
                    spread <= config.TARGET_FLAT_MEMORY if spread is not None else None,
                    "" if complete else "sizes up to " + config.size_label(max(peaks)) if peaks else "",
                ),
            }
        )
    pandas = {s: v["peak_rss_mb"] for (st, _, s), v in summaries.items() if st == "match_pandas"}
    spread = _flat(pandas)
    targets.append(
        {
            "target": "pandas baseline's peak RSS is not flat (for contrast)",
            "measured": ", ".join(f"{config.size_label(s)}: {p:.0f} MB" for s, p in sorted(pandas.items()))
            + (f" (spread {spread:+.0%})" if spread is not None else ""),
            "result": "grows" if spread and spread > config.TARGET_FLAT_MEMORY else "—",
        }
    )
    upload_variants = (
        ("", "upload_pending"),
        ("now", "upload_pending of include/ at the end"),
    )
    for variant, label in upload_variants:
        if not any((st, va) == ("upload", variant) for st, va, _ in summaries):
            continue
        peaks = {s: v["peak_rss_mb"] for (st, va, s), v in summaries.items() if (st, va) == ("upload", variant)}
        spread = _flat(peaks)
        targets.append(
            {
                "target": f"{label}: peak RSS flat (within {config.TARGET_FLAT_MEMORY:.0%}) at 10k, 50k, 100k",
                "measured": ", ".join(f"{s:,}: {p:.0f} MB" for s, p in sorted(peaks.items()))
                + (f" (spread {spread:+.0%})" if spread is not None else ""),
                "result": _verdict(spread <= config.TARGET_FLAT_MEMORY if spread is not None else None),
            }
        )
    return targets


def _table(summaries: dict, targets: dict) -> list[str]:
    lines = [
        "| stage | function | size | rows | s (median) | rows/s | peak RSS MB | RSS before MB | baseline "
        "| baseline rows/s | baseline peak RSS MB | ratio | target | pass/fail |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    rows = []
    for stage, variant, label, function, baseline in ROWS:
        rows.append((stage, variant, label, function, baseline))
        if not variant:
            rows.append((stage, "now", f"{label} [include/ at the end]", function, baseline))
    for stage, variant, label, function, baseline in rows:
        sizes = sorted(size for (st, va, size) in summaries if (st, va) == (stage, variant))
        for size in sizes:
            ours = summaries[(stage, variant, size)]
            base = summaries.get((baseline[0], baseline[1], size)) if baseline else None
            ratio = ours["rows_per_s"] / base["rows_per_s"] if base and base["rows_per_s"] else None
            target, verdict = targets.get((stage, variant, size), ("", ""))
            lines.append(
                "| "
                + " | ".join(
                    [
                        label,
                        f"`{function}`",
                        config.size_label(size),
                        f"{ours['rows']:,}",
                        _fmt(ours["seconds"], 2),
                        _fmt(ours["rows_per_s"]),
                        _fmt(ours["peak_rss_mb"]),
                        _fmt(ours["rss_before_mb"]),
                        BASELINE_NAMES.get(baseline[0], "") if base else "",
                        _fmt(base["rows_per_s"]) if base else "",
                        _fmt(base["peak_rss_mb"]) if base else "",
                        f"{ratio:.2f}x" if ratio else "",
                        target,
                        verdict,
                    ]
                )
                + " |"
            )
    return lines


def _row_targets(summaries: dict) -> dict:
    """Per-row target text and verdict, for the main table."""
    out = {}
    for (stage, variant, size), ours in summaries.items():
        if stage == "normalise_phones" and ("normalise_naive", "", size) in summaries:
            ratio = ours["rows_per_s"] / summaries[("normalise_naive", "", size)]["rows_per_s"]
            out[(stage, variant, size)] = (
                f">= {config.TARGET_NORMALISE_SPEEDUP:.0f}x naive",
                "PASS" if ratio >= config.TARGET_NORMALISE_SPEEDUP else "FAIL",
            )
        if stage == "match":
            if size == 1_000_000:
                ok = ours["seconds"] <= config.TARGET_MATCH_SECONDS_1E6
                out[(stage, variant, size)] = (
                    f"<= {config.TARGET_MATCH_SECONDS_1E6:.0f} s; RSS flat",
                    "PASS" if ok else "FAIL",
                )
            else:
                out[(stage, variant, size)] = ("RSS flat (see targets)", "")
        if stage == "upload":
            out[(stage, variant, size)] = ("RSS flat (see targets)", "")
    return out


def _charts(summaries: dict, docs: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib is not installed: `pip install -r bench/requirements.txt` for the charts)"]
    panels = [
        ("read_validate", "read + validate", [("", "read_crm_file + validate_extract")]),
        (
            "normalise",
            "normalise",
            [
                ("phones", "normalise_phones"),
                ("phones_fast", "fast-path prototype"),
                ("", "normalise_sales"),
                ("naive", "naive phonenumbers loop"),
            ],
        ),
        (
            "match",
            "match (10x call rows)",
            [
                ("", "match_day"),
                ("proto", "+ streaming _build_conversions"),
                ("set", "set-based prototype"),
                ("lateral", "set-based + LATERAL prototype"),
                ("pandas", "pandas merge_asof"),
            ],
        ),
        ("write_file", "write conversion file", [("", "write_conversion_file"), ("proto", "streaming prototype")]),
        ("upload", "upload to sandbox", [("", "upload_pending")]),
        ("normalise_call_logs", "normalise call logs", [("", "normalise_call_logs"), ("proto", "set-based prototype")]),
    ]
    alias = {
        ("normalise", "naive"): ("normalise_naive", ""),
        ("normalise", "phones"): ("normalise_phones", ""),
        ("normalise", "phones_fast"): ("normalise_phones", "fast"),
        ("match", "pandas"): ("match_pandas", ""),
    }
    written = []
    for metric, ylabel, name in (
        ("rows_per_s", "rows/s (conversions/s for upload)", "benchmarks.png"),
        ("peak_rss_mb", "peak RSS of the Python process, MB", "benchmarks-memory.png"),
    ):
        figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
        for axis, (stage, title, series) in zip(axes.flat, panels, strict=True):
            keyed = []
            for variant, label in series:
                key = alias.get((stage, variant), (stage, variant))
                keyed.append((key, label))
                if not key[1] and key[0] not in ("normalise_naive", "match_pandas"):
                    keyed.append(((key[0], "now"), f"{label} (include/ at the end)"))
            for key, label in keyed:
                points = sorted((s, v[metric]) for (st, va, s), v in summaries.items() if (st, va) == key)
                if points:
                    style = "--" if key[1] == "now" else "-"
                    axis.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
            axis.set_xscale("log")
            axis.set_yscale("log")
            values = [y for line in axis.lines for y in line.get_ydata()]
            if values and max(values) / min(values) < 4:  # no zooming into noise: show at least 4x
                middle = (max(values) * min(values)) ** 0.5
                axis.set_ylim(middle / 2, middle * 2)
            axis.set_title(title)
            axis.set_xlabel("rows (CRM rows; call-log rows for the last panel)")
            axis.set_ylabel(ylabel)
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=8)
        figure.suptitle(("Throughput" if metric == "rows_per_s" else "Peak RSS") + " vs size (median of the repeats)")
        figure.tight_layout()
        figure.savefig(docs / name, dpi=90)
        plt.close(figure)
        written.append(f"![{name}]({name})")
    return written


def _statements(summaries: dict) -> list[str]:
    lines = []
    for variant, label in MATCH_VARIANTS:
        sizes = sorted(s for (st, va, s) in summaries if (st, va) == ("match", variant))
        for size in sizes:
            last = summaries[("match", variant, size)]["last"]
            total = last["seconds"]
            outcome = last.get("outcome", {})
            lines.append(
                f"\n**{label}, {config.size_label(size)} sales** ({total:.2f} s in this run; "
                f"{outcome.get('matched', '?'):,} matched, {outcome.get('conversions', '?'):,} conversions; "
                f"unmatched {outcome.get('unmatched', {})})\n"
            )
            lines.append("| statement (first words) | calls | parameter sets | s | share |")
            lines.append("|---|---:|---:|---:|---:|")
            for entry in last.get("statements", [])[:8]:
                lines.append(
                    f"| `{entry['statement']}` | {entry['calls']} | {entry['param_sets']:,} | "
                    f"{entry['seconds']:.2f} | {entry['seconds'] / total:.0%} |"
                )
            accounted = sum(e["seconds"] for e in last.get("statements", []))
            lines.append(
                f"| (Python between statements, hashing, building rows) | | | {total - accounted:.2f} | "
                f"{(total - accounted) / total:.0%} |"
            )
    return lines


def _cell(result: dict, key: str) -> str:
    if not result:
        return "—"
    if "error" in result:
        return result["error"][:40]
    return _fmt(result[key], 2 if key == "seconds" else 0)


def write(run: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = _groups(run["results"])
    summaries = {key: _summary(runs) for key, runs in groups.items()}
    targets = evaluate(run, summaries)
    machine = run["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Throughput and peak memory of each pipeline stage on synthetic but realistic data, against",
        "PostgreSQL, with baselines measured in the same run on the same data. Generated by the harness",
        "in `bench/` (see `bench/README.md`); every number below comes from the run described at the end.",
        "Each stage ran in a fresh Python process per size and repeat, so a peak RSS is that stage's alone.",
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured']} | {t['result']} |" for t in targets]
    if FINDINGS.is_file():
        lines += ["", FINDINGS.read_text().strip()]
    lines += ["", "## Results", ""]
    lines += _table(summaries, _row_targets(summaries))
    lines += [
        "",
        "`rows` is CRM rows for read/normalise, sales for match, conversions for file and upload, call-log rows",
        "for call-log normalisation. `ratio` is our rows/s over the baseline's (above 1: we are faster).",
        "`RSS before` is the process right before the timed call (interpreter, imports, set-up);",
        "`peak RSS` is the process's VmHWM (`/proc/self/status`) at the end; not `ru_maxrss`, which on Linux",
        "starts a vfork+exec child at its parent's peak (see `bench/stages.py`). Medians of the repeats.",
        "",
    ]
    lines += _charts(summaries, out.parent)
    lines += ["", "## Where matching spends its time", ""]
    lines += _statements(summaries)
    repeats = [r for r in run["results"] if r.get("stage") == "phone_repeats" and "points" in r]
    if repeats:
        lines += [
            "",
            "## Normalisation speed-up vs how often numbers repeat",
            "",
            "100,000 phone cells drawn from the extract's own distinct strings, with a given share of",
            "distinct values (the rest are repeats); `normalise_phones` vs the naive loop, same process.",
            "",
            "| distinct share | normalise_phones rows/s | naive rows/s | ratio |",
            "|---:|---:|---:|---:|",
        ]
        for point in repeats[-1]["points"]:
            lines.append(
                f"| {point['distinct_share']:.0%} | {point['normalise_rows_per_s']:,.0f} | "
                f"{point['naive_rows_per_s']:,.0f} | {point['ratio']:.2f}x |"
            )
    history = [r for r in run["results"] if r.get("stage") in ("match_history", "match_rerun")]
    if history:
        lines += [
            "",
            "## Matching with months of uploaded conversions in the ledger",
            "",
            f"One day of {config.size_label(history[0]['size'])} sales, with the given number of earlier, already",
            "uploaded conversions in `upload_ledger` (a 90-day history). `first run` is the day's first match;",
            "`rerun` matches the same day again, as an Airflow retry, clear or backfill does.",
            "",
            "| ledger rows | variant | first run s | first run peak RSS MB | rerun s | rerun peak RSS MB |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        table: dict = {}
        for result in history:
            table.setdefault((result["history"], result["variant"]), {})[result["stage"]] = result
        names = {
            "": "match_day",
            "proto": "+ streaming _build_conversions",
            "set": "set-based prototype",
            "lateral": "set-based + LATERAL prototype",
        }
        for (rows, variant), pair in sorted(table.items()):
            first, again = pair.get("match_history", {}), pair.get("match_rerun", {})
            lines.append(
                f"| {rows:,} | {names.get(variant.partition('-')[2], variant)} | {_cell(first, 'seconds')} | "
                f"{_cell(first, 'peak_rss_mb')} | {_cell(again, 'seconds')} | {_cell(again, 'peak_rss_mb')} |"
            )
    if run.get("checks"):
        lines += [
            "",
            "## Prototype checks",
            "",
            "Digests of what each variant wrote; a prototype must write the same tables and file bytes.",
            "",
            "| check | value |",
            "|---|---|",
        ]
        for key, value in sorted(run["checks"].items()):
            lines.append(f"| {key} | `{value}` |")
    lines += ["", "## Data", ""]
    lines += [
        "Generated by `bench/generate.py` (seeded; its docstring explains the shape). Per size:",
        "",
        "| size | CRM rows | call rows | callers | max calls/caller | distinct phone strings | "
        "mean calls of a buyer's number | bad rows planted | crm_sales rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, meta in run.get("data", {}).items():
        lines.append(
            f"| {label} | {meta['crm_rows']:,} | {meta['call_rows']:,} | {meta['callers']:,} | "
            f"{meta['max_calls_per_caller']} | {meta['distinct_phone_strings']:,} "
            f"({meta['distinct_phone_share']:.0%}) | {meta['mean_calls_per_sale_caller']} | "
            f"{meta['bad_rows_planted']:,} ({meta['bad_row_share_planted']:.1%}) | {meta['crm_sales_rows']:,} |"
        )
    loads = run.get("loads", {})
    if any(v.get("loaded") for v in loads.values()):
        lines += [
            "",
            "Loading call logs (COPY via psycopg2 `copy_expert`, then the project's indexes, VACUUM ANALYZE):",
        ]
        for label, info in loads.items():
            if info.get("loaded"):
                lines.append(f"- {label}: COPY {info['copy_seconds']} s, indexes + analyse {info['index_seconds']} s")
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())
    pg = ", ".join(f"{k}={v}" for k, v in machine.get("pg_settings", {}).items())
    lines += [
        "",
        "## Machine and run",
        "",
        f"- CPU: {machine.get('cpu')}, {machine.get('nproc')} cores (`nproc`); memory {machine.get('memory_gib')} GiB",
        f"- {machine.get('postgresql')} on 127.0.0.1, default settings ({pg})",
        f"- Python {machine.get('python')}; {packages}",
        f"- run {run.get('started')} to {run.get('finished', '?')}; load average before {run.get('load_before')}, "
        f"after {run.get('load_after', '?')} (the machine is shared and noisy: medians of "
        f"{run.get('repeat')} repeats below 10^6, one run at 10^6)",
        "",
        "## Reproduce",
        "",
        "```bash",
        ".venv/bin/pip install -r bench/requirements.txt   # matplotlib, for the charts",
        *(c if c.startswith((".venv/", "#")) else f".venv/bin/{c}" for c in run["command"].splitlines()),
        "```",
        "",
    ]
    out.write_text("\n".join(lines))

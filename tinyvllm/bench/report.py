"""A benchmark report (a JSON-able dict with one entry per run) as a markdown table and a PNG plot."""
import math

# (label, key in a run's dict: "a.b" reads run["a"]["b"], format)
ROWS = [("completed requests", "completed", "{:d}"), ("failed requests", "failed", "{:d}"),
        ("duration (s)", "duration_s", "{:.2f}"), ("output tok/s", "output_throughput", "{:.1f}"),
        ("total tok/s", "total_token_throughput", "{:.1f}"), ("request/s", "request_throughput", "{:.3f}")]
ROWS += [(f"{name} {stat} (ms)", f"{name.lower()}_ms.{stat}", "{:.1f}")
         for name in ("TTFT", "TPOT", "ITL", "E2E") for stat in ("mean", "p50", "p99")]
ROWS += [("peak RSS (MB)", "peak_rss_mb", "{:.0f}"), ("KV blocks (offline)", "kv_blocks", "{:d}"),
         ("KV usage peak", "kv_usage_peak", "{:.0%}"),
         ("preemptions", "preemptions", "{:d}"), ("max running sequences", "max_running", "{:d}")]


def value(run: dict, key: str):
    """The number under key, or None where the run has none (n/a, NaN)."""
    for part in key.split("."):
        run = run.get(part) if isinstance(run, dict) else None
    return None if run is None or (isinstance(run, float) and math.isnan(run)) else run


def markdown(runs: list[dict], extra_columns: dict[str, list[str]] | None = None) -> str:
    """Metrics as rows, one column per run (a failed run shows its error); extra_columns appends
    precomputed columns (e.g. a ratio) whose lists follow the row order."""
    cols = [r["name"] for r in runs] + list(extra_columns or {})
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for i, (label, key, fmt) in enumerate(ROWS):
        cells = ["error" if r.get("error") else "n/a" if value(r, key) is None else fmt.format(value(r, key))
                 for r in runs]
        cells += [col[i] for col in (extra_columns or {}).values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for r in runs:
        if r.get("error"):
            lines.append(f"\n{r['name']}: {r['error']}")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path) -> None:
    """Left: CDFs of TTFT and E2E per run. Right: output tok/s against the run's max concurrency
    (a concurrency sweep), else one bar per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in runs if not r.get("error")]
    fig, (cdf, tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        for key, style in (("ttft_ms", "--"), ("e2e_ms", "-")):
            xs = sorted(q[key] for q in r["requests"] if q[key] is not None)
            cdf.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], style, where="post",
                     label=f"{r['name']} {key.split('_')[0].upper()}")
    cdf.set(xlim=(0, None), xlabel="latency (ms)", ylabel="fraction of requests", title="latency CDF (-- TTFT, - E2E)")
    cdf.grid(alpha=0.3)
    if ok:
        cdf.legend(fontsize=7)
    groups: dict = {}  # a budget x concurrency sweep: one line per budget
    for r in ok:
        groups.setdefault(r.get("memory_budget"), []).append(r)
    sweep = all(len({r.get("max_concurrency") for r in g}) == len(g) for g in groups.values())  # distinct levels
    if ok and sweep and all(r.get("max_concurrency") for r in ok) and max(map(len, groups.values())) > 1:
        for budget, g in groups.items():
            tput.plot([r["max_concurrency"] for r in g], [r["output_throughput"] for r in g], "o-",
                      label=f"budget {budget}" if budget else None)
        conc = sorted({r["max_concurrency"] for r in ok})
        tput.set(xscale="log", xlabel="max concurrency (clients)", xticks=conc, xticklabels=[str(c) for c in conc])
        tput.minorticks_off()
        if len(groups) > 1:
            tput.legend(fontsize=7)
    else:
        tput.bar([r["name"] for r in ok], [r["output_throughput"] for r in ok])
        tput.tick_params(axis="x", labelsize=7, rotation=15)
    tput.set(ylabel="output tok/s", title="throughput", ylim=(0, None))
    tput.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

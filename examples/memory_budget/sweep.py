"""Sweep the memory budget on one device-sized workload and plot what each budget buys.

Every budget runs the same workload through `tinyvllm bench` (offline, in this process): the engine
plans its KV pool from what the budget leaves after weights and workspace, so a bigger budget means
more KV blocks, more sequences decoding together, fewer preemptions. A budget too small for the
weights is a result too (shown as "too small").

    python examples/memory_budget/sweep.py                       # the committed picture
    python examples/memory_budget/sweep.py --model /path/to/model.gguf --budgets 1GB,2GB,4GB
"""
import argparse
import json
import sys
from pathlib import Path

from tinyvllm.bench import cli as bench
from tinyvllm.engine.memory import parse_bytes
from tinyvllm.model.fetch import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"alias or .gguf path (default: {DEFAULT_MODEL})")
    p.add_argument("--budgets", default="160MB,176MB,192MB,224MB,256MB,320MB,384MB",
                   help="memory budgets to sweep, comma separated")
    p.add_argument("--num-prompts", "-n", type=int, default=32)
    p.add_argument("--input-len", default="64-256", help="prompt tokens, a number or a range")
    p.add_argument("--output-len", default="64-128", help="output tokens, a number or a range")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where sweep.json / .md / .png go")
    return p.parse_args(argv)


def run_bench(a) -> dict:
    """One `tinyvllm bench --memory-budget ...` run; returns its JSON report."""
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--model", a.model, "--memory-budget", a.budgets, "--num-prompts", str(a.num_prompts),
            "--input-len", a.input_len, "--output-len", a.output_len, "--max-num-seqs", str(a.max_num_seqs),
            "--seed", str(a.seed), "--ignore-eos", "--no-progress",
            "--output-json", str(out / "sweep.json"), "--output-md", str(out / "sweep.md")]
    if a.threads:
        argv += ["--threads", str(a.threads)]
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    bench.run(parser.parse_args(argv))
    return json.loads((out / "sweep.json").read_text())


def plot(report: dict, path: Path) -> None:
    """Output throughput, TTFT (mean and p99) and the most sequences decoding at once, per budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = sorted(report["runs"], key=lambda r: parse_bytes(r["memory_budget"]))
    ok = [r for r in runs if not r.get("error")]
    mb = lambda r: parse_bytes(r["memory_budget"]) / 1e6  # "256MB" means 256e6 bytes
    fig, (tput, ttft, seqs) = plt.subplots(1, 3, figsize=(15, 4.2))
    tput.plot([mb(r) for r in ok], [r["output_throughput"] for r in ok], "o-")
    tput.set(ylabel="output tok/s", title="throughput")
    for stat, style in (("mean", "o-"), ("p99", "s--")):
        ttft.plot([mb(r) for r in ok], [r["ttft_ms"][stat] / 1e3 for r in ok], style, label=f"TTFT {stat}")
    ttft.set(ylabel="seconds", title="time to first token")
    ttft.legend()
    seqs.plot([mb(r) for r in ok], [r["max_running"] for r in ok], "o-", label="most sequences running at once")
    seqs.plot([mb(r) for r in ok], [r["preemptions"] for r in ok], "s--", label="preemptions")
    seqs.set(title="concurrent sequences")
    seqs.legend()
    pad = 0.04 * (mb(runs[-1]) - mb(runs[0]))
    for ax in (tput, ttft, seqs):
        ax.set(xlabel="memory budget (MB)", ylim=(0, None), xticks=[mb(r) for r in runs],
               xlim=(mb(runs[0]) - pad, mb(runs[-1]) + pad))
        ax.set_xticklabels([r["memory_budget"].removesuffix("MB") for r in runs], fontsize=8)
        ax.grid(alpha=0.3)
        for r in runs:
            if r.get("error"):  # too small for the weights: marked where it would be
                ax.axvline(mb(r), color="red", alpha=0.4, linestyle=":")
    small = [r["memory_budget"] for r in runs if r.get("error")]
    c = report["config"]
    fig.suptitle(f"{Path(report['model']).name}: {c['num_prompts']} requests at once, prompts {c['input_len']}, "
                 f"outputs {c['output_len']} tokens, max {c['max_num_seqs']} sequences"
                 + (f"; too small (red): {', '.join(small)}" if small else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    report = run_bench(a)
    png = Path(a.out_dir) / "sweep.png"
    plot(report, png)
    print(f"wrote {png}")
    return 0 if any(not r.get("error") for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Charts of the benchmarks' results.

python benchmarks/chart.py                     decode_tokens_per_s.png from compare.py's results.json
python benchmarks/chart.py peers A.json B.json peers_decode_tokens_per_s.png from peers.py's results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(results: Path = HERE / "results.json", out: Path = HERE / "decode_tokens_per_s.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    systems = list(dict.fromkeys(row["system"] for row in data["rows"]))
    batches = sorted({row["batch"] for row in data["rows"]})
    figure, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        rows = {row["system"]: row for row in data["rows"] if row["batch"] == batch}
        values = [rows[s]["aggregate_tokens_per_s"] if s in rows else 0 for s in systems]
        colors = ["#999999" if not s.startswith("starcast") else "#d62728" for s in systems]
        bars = ax.bar(range(len(systems)), values, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        if batch == 1:
            ax.axhline(data["roofline"]["tokens_per_s"], linestyle="--", color="black", linewidth=1)
            ax.text(
                len(systems) - 0.5,
                data["roofline"]["tokens_per_s"],
                " fp32 roofline",
                va="bottom",
                ha="right",
                fontsize=8,
            )
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"batch {batch}: decode tokens/s (aggregate)", fontsize=10)
    figure.suptitle(
        f"{data['preset']} ({data['parameters'] / 1e6:.0f}M), {data['prompt']} -> {data['new']} tokens, "
        f"{data['threads']} threads: {data['machine']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


COLORS = {"starcast": "#d62728", "llama.cpp": "#1f77b4", "CTranslate2": "#7f7f7f"}


def peers(*results: Path, out: Path = HERE / "peers_decode_tokens_per_s.png") -> None:
    """One panel per model and batch: decode tokens/s (aggregate) of every system at every precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for path in results:
        data = json.loads(path.read_text())
        for batch in sorted({row["batch"] for row in data["rows"]}):
            rows = [r for r in data["rows"] if r["batch"] == batch and "decode_tokens_per_s" in r]
            panels.append((f"{data['label']}, batch {batch}", rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        labels = [f"{r['system']}\n{r['precision']}" for r in rows]
        bars = ax.bar(range(len(rows)), [r["decode_tokens_per_s"] for r in rows],
                      color=[COLORS.get(r["system"], "#999999") for r in rows])  # fmt: skip
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{title}: decode tokens/s", fontsize=9)
    figure.suptitle("starcast, llama.cpp and CTranslate2 on the same CPU in one run (2 threads)", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["peers"]:
        peers(*(Path(a) for a in sys.argv[2:]))
    else:
        main(*(Path(a) for a in sys.argv[1:]))

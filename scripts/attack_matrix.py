"""Run ``memora-batch scoreboard`` on every erased model of the micro world and regenerate docs/attacks.md's matrix
(variants x attacks), docs/attacks.json and docs/attacks-matrix.png:

    python scripts/attack_matrix.py                       # every variant; results under memora-output/attack-matrix
    python scripts/attack_matrix.py --variants esd_x  # one variant (the matrix then has that row only)

Settings (small enough for a 2-core CPU): 32 evaluation images per model at 20 DDIM steps, the micro world's MemoRa
recipe (50 LoRA updates at learning rate 3e-3), the attack nodes' defaults, direct relearning also on the
never-learned control. A rerun resumes: finished jobs are skipped (each variant has its own results folder)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memora.fileio import atomic_write  # noqa: E402
from memora_batch import attacks as A  # noqa: E402
from memora_batch import cli  # noqa: E402

DOC, DATA, CHART = ROOT / "docs" / "attacks.md", ROOT / "docs" / "attacks.json", ROOT / "docs" / "attacks-matrix.png"
START, END = "<!-- attack-matrix:start (scripts/attack_matrix.py writes this part) -->", "<!-- attack-matrix:end -->"
SETTINGS = {"eval_images": 32, "eval_steps": 20}
CONTROL = "never_learned"


def erased_variants() -> list[str]:
    from memora.micro import world

    return [v for v in world.VARIANTS if v not in ("original", CONTROL)]


def run_variant(variant: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    argv = ["scoreboard", "--models", "micro", "--variant", variant, "--control", CONTROL, "--out", str(out),
            "--eval-images", str(SETTINGS["eval_images"]), "--eval-steps", str(SETTINGS["eval_steps"]),
            "--no-progress", *extra]
    t0 = time.monotonic()
    rc = cli.main(argv)
    seconds = time.monotonic() - t0
    if rc not in (0, cli.EXIT_JOB_FAILED):
        raise SystemExit(f"scoreboard on {variant!r} stopped (exit status {rc})")
    return json.loads((out / "scoreboard.json").read_text(encoding="utf-8")), seconds


def recorded(out: Path) -> tuple[dict, float]:
    """(the scoreboard a run left in ``out``, the seconds its recorded jobs took)."""
    path = out / "scoreboard.json"
    if not path.is_file():
        raise SystemExit(f"--render-only: no {path} (run the matrix first)")
    jobs = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    return json.loads(path.read_text(encoding="utf-8")), sum(float(j.get("seconds") or 0) for j in jobs)


def _cell(row: dict) -> str:
    if not row.get("n"):
        return "-"
    star = "*" if row.get("fisher_p") is not None and row["fisher_p"] < 0.05 else ""
    return f"{row['rate']:.2f}{star} ({row['k']}/{row['n']})"


def matrix_markdown(boards: dict, seconds: dict, note: str = "") -> str:
    """The variants x attacks table (rate, * = Fisher p < 0.05 vs no attack, k/n), then the cost per attack."""
    cols = [(a.name, "unlearned") for a in A.ATTACKS] + [("direct relearning", CONTROL)]
    present = [c for c in cols if any((r["attack"], r["model"]) == c for b in boards.values() for r in b["rows"])]
    head = "| variant | " + " | ".join(a if m == "unlearned" else f"{a} ({m})" for a, m in present) + " |"
    lines = [head, "|" + "---|" * (len(present) + 1)]
    for variant, board in boards.items():
        by = {(r["attack"], r["model"]): r for r in board["rows"]}
        lines.append(f"| {variant} | " + " | ".join(_cell(by[c]) if c in by else "-" for c in present) + " |")
    lines += ["", "Cost per attack (first variant; seconds of the attack's own nodes on this 2-core CPU, UNet calls, "
              "concept images, knowledge):", "", "| attack | model | knowledge | seconds | UNet fwd / bwd | "
              "concept images |", "|---|---|---|---|---|---|"]
    first = next(iter(boards.values()))
    for r in first["rows"]:
        lines.append(f"| {r['attack']} | {r['model']} | {r['knowledge']} | {r['seconds']:.1f} | {r['forward_calls']}"
                     f" / {r['backward_calls']} | {r['concept_images']} |")
    skipped: dict = {}
    for variant, b in boards.items():
        for s in b.get("skipped") or []:
            skipped.setdefault((s["attack"], s["why"]), []).append(variant)
    lines += [""] + [f"- not run on {', '.join(vs)}: {a}: {w}" for (a, w), vs in sorted(skipped.items())]
    total = sum(seconds.values())
    lines += ["", f"Wall time: {total / 60:.1f} min for {len(boards)} variant(s) (" +
              ", ".join(f"{v} {s / 60:.1f} min" for v, s in seconds.items()) + "), this project's shared 2-core "
              f"CPU. Settings: {SETTINGS['eval_images']} evaluation images per model, {SETTINGS['eval_steps']} DDIM "
              "steps, the micro world's MemoRa recipe; rate: micro-top1 with k/n; *: one-sided Fisher p < 0.05 "
              "against the no-attack rate of the same variant."]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def write_chart(boards: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    names = [a.name for a in A.ATTACKS]
    grid = np.full((len(boards), len(names)), np.nan)
    for i, board in enumerate(boards.values()):
        for r in board["rows"]:
            if r["model"] == "unlearned" and r.get("n"):
                grid[i, names.index(r["attack"])] = r["rate"]
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 0.5 * len(boards) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(boards)), list(boards), fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
    fig.colorbar(im, ax=ax, label="recovered rate (micro-top1)")
    ax.set_title("Micro world: which erasure resists which attack")
    fig.tight_layout()
    fig.savefig(CHART, dpi=100)
    plt.close(fig)


def update_doc(text: str) -> None:
    doc = DOC.read_text(encoding="utf-8")
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC} has no {START} ... {END} markers")
    head, rest = doc.split(START, 1)
    tail = rest.split(END, 1)[1]
    atomic_write(DOC, f"{head}{START}\n{text}\n{END}{tail}", replace=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=None, help="comma-separated micro-world variants (default: every erased one)")
    ap.add_argument("--out", default="memora-output/attack-matrix", help="results folders go under this folder")
    ap.add_argument("--attacks", default=None, help="passed to the scoreboard (default: all)")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rewrite the docs from the scoreboards already in --out (wall time: the sum of "
                         "the recorded jobs' seconds)")
    args = ap.parse_args(argv)
    variants = args.variants.split(",") if args.variants else erased_variants()
    extra = ["--attacks", args.attacks] if args.attacks else []
    boards, seconds = {}, {}
    for v in variants:
        out = Path(args.out) / v
        if args.render_only:
            boards[v], seconds[v] = recorded(out)
        else:
            boards[v], seconds[v] = run_variant(v, out, extra)
    atomic_write(DATA, json.dumps({"settings": SETTINGS, "control": CONTROL, "seconds": seconds,
                                   "variants": boards}, indent=2, default=str) + "\n", replace=True)
    write_chart(boards)
    note = ("Rendered with --render-only from the scoreboards in the results folders as they were: an attack missing "
            "from the table had not finished (or was not installed) there." if args.render_only else "")
    update_doc(matrix_markdown(boards, seconds, note))
    print(f"wrote {DATA}, {CHART} and the matrix of {DOC} ({sum(seconds.values()) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

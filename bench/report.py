"""Markdown tables from the JSON files of bench_decode.py and bench_generate.py.

    python bench/report.py bench/out/decode-*.json bench/out/generate-*.json

One table per kind (decode steps, whole generations), rows in the order of the files given,
then what was skipped and why. Speed-ups are those stored with each row: ratios between
systems measured in the same run (never across files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPE_NAMES = {
    "llama-3.2-1b": "Llama-3.2-1B",
    "llama-3.2-3b": "Llama-3.2-3B",
    "llama-3.1-8b": "Llama-3.1-8B",
    "qwen3-8b": "Qwen3-8B",
}
PEER_COLUMNS = (("compile", "vs torch.compile"), ("hf-static", "vs HF static+compile"),
                ("hf-eager", "vs HF eager"))


def _ratio(row: dict, peer: str) -> str:
    value = (row.get("speedup") or {}).get(peer)
    return f"{value:.2f}x" if value else "-"


def _header(cells: list[str]) -> list[str]:
    return ["| " + " | ".join(cells) + " |", "|" + "|".join(" --- " for _ in cells) + "|"]


def _environments(runs: list[dict]) -> list[str]:
    seen, lines = set(), []
    for run in runs:
        bandwidth = run.get("bandwidth") or 0
        text = (f"{run.get('gpu')} (torch {run.get('torch')}, triton {run.get('triton')}, "
                f"transformers {run.get('transformers')}"
                + (f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else "") + ")")
        if text not in seen:
            seen.add(text)
            lines.append(f"- {run.get('date', '?')[:10]}: {text}")
    return lines


def decode_table(runs: list[dict]) -> list[str]:
    lines = _header(["shape", "batch", "KV pos", "system", "ms / step", "tokens/s", "GB/s",
                     "fraction of floor", *(title for _, title in PEER_COLUMNS)])
    for run in runs:
        for r in run["rows"]:
            lines.append(
                f"| {SHAPE_NAMES.get(r['shape'], r['shape'])} | {r['batch']} | {r['pos']} | "
                f"{r['system']} | {r['ms']:.3f} | {r['tok_s']:.0f} | {r['gbs']:.0f} | "
                f"{r['fraction']:.2f} | "
                + " | ".join(_ratio(r, peer) for peer, _ in PEER_COLUMNS) + " |"
            )
    return lines


def generate_table(runs: list[dict]) -> list[str]:
    lines = _header(["shape", "batch", "prompt + new", "system", "seconds", "tokens/s",
                     "ms / token", "agree", *(title for _, title in PEER_COLUMNS)])
    for run in runs:
        for r in run["rows"]:
            agree = "-" if r.get("agree") is None else str(r["agree"])
            lines.append(
                f"| {SHAPE_NAMES.get(r['shape'], r['shape'])} | {r['batch']} | "
                f"{r['prompt_len']} + {r['new_tokens']} | {r['system']} | {r['seconds']:.3f} | "
                f"{r['tok_s']:.1f} | {r['ms_per_token']:.2f} | {agree} | "
                + " | ".join(_ratio(r, peer) for peer, _ in PEER_COLUMNS) + " |"
            )
    return lines


def skipped_lines(runs: list[dict]) -> list[str]:
    lines = []
    for run in runs:
        for s in run.get("skipped", []):
            what = s.get("system", "whole row")
            lines.append(f"- {s.get('shape')} batch {s.get('batch')} pos {s.get('pos')}, "
                         f"{what}: {s.get('reason')}")
    return lines


def report(paths: list[Path]) -> str:
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        data.setdefault("kind", "decode")
        runs.append(data)
    out: list[str] = []
    for kind, title, table in (("decode", "One decode step", decode_table),
                               ("generate", "Greedy generation", generate_table)):
        chosen = [r for r in runs if r["kind"] == kind and r.get("rows")]
        if chosen:
            out += [f"### {title}", "", *_environments(chosen), "", *table(chosen), ""]
    skipped = skipped_lines(runs)
    if skipped:
        out += ["### Skipped", "", *skipped, ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    sys.stdout.write(report(args.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

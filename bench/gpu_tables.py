"""The GPU tables of docs/results.md, written from the records committed under ``bench/results/``.

    python bench/gpu_tables.py           # rewrite the generated block of docs/results.md
    python bench/gpu_tables.py --check   # exit 1 if that block is not what the records give

Every GPU figure in the docs comes from a record, and every table row names the record it came from,
so a reader can open the JSON behind a number and the command that measured it. A record is what
``bench/gpu_check.py`` wrote on a GPU machine (``"record": "sinklens-gpu-check/2"``; dry runs are
left out). Figures of a run that left no record (``"record": "sinklens-gpu-check/unrecorded"``,
transcribed from the prose of an earlier release) are shown marked as such until a rerun's record
replaces them. The block sits between the two markers below and is the only part of docs/results.md
this script writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "results.md"
BEGIN = "<!-- gpu-tables:begin (python bench/gpu_tables.py writes this from bench/results/) -->"
END = "<!-- gpu-tables:end -->"
RECORD = "sinklens-gpu-check/2"
UNRECORDED = "sinklens-gpu-check/unrecorded"
NO_RECORD = "none: unrecorded run"


def records(folder: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]]]:
    """The GPU runs' records and the unrecorded transcriptions in ``folder``, newest first."""
    found, unrecorded = [], []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("record") == RECORD and not data.get("dry_run"):
            found.append((path, data))
        elif data.get("record") == UNRECORDED:
            unrecorded.append((path, data))
    newest = lambda item: item[1].get("date", "")  # noqa: E731
    return sorted(found, key=newest, reverse=True), sorted(unrecorded, key=newest, reverse=True)


def _link(path: Path, docs: Path) -> str:
    return f"[`{path.name}`]({Path(os.path.relpath(path, docs.parent)).as_posix()})"


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows
    ]
    return lines


def _seconds(value) -> str | None:
    return None if value is None else f"{value:.3g} s"


def _gb(value) -> str | None:
    return None if value is None else f"{value / 1e9:.2f} GB"


def _layers(layers_run: list[int]) -> str:
    """``[15, 15, 2, 2]`` as ``15, 15, 2 x2``: each forward pass's layers, runs of the same count
    merged."""
    parts, index = [], 0
    while index < len(layers_run):
        end = index
        while end + 1 < len(layers_run) and layers_run[end + 1] == layers_run[index]:
            end += 1
        count = end - index + 1
        parts.append(str(layers_run[index]) if count == 1 else f"{layers_run[index]} x{count}")
        index = end + 1
    return ", ".join(parts)


def render_record(path: Path, data: dict, docs: Path) -> list[str]:
    """One GPU run's tables, each row naming the record."""
    record = _link(path, docs)
    machine, versions = data.get("machine", {}), data.get("packages", {}).get("versions", {})
    gpu = machine.get("gpu") or {}
    tree = data.get("tree", {})
    lines = [f"### {data['date'][:10]}: {gpu.get('name', 'GPU')} (record {record})", ""]
    failed = f" ({'; '.join(data['failures'])})" if data.get("failures") else ""
    lines.append(
        f"{gpu.get('count', 1)} x {gpu.get('name')} ({gpu.get('memory_gib')} GiB, "
        f"{gpu.get('multiprocessors')} SMs, driver {machine.get('driver')}), {machine.get('cpus')} "
        f"CPU cores, Python {machine.get('python')}, torch {machine.get('torch')} (CUDA "
        f"{machine.get('cuda')}), transformers {versions.get('transformers')}, accelerate "
        f"{versions.get('accelerate')}, TransformerLens {versions.get('transformer-lens')}; "
        f"sinklens at {(tree.get('commit') or 'an unknown commit')[:10]}. Command: "
        f"`{data.get('command')}`; exit status {data.get('exit_status')}{failed}."
    )
    tests = data.get("gpu_tests", {})
    if "tests" in tests:
        lines += [
            "",
            f"**The `gpu` tests** (`{tests.get('command')}`): {tests['passed']} passed, "
            f"{tests['failed']} "
            f"failed, {tests['skipped']} skipped.",
            "",
        ]
        rows = []
        for name, test in tests["tests"].items():
            measured = ", ".join(
                f"{key} {value}"
                for key, value in test.items()
                if key not in ("outcome", "seconds", "message")
            )
            rows.append([f"`{name}`", test["outcome"], measured or test.get("message", ""), record])
        lines += _table(["test", "outcome", "measured", "record"], rows)
    table = data.get("table", {})
    if "sides" in table:
        sides = table["sides"]
        plain = sides.get("plain_hf_sdpa", {})
        lines += [
            "",
            "**The 7B-shaped Table-1 row**, the row's forward passes replayed by plain Hugging "
            "Face "
            "(same tokens, each stopped after the same layer; both sides warmed up and "
            "synchronised):",
            "",
        ]
        rows = []
        for name, label in (
            ("layers_on_demand", "sinklens, layers on demand"),
            ("whole_model", "sinklens, whole model"),
            ("plain_hf_sdpa", "plain HF SDPA"),
        ):
            side = sides.get(name)
            if not side or "error" in side:
                continue
            seconds = side.get("row_seconds", side.get("seconds"))
            rows.append(
                [
                    label,
                    side.get("dtype"),
                    _layers(side.get("layers_run", [])),
                    side.get("tokens"),
                    _seconds(side.get("load_seconds")),
                    _seconds(seconds),
                    _seconds(side.get("forward_seconds")),
                    _seconds(side.get("other_seconds")),
                    _gb(side.get("peak_gpu_bytes")),
                    f"{seconds / plain['seconds']:.2f}x" if plain.get("seconds") else None,
                    record,
                ]
            )
        lines += _table(
            [
                "side",
                "dtype",
                "layers run per forward pass",
                "tokens",
                "load",
                "time",
                "in forward passes",
                "everything else",
                "peak GPU memory",
                "time / plain",
                "record",
            ],
            rows,
        )
        comparisons = table.get("comparisons", [])
        if comparisons:
            lines += ["", "Comparisons and their tolerances:", ""]
            lines += _table(
                ["comparison", "value", "tolerance", "kept", "record"],
                [
                    [
                        c["name"],
                        c["value"],
                        c["tolerance"],
                        "yes" if c["within"] else "**no**",
                        record,
                    ]
                    for c in comparisons
                ],
            )
    scan = data.get("scan", {})
    if "tokens_per_second_by_batch" in scan:
        lines += [
            "",
            f"**The scan** at {scan.get('n_repeats')} repeats ({scan.get('layers_run')} layers "
            "run); the "
            f"CUDA default batch is {scan.get('default_batch')}:",
            "",
        ]
        rows = [[batch, rate, record] for batch, rate in scan["tokens_per_second_by_batch"].items()]
        lines += _table(["batch (tokens per forward pass)", "tokens per second", "record"], rows)
    return lines + [""]


def render_unrecorded(path: Path, data: dict) -> list[str]:
    """A run without a record: its transcribed tables, every row marked."""
    lines = [
        f"### {data['date']}: the last release's run, unrecorded",
        "",
        f"{data['why']} Machine: "
        f"{data['machine']}. Source of this transcription: `bench/results/{path.name}`.",
        "",
    ]
    for table in data["tables"]:
        lines += [f"**{table['title']}.**", ""]
        lines += _table([*table["columns"], "record"], [[*row, NO_RECORD] for row in table["rows"]])
        if table.get("note"):
            lines += ["", f"{table['note']} (Record: {NO_RECORD}.)"]
        lines.append("")
    return lines


def block(folder: Path, docs: Path) -> str:
    """The generated block, markers included."""
    found, unrecorded = records(folder)
    lines = [BEGIN, ""]
    if not found:
        lines += [
            "No GPU run has left a record yet: `bench/gpu_check.py` has not run on a GPU since it "
            "writes "
            "records. Every figure below is from a run that left none.",
            "",
        ]
    for path, data in found:
        lines += render_record(path, data, docs)
    for path, data in unrecorded:
        lines += render_unrecorded(path, data)
    return "\n".join([*lines, END])


def rewrite(text: str, generated: str) -> str:
    """``text`` (docs/results.md) with the block between the markers replaced by ``generated``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(
            f"docs/results.md must hold the markers once each, in order:\n{BEGIN}\n{END}"
        )
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + generated + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the docs' block is stale, write nothing"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="the records' folder (default: %(default)s)"
    )
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help="the page holding the block (default: %(default)s)"
    )
    args = parser.parse_args()
    text = args.docs.read_text(encoding="utf-8")
    updated = rewrite(text, block(args.results.resolve(), args.docs.resolve()))
    if args.check:
        if updated != text:
            print(
                f"{args.docs}: the GPU tables are stale; run python bench/gpu_tables.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if updated != text:
        args.docs.write_text(updated, encoding="utf-8")
    found, unrecorded = records(args.results.resolve())
    print(
        f"{args.docs}: GPU tables from {len(found)} record(s) and {len(unrecorded)} unrecorded "
        "run(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The analysis notebooks, executed, with outputs that a viewer shows without a kernel or a network.

``python -m sinklens.present.notebooks`` (from the repository root) executes every notebook in
``analyses/`` (or the ones named) top to bottom in a fresh kernel, with each notebook's own settings, and
writes it back with its outputs. What is kept is what the run found, the same on every run:

* every plotly figure carries a PNG beside its interactive JSON (the kernel runs with
  ``PLOTLY_RENDERER=plotly_mimetype+png``), so GitHub, nbviewer and ``jupyter nbconvert --to html``
  show it as an image, and JupyterLab or VS Code as the live figure. The PNGs need kaleido and Pillow
  (the ``notebook`` extra) and a Chrome or Chromium on the machine; they are kept as 256-colour
  palette images, a quarter of kaleido's size;
* progress bars (tqdm's widgets, and everything on stderr) are dropped: they tell how the run went,
  not what it found, and they differ from run to run;
* no timings are recorded, and the kernel runs in a temporary directory, so the files a notebook
  writes (``patch.json``) stay out of the repository.

:func:`differences` compares a committed notebook with a fresh execution: numbers within a relative
tolerance, everything else exactly, and a figure wherever there was one. The test suite uses it to
check that the committed outputs are those of the current code; ``--check`` does the same from the
command line, writing nothing.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path("analyses")
STATIC_RENDERER = "plotly_mimetype+png"  # the interactive figure and a PNG of it, in one output
LIVE_RENDERER = "plotly_mimetype"  # the interactive figure only: no kaleido, no browser
PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"
WIDGET_MIMETYPE = "application/vnd.jupyter.widget-view+json"
# not compared: images (a renderer's pixels) and widget views (a reference to a live kernel's widget, new each run)
UNCOMPARED_MIMETYPES = ("image/png", WIDGET_MIMETYPE)
# tqdm's meter as its widget's text form shows it: "desc:  40%|####      | 2/5 [00:01<00:02, 1.2it/s]"
PROGRESS_METER = re.compile(r"\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]?\s*\[")
# a setting a notebook reads from the environment, as in os.environ.get("SINKLENS_N_REPEATS", "1000")
SETTING = re.compile(r"os\.environ\.get\(\s*[\"'](\w+)[\"']")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
RELATIVE_TOLERANCE = 2e-3  # float32 kernels of another CPU sum in another order: a probe's held-out accuracy moves by
# one sample in a thousand, a mean of cancelling terms by a few 1e-4; a change of the code moves numbers further
ABSOLUTE_TOLERANCE = 1e-8  # float32 noise around an exact 0


def notebook_paths(names: Sequence[str] = ()) -> list[Path]:
    """The notebooks named, or every notebook in ``analyses/`` of the current directory."""
    paths = [Path(n) for n in names] or sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(
            f"no notebook at {', '.join(missing) or NOTEBOOKS_DIR / '*.ipynb'}; "
            "run from the repository root or name the notebooks"
        )
    return paths


def is_progress(output: dict) -> bool:
    """True for what a progress bar leaves: a stream on stderr, or a tqdm widget."""
    if output["output_type"] == "stream":
        return output["name"] == "stderr"
    data = output.get("data", {})
    return WIDGET_MIMETYPE in data and bool(PROGRESS_METER.search(data.get("text/plain", "")))


def settings(notebook: nbformat.NotebookNode) -> set[str]:
    """The environment variables the notebook's code reads its settings from."""
    return {
        name
        for cell in notebook.cells
        if cell.cell_type == "code"
        for name in SETTING.findall(cell.source)
    }


def palette_png(png_base64: str) -> str:
    """A base64 PNG as a 256-colour palette PNG: a figure has few colours, so this looks the same at about
    a quarter of the size (kaleido writes full RGBA)."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(colors=256, dither=Image.Dither.NONE).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Execution:
    """A notebook as executed, and the seconds each of its code cells took (in order)."""

    notebook: nbformat.NotebookNode
    cell_seconds: list[float]

    def slowest(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` slowest code cells: their first line and seconds."""
        cells = [c for c in self.notebook.cells if c.cell_type == "code"]
        ranked = sorted(zip(cells, self.cell_seconds), key=lambda pair: -pair[1])[:n]
        return [((cell.source.splitlines() or [""])[0], seconds) for cell, seconds in ranked]


def execute(path: Path, *, renderer: str = STATIC_RENDERER) -> Execution:
    """``path`` executed top to bottom in a fresh kernel on its own default settings (the variables it
    reads are cleared from the kernel's environment), without its progress bars or timings.

    ``renderer``: plotly's renderer in the kernel; :data:`STATIC_RENDERER` adds a PNG to every figure,
    :data:`LIVE_RENDERER` does not (faster, and needs no browser)."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as workdir:
        client = NotebookClient(
            notebook,
            resources={"metadata": {"path": workdir}},
            record_timing=True,
            store_widget_state=False,
            coalesce_streams=True,
        )
        environment = {
            name: value for name, value in os.environ.items() if name not in settings(notebook)
        }
        client.execute(env={**environment, "PLOTLY_RENDERER": renderer})
    cell_seconds = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_progress(o)]
            for output in cell.outputs:
                if "image/png" in output.get("data", {}):
                    output["data"]["image/png"] = palette_png(output["data"]["image/png"])
            timing = cell.metadata.pop("execution")
            start, end = (
                datetime.fromisoformat(timing[key])
                for key in ("iopub.execute_input", "shell.execute_reply")
            )
            cell_seconds.append((end - start).total_seconds())
    return Execution(notebook, cell_seconds)


def comparable(output: dict) -> dict[str, str]:
    """An output as text per kind (``stdout``, or each mimetype but images and widget views), the way it is
    compared."""
    if output["output_type"] == "stream":
        return {output["name"]: output["text"]}
    return {
        kind: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for kind, value in output.get("data", {}).items()
        if kind not in UNCOMPARED_MIMETYPES
    }


def same_up_to_rounding(expected: str, actual: str, rel: float = RELATIVE_TOLERANCE) -> bool:
    """True if the texts are equal once every number in them is compared within ``rel``."""
    expected_parts, actual_parts = NUMBER.split(expected), NUMBER.split(actual)
    if expected_parts != actual_parts:
        return False
    return all(
        math.isclose(float(a), float(b), rel_tol=rel, abs_tol=ABSOLUTE_TOLERANCE)
        for a, b in zip(NUMBER.findall(expected), NUMBER.findall(actual))
    )


def same_figure(expected, actual, rel: float = RELATIVE_TOLERANCE) -> bool:
    """True if two plotly figures (as JSON data) are equal once every array of numbers is compared within ``rel`` of
    the array's largest magnitude. A value near 0 in an array of larger ones (a mean of scores that cancel, say)
    carries the rounding of the others: float32 kernels that sum in another order (another CPU, another thread
    count) move it by more than ``rel`` of itself, never by more than ``rel`` of the array."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            same_figure(expected[k], actual[k], rel) for k in expected
        )
    numbers, other = _flat_numbers(expected), _flat_numbers(actual)
    if numbers is not None and other is not None and numbers:
        scale = max((abs(x) for x in numbers if x is not None and not math.isnan(x)), default=0.0)
        return len(numbers) == len(other) and all(
            _same_number(a, b, rel, rel * scale) for a, b in zip(numbers, other)
        )
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(
            same_figure(a, b, rel) for a, b in zip(expected, actual)
        )
    if isinstance(expected, str) and isinstance(actual, str):
        return same_up_to_rounding(expected, actual, rel)
    return expected == actual


def _same_number(a: float | None, b: float | None, rel: float, absolute: float) -> bool:
    """Both blank (None or NaN), or both numbers within ``rel`` of each other or ``absolute`` apart."""
    blank_a, blank_b = a is None or math.isnan(a), b is None or math.isnan(b)
    if blank_a or blank_b or a is None or b is None:
        return blank_a == blank_b
    return math.isclose(a, b, rel_tol=rel, abs_tol=absolute)


def _flat_numbers(value) -> list[float | None] | None:
    """A number, or a (nested) list of numbers and blanks, as one flat list; None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if not isinstance(value, list):
        return None
    flat: list[float | None] = []
    for item in value:
        if item is None:
            flat.append(None)
            continue
        inner = _flat_numbers(item)
        if inner is None:
            return None
        flat += inner
    return flat


def differences(
    committed: nbformat.NotebookNode, fresh: nbformat.NotebookNode, rel: float = RELATIVE_TOLERANCE
) -> list[str]:
    """Where ``fresh`` (an execution of the same cells) does not reproduce ``committed``'s outputs:
    one line per cell that differs; empty if every output matches up to ``rel`` on numbers."""
    old_cells = [c for c in committed.cells if c.cell_type == "code"]
    new_cells = [c for c in fresh.cells if c.cell_type == "code"]
    if [c.source for c in old_cells] != [c.source for c in new_cells]:
        return ["the code cells differ: compare an execution of the notebook itself"]
    found = []
    for number, (old, new) in enumerate(zip(old_cells, new_cells), start=1):
        where = f"code cell {number} ({(old.source.splitlines() or [''])[0]!r})"
        old_outputs, new_outputs = (
            [comparable(o) for o in old.outputs],
            [comparable(o) for o in new.outputs],
        )
        if [sorted(o) for o in old_outputs] != [sorted(o) for o in new_outputs]:
            found.append(
                f"{where}: outputs of kinds {[sorted(o) for o in old_outputs]} "
                f"became {[sorted(o) for o in new_outputs]}"
            )
            continue
        for old_output, new_output in zip(old_outputs, new_outputs):
            changed = [
                kind
                for kind in old_output
                if not _same_output(kind, old_output[kind], new_output[kind], rel)
            ]
            if changed:
                found.append(f"{where}: {', '.join(changed)} differ")
    return found


def _same_output(kind: str, expected: str, actual: str, rel: float) -> bool:
    if kind == PLOTLY_MIMETYPE:
        return same_figure(json.loads(expected), json.loads(actual), rel)
    return same_up_to_rounding(expected, actual, rel)


def figure_outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    """Every plotly figure among the notebook's outputs."""
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if PLOTLY_MIMETYPE in output.get("data", {})
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the notebooks named (default: all of ``analyses/``), or with ``--check`` list where a fresh
    execution differs from them; exit status 1 if one does."""
    parser = argparse.ArgumentParser(
        prog="python -m sinklens.present.notebooks",
        description="Execute the analysis notebooks and write them back with their outputs (figures with a PNG).",
    )
    parser.add_argument(
        "notebooks", nargs="*", help="notebooks to execute (default: analyses/*.ipynb)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="execute without writing, and list where the outputs differ from the notebook's own",
    )
    args = parser.parse_args(argv)
    try:
        paths = notebook_paths(args.notebooks)
    except FileNotFoundError as error:
        parser.error(str(error))
    failed = False
    for path in paths:
        execution = execute(path, renderer=LIVE_RENDERER if args.check else STATIC_RENDERER)
        seconds = sum(execution.cell_seconds)
        if args.check:
            found = differences(nbformat.read(path, as_version=4), execution.notebook)
            failed |= bool(found)
            print(f"{path}: {'differs' if found else 'reproduced'} ({seconds:.0f} s)")
            print("".join(f"  {line}\n" for line in found), end="")
        else:
            nbformat.write(execution.notebook, path)
            print(f"{path}: executed in {seconds:.0f} s, {path.stat().st_size / 1024:.0f} KiB")
        print(
            "  slowest cells: "
            + "; ".join(f"{line!r} {cell:.0f} s" for line, cell in execution.slowest())
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

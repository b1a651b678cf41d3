"""What a scan directory holds, and how it is written so that nothing is lost.

``scan.json`` is the :class:`ScanSetup` every row depends on, ``screen.json`` the :class:`Screen` of a screened
scan, ``request.json`` the tokens the latest run asked for (the calibration sample is drawn from them, by
``run_scan`` and by ``merge_scan`` alike), and ``rows-i-of-n.jsonl`` / ``screen-i-of-n.jsonl`` one shard's full
and short runs, appended batch by batch (a torn last line is cut on reopening, so a killed run resumes).
``scan.parquet`` is the merged table. :mod:`sinklens.studies.scan` measures the rows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sinklens._io import write_json
from sinklens.analyses.norms import sink_threshold
from sinklens.defaults import SCREEN_CALIBRATION, SCREEN_POSITIVES, SCREEN_REPEATS, SCREEN_THRESHOLD
from sinklens.errors import SinklensError

SETUP_FILE = "scan.json"
SCREEN_FILE = "screen.json"
REQUEST_FILE = "request.json"
TABLE_FILE = "scan.parquet"


@dataclass(frozen=True)
class ScanSetup:
    """What every row of a scan depends on (stored as ``scan.json`` beside the rows)."""

    model: str
    first_token: int
    prefix: tuple[int, ...]
    n_repeats: int
    layer: int  # where norms are read: the (last) sink layer
    sink_neurons: tuple[tuple[int, int], ...]
    typical_norm: float
    first_token_norm: float
    sink_neuron_first: tuple[float, ...]  # each sink neuron's activation on the first token
    detector: tuple[int, int]  # the top first-detector neuron (layer, index), read at hook_pre
    detector_first: float  # its mean value at position 0 / position 1 of natural-text chunks
    detector_later: float
    dtype: str = "float32"  # the model's precision (statistics are float32 whatever it is)
    settings: dict = field(default_factory=dict)  # the choices that measured it (scan_settings)

    @property
    def threshold(self) -> float:
        return sink_threshold(self.first_token_norm, self.typical_norm)

    def to_json(self) -> dict:
        data = asdict(self)
        data["prefix"], data["sink_neurons"] = (
            list(self.prefix),
            [list(n) for n in self.sink_neurons],
        )
        data["detector"], data["sink_neuron_first"] = (
            list(self.detector),
            list(self.sink_neuron_first),
        )
        return data

    @classmethod
    def from_json(cls, data: dict) -> ScanSetup:
        return cls(
            **{
                **data,
                "prefix": tuple(data["prefix"]),
                "detector": tuple(data["detector"]),
                "sink_neurons": tuple(tuple(n) for n in data["sink_neurons"]),
                "sink_neuron_first": tuple(data["sink_neuron_first"]),
            }
        )


class Screen(NamedTuple):
    """The cheap first pass of a screened scan (stored as ``screen.json`` beside the rows).

    Every token asked for is run with ``n_repeats`` repeats only, and its screen score is how far that
    short run's peak norm at the sink layer went from the typical norm toward the first token's, in
    log space (:func:`screen_score`: 0 at the typical norm, 1 at the first token's; the sink regime
    starts at 0.9). Tokens scoring at least ``threshold`` are run in full, and so is a seeded random
    sample of ``calibration`` tokens of the request whatever their score: the sample's screen negatives
    measure what the screen misses, so the share over the request is estimated with an interval and
    the screen's recall is measured on every run, never assumed. ``positives`` below 1 runs only that
    share of the screen positives in full (drawn at random), trading a wider interval for time.
    """

    n_repeats: int = SCREEN_REPEATS
    threshold: float = SCREEN_THRESHOLD
    calibration: int = SCREEN_CALIBRATION
    positives: float = SCREEN_POSITIVES
    seed: int = 0

    def positive(self, short_row: dict, setup: ScanSetup) -> bool:
        """Whether a token's short run makes it a screen positive."""
        return screen_score(short_row, setup) >= self.threshold


def screen_score(row: dict, setup: ScanSetup) -> float:
    """How far a row's peak norm went from the typical norm toward the first token's, in log space."""
    return math.log(max(row["peak_ratio"], 1e-12)) / math.log(
        setup.first_token_norm / setup.typical_norm
    )


class RowFile:
    """One shard's rows as JSON lines; appends survive a kill (a torn last line is cut on reopening)."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        text = self.path.read_text(encoding="utf-8")
        for line in text.split("\n")[:-1]:  # a last segment without its newline is a torn write
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        self._cut_torn_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with self.path.open("r+b") as f:
                f.truncate(end)


def row_file(out: Path, kind: str, shard: tuple[int, int]) -> RowFile:
    return RowFile(out / f"{kind}-{shard[0]}-of-{shard[1]}.jsonl")


def all_rows(out: Path, kind: str = "rows") -> dict[int, dict]:
    """Every shard's rows of one kind (``rows``: full runs, ``screen``: screen runs), each token once."""
    rows: dict[int, dict] = {}
    for path in sorted(out.glob(f"{kind}-*.jsonl")):
        for row in RowFile(path).rows():
            rows.setdefault(row["token_id"], row)
    return rows


def scan_settings(settings: dict) -> dict:
    """The settings a scan's setup depends on: all but what names the model to load and where it runs (shards of
    one scan may load it from other paths, on other devices)."""
    return {k: v for k, v in settings.items() if k not in ("model", "device")}


def stored_setup(
    out: str | Path, model: str, settings: dict, prefix: tuple[int, ...] | None = None
) -> ScanSetup | None:
    """The setup of the scan already in ``out`` (so shards and resumed runs share one, measured once), after
    checking that it was measured on ``model`` with the same ``settings`` (and ``prefix``, unless None); None if
    ``out`` holds no scan."""
    path = Path(out) / SETUP_FILE
    if not path.is_file():
        return None
    stored = ScanSetup.from_json(json.loads(path.read_text(encoding="utf-8")))
    asked = {
        "model": model,
        **({} if prefix is None else {"prefix": list(prefix)}),
        **scan_settings(settings),
    }
    held = {
        "model": stored.model,
        "prefix": list(stored.prefix),
        "n_repeats": stored.n_repeats,
        **stored.settings,
    }
    differ = sorted(k for k in asked if k in held and asked[k] != held[k])
    if differ:
        raise SinklensError(
            f"{out} holds a scan measured with another {', '.join(differ)} "
            f"({', '.join(f'{k}={held[k]!r}' for k in differ)})",
            "use another --out, or the settings of the scan already there",
        )
    return stored


def stored_screen(out: Path) -> Screen | None:
    path = out / SCREEN_FILE
    return Screen(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def prepare_scan_dir(
    out: Path, setup: ScanSetup, screen: Screen | None, request: Sequence[int]
) -> None:
    """Record ``setup``, ``screen`` and the tokens asked for (``request``) in ``out``, or check that the scan
    already there has the same setup and screen (a directory holds either an exhaustive scan or a screened one,
    never both). The request is the latest one: a directory may serve several, and its summary is the last's."""
    path = out / SETUP_FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != setup.to_json():
            differ = sorted(k for k in stored if stored.get(k) != setup.to_json().get(k))
            raise SinklensError(
                f"{out} holds a scan with other settings ({', '.join(differ)} differ)",
                "use another --out, or the settings of the scan already there",
            )
    earlier = stored_screen(out)
    if screen is None and earlier is not None:
        raise SinklensError(
            f"{out} holds a screened scan", "drop --exhaustive, or use another --out"
        )
    if screen is not None and earlier is None and any(out.glob("rows-*.jsonl")):
        raise SinklensError(
            f"{out} holds an exhaustive scan", "pass --exhaustive, or use another --out"
        )
    if screen is not None and earlier is not None and earlier != screen:
        differ = [k for k in Screen._fields if getattr(earlier, k) != getattr(screen, k)]
        raise SinklensError(
            f"{out} holds a scan with another screen ({', '.join(differ)} differ)",
            "use another --out, or the screen settings of the scan already there",
        )
    if not path.is_file():
        write_json(path, setup.to_json())
    if screen is not None and earlier is None:
        write_json(out / SCREEN_FILE, screen._asdict())
    write_json(out / REQUEST_FILE, {"token_ids": [int(t) for t in request]})


def stored_request(out: Path) -> list[int] | None:
    """The tokens the latest scan into ``out`` asked for (None for a directory written before requests were
    recorded)."""
    path = out / REQUEST_FILE
    return json.loads(path.read_text(encoding="utf-8"))["token_ids"] if path.is_file() else None


def screen_draws(token_ids: Sequence[int], screen: Screen) -> tuple[set[int], set[int]]:
    """The random parts of a screened scan, drawn with ``screen.seed`` from the sorted request (so every shard
    draws the same): the calibration sample (``screen.calibration`` tokens run in full whatever the screen says),
    and the tokens that get a full run if the screen finds them positive (each with probability
    ``screen.positives``)."""
    ids = np.array(sorted(set(int(t) for t in token_ids)))
    rng = np.random.default_rng(screen.seed)
    calibration = rng.choice(ids, min(screen.calibration, len(ids)), replace=False)
    eligible = ids[rng.random(len(ids)) < screen.positives]
    return {int(t) for t in calibration}, {int(t) for t in eligible}


def runs_in_full(token: int, positive: bool, calibration: set[int], eligible: set[int]) -> bool:
    """Whether a screened scan runs ``token`` in full: a calibration token, or a screen positive drawn for it."""
    return token in calibration or positive and token in eligible

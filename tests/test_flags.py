"""Every flag of every command is honoured or refused, never silently ignored.

Each command runs on the tiny planted model with its defaults, then once per flag it accepts, that flag set to a
value other than its default. The run passes if the command refuses the value in one line, or if its result
records the value (under the flag's own name: the settings a result was measured with are part of it) or
differs from the default run's. The flags come from the parser itself, so a new flag without a value here fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from conftest import CORPUS
from sinklens.cli import build_parser, main
from sinklens.load.benchmark_items import Item
from sinklens.studies import evaluation as evaluation_module
from test_evaluation import ITEMS, SMALL

# What a flag changes is where the result goes or how it is printed, not what is measured; each is tested where
# it acts (--json by every test that reads JSON, --out by the commands' own tests, --ray and --shards by
# tests/test_sweep.py on a local Ray instance, --model by every test).
NOT_MEASURED = {"json", "verbose", "out", "model", "ray", "shards", "patch"}

VALUES = {
    "dtype": ["--dtype", "bfloat16"],
    "device": ["--device", "cpu"],
    "first_token": ["--first-token", "eos"],
    "max_layer": ["--max-layer", "2"],
    "n_sigma": ["--n-sigma", "1.5"],
    "corpus_chars": ["--corpus-chars", "300"],
    "min_ratio": ["--min-ratio", "1e9"],
    "words": ["--words", "you"],
    "n_repeats": ["--n-repeats", "60"],
    "layers": ["--layers", "3"],
    "criterion": ["--criterion", "notebook"],
    "share": ["--share", "1"],
    "max_neurons": ["--max-neurons", "1"],
    "top": ["--top", "3"],
    "sink_layer": ["--sink-layer", "3"],
    "hook": ["--hook", "gate"],
    "value": ["--value", "calibrated"],
    "preset": ["--preset", "full"],
    "seed": ["--seed", "3"],
    "contexts": ["--contexts", "3"],
    "tokens": ["--tokens", "20"],
    "token_ids": ["--token-ids", "40,41,42,43"],
    "shard": ["--shard", "1/2"],
    "exhaustive": ["--exhaustive"],
    "screen_repeats": ["--screen-repeats", "6"],
    "screen_threshold": ["--screen-threshold", "0.5"],
    "calibration": ["--calibration", "7"],
    "positives": ["--positives", "0.5"],
    "batch_size": ["--batch-size", "2"],
    "prefix": ["--prefix", "All:"],
    "clustering": ["--clustering", "sink_tokens"],
    "lengths": ["--lengths", "6"],
    "sequences": ["--sequences", "3"],
    "site": ["--site", "mlp_out"],
    "max_memory": ["--max-memory", "0=1GiB,cpu=8GiB"],
    "metric": ["--metric", "sink_neurons"],
    "position": ["--position", "1"],
    "clean": ["--clean", "Speak, speak."],
    "corrupted": ["--corrupted", "Speak."],
    "backend": ["--backend", "nnsight"],
    "remote": ["--remote"],  # refused: it needs --backend nnsight
    "host": ["--host", "http://127.0.0.1:9"],  # refused: it needs --remote
    "remote_timeout": ["--remote-timeout", "5"],  # refused: it needs --remote
    "corpus": None,
    "scan": None,
    "text": None,
    "chat": None,  # the fixture's files
}
TEXT_ONLY = {"top"}  # changes what is printed without --json: compared in text
# Honoured, and recorded, but they cannot change a number here: the only device is the CPU, batching does not
# change the numbers, and no token of the tiny model's scan sample is a screen positive to run a share of.
# The nnsight backend is recorded and, by design, changes no number (tests/test_nnsight.py).
RECORDED_ONLY = {"device", "batch_size", "positives", "backend"}
# The same for one command, on the tiny model: its planted sink is unambiguous, so a scan (which keeps only the
# sink layer and neurons of its setup) finds the same ones whatever the sink-layer threshold (past it, the layer
# with the largest first-token ratio is taken) and among any number of candidates; and no token of it reaches the
# sink at any number of repeats, so the attack's rates cannot move.
RECORDED_ONLY_FOR = {
    (command, dest) for command in ("scan", "attack") for dest in ("n_sigma", "max_neurons")
}
RECORDED_ONLY_FOR.add(("attack", "n_repeats"))
SHORT_STUDY = ["--words", "the", "--n-repeats", "20"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


CASES = [
    (name, action.dest)
    for name, command in _commands().items()
    for action in command._actions
    if action.option_strings and action.dest not in ("help", *NOT_MEASURED)
]


@pytest.fixture(scope="module")
def files(tiny_dir, long_corpus_file, tmp_path_factory):
    """The inputs every run shares: another corpus, a patch file and a scan directory of the tiny model."""
    folder = tmp_path_factory.mktemp("flags")
    other = folder / "other-corpus.txt"
    other.write_text(CORPUS[200:] * 6)
    text, chat = folder / "text.txt", folder / "chat.json"
    text.write_text(CORPUS[300:600])
    chat.write_text(json.dumps([{"role": "user", "content": "Speak, speak."}]))
    study = ["--model", str(tiny_dir), "--corpus", str(long_corpus_file), "--corpus-chars", "400"]
    assert main(["patch", *study, *SHORT_STUDY, "--out", str(folder / "patch.json"), "--json"]) == 0
    assert (
        main(
            [
                "scan",
                *study,
                "--n-repeats",
                "20",
                "--tokens",
                "30",
                "--screen-repeats",
                "4",
                "--calibration",
                "5",
                "--out",
                str(folder / "scan"),
                "--json",
            ]
        )
        == 0
    )
    return {
        "study": study,
        "corpus": other,
        "patch": folder / "patch.json",
        "scan": folder / "scan",
        "text": text,
        "chat": chat,
    }


def _base(command: str, files: dict, out: Path) -> list[str]:
    study = files["study"]
    return {
        "report": ["report", *study, *SHORT_STUDY, "--out", str(out)],
        "table": ["table", *study, *SHORT_STUDY, "--json"],
        "neurons": ["neurons", *study, "--json"],
        "sink-layer": ["sink-layer", *study, "--json"],
        "circuit": ["circuit", *study, *SHORT_STUDY, "--contexts", "2", "--json"],
        "patch": ["patch", *study, *SHORT_STUDY, "--out", str(out / "patch.json"), "--json"],
        "evaluate": [
            "evaluate",
            "--model",
            study[1],
            "--patch",
            str(files["patch"]),
            "--corpus",
            study[3],
            "--out",
            str(out),
            "--json",
        ],
        "scan": [
            "scan",
            *study,
            "--n-repeats",
            "20",
            "--tokens",
            "30",
            "--screen-repeats",
            "4",
            "--calibration",
            "5",
            "--out",
            str(out),
            "--json",
        ],
        "attack": [
            "attack",
            *study,
            "--n-repeats",
            "20",
            "--tokens",
            "80",
            "--lengths",
            "8",
            "--sequences",
            "4",
            "--json",
        ],
        "sinks": ["sinks", *study, "--json"],
        "patching": ["patching", *study, "--json"],
    }[command]


def _run(
    argv: list[str], command: str, out: Path, capsys, *, text: bool
) -> tuple[int, object, list[str]]:
    if text:
        argv = [a for a in argv if a != "--json"]
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("sinklens: error:")]
    if code != 0 or text:
        return code, captured.out, errors
    if command == "report":
        return code, json.loads((out / "results.json").read_text()), errors
    return code, json.loads(captured.out.strip().splitlines()[-1]), errors


def _recorded(result, name: str, value) -> bool:
    """Whether ``result`` holds ``value`` under the key ``name`` anywhere."""
    if isinstance(result, dict):
        return any(
            (key == name and item == value) or _recorded(item, name, value)
            for key, item in result.items()
        )
    if isinstance(result, list):
        return any(_recorded(item, name, value) for item in result)
    return False


def _measured(result, dest: str):
    """``result`` without what merely echoes the settings (``settings`` records, the flag's own key)."""
    if isinstance(result, dict):
        return {k: _measured(v, dest) for k, v in result.items() if k not in ("settings", dest)}
    if isinstance(result, list):
        return [_measured(v, dest) for v in result]
    return result


@pytest.fixture
def small_evaluation(monkeypatch):
    """Both presets small, and benchmark items built here instead of the real data."""
    monkeypatch.setitem(evaluation_module.PRESETS, "smoke", SMALL)
    monkeypatch.setitem(evaluation_module.PRESETS, "full", {**SMALL, "items": 4, "n_repeats": 50})

    def toy_items(task, n, seed=0):
        order = sorted(
            range(len(ITEMS)), key=lambda i: (i * (seed + 1)) % len(ITEMS)
        )  # the seed draws the sample
        return [
            Item(task, f"{task}-{i}", ITEMS[i].contexts, ITEMS[i].continuations, ITEMS[i].gold)
            for i in order[:n]
        ]

    monkeypatch.setattr(evaluation_module, "load_items", toy_items)


DEFAULTS: dict[tuple[str, bool], object] = {}  # each command's default result, measured once


@pytest.mark.parametrize("command, dest", CASES, ids=[f"{c}--{d}" for c, d in CASES])
def test_every_flag_is_honoured_or_refused(
    command, dest, files, tmp_path, capsys, small_evaluation
):
    assert dest in VALUES, (
        f"no non-default value to test `sinklens {command}` flag {dest} with: add one to VALUES"
    )
    flag = VALUES[dest] or [f"--{dest}", str(files[dest])]
    text = dest in TEXT_ONLY
    if (command, text) not in DEFAULTS:
        code, DEFAULTS[command, text], _ = _run(
            _base(command, files, tmp_path / "default"),
            command,
            tmp_path / "default",
            capsys,
            text=text,
        )
        assert code == 0, f"the default run of {command} failed"
    default = DEFAULTS[command, text]
    changed = _base(command, files, tmp_path / "flag")
    if dest == "scan":  # the scan's own tokens and repeats are taken with --scan
        changed = [
            a
            for i, a in enumerate(changed)
            if a not in ("--tokens", "--n-repeats")
            and changed[i - 1] not in ("--tokens", "--n-repeats")
        ]
    code, result, errors = _run([*changed, *flag], command, tmp_path / "flag", capsys, text=text)
    if code == 2:
        assert len(errors) == 1 and "Fix:" in errors[0], errors
        return
    assert code == 0, f"sinklens {command} {' '.join(flag)} exited {code}"
    value = vars(_commands()[command].parse_args([*changed[1:], *flag]))[dest]
    recorded = _recorded(result, dest, json.loads(json.dumps(value)))
    if dest in RECORDED_ONLY or (command, dest) in RECORDED_ONLY_FOR:
        assert recorded, (
            f"sinklens {command} {' '.join(flag)}: the value is not recorded in the result"
        )
    else:
        assert _measured(result, dest) != _measured(default, dest), (
            f"sinklens {command} {' '.join(flag)} measures what the defaults measure: is the flag ignored?"
        )

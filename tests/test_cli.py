"""The command line as a user meets it: every command's output, and every bad input as one line
with exit status 2, checked before the model is loaded or before the first forward pass."""

import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import SINK_LAYER, SINK_NEURON
from sinklens import _io as io_module
from sinklens.cli import main
from sinklens.studies import report as report_module


@pytest.fixture
def study(tiny_dir, corpus_file):
    """Arguments every command accepts, pointing at the tiny model and a short corpus."""
    return ["--model", str(tiny_dir), "--corpus", str(corpus_file)]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("sinklens: error:"), err
    assert "Fix:" in errors[0]
    return errors[0]


def test_report(study, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", *study, "--out", str(out), "--words", "the", "--n-repeats", "20"]) == 0
    assert json.loads((out / "results.json").read_text())["sink_layer"] == SINK_LAYER
    printed = capsys.readouterr().out
    assert "sink neurons layer 2: 5" in printed and "wrote" in printed


def test_table_json_is_one_object_with_the_table_1_keys(study, capsys):
    assert main(["table", *study, "--words", "the", "you", "--n-repeats", "25", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    keys = {
        "model",
        "sink_layer",
        "sink_neurons",
        "sink_neurons_by_layer",
        "first_token_norm",
        "first_token_norm_ablated",
        "repeat_max_norm",
        "repeat_max_norm_ablated",
        "repeats_to_sink",
        "typical_norm",
    }
    assert keys <= set(row)
    assert row["sink_layer"] == SINK_LAYER and row["sink_neurons"] == [SINK_NEURON]
    assert row["sink_neurons_by_layer"] == {str(SINK_LAYER): [SINK_NEURON]}
    assert row["first_token_norm_ablated"] < 1e-2 * row["first_token_norm"]


def test_table_neurons_and_sink_layer_print_readable_text(study, capsys):
    assert main(["table", *study, "--words", "the", "--n-repeats", "20"]) == 0
    out = capsys.readouterr().out
    assert "Sink-Neurons IDs" in out and "first token: the tokenizer's BOS" in out
    assert main(["neurons", *study, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "sink neurons (single layer): layer 2: 5" in out and "notebook's rule" in out
    assert main(["neurons", *study, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sink_neurons"] == [[SINK_LAYER, SINK_NEURON]]
    assert main(["sink-layer", *study]) == 0
    assert "sink layer: 2" in capsys.readouterr().out


COMMON = [
    (["--model", "missing.gguf"], "does not exist"),
    (["--corpus", "no-such-corpus.txt"], "cannot read text file"),
    (["--max-layer", "0"], "--max-layer: 0 is not a positive number"),
]
STUDY = [
    (["--n-repeats", "0"], "--n-repeats: 0 is not a positive number"),
    (["--layers", "-1"], "negative layer"),
    (["--max-layer", "1"], "fewer than 2 layers"),
    (["--criterion", "notebook", "--layers", "3-5"], "ranks the neurons of one layer"),
    (["--layers", "3-x"], "not a layer, a range like 3-8"),
    (["--share", "2"], "argument --share: 2 is not a share in (0, 1]"),
    (["--criterion", "vibes"], "invalid choice: 'vibes'"),
]


@pytest.mark.parametrize(
    "command, bad, message",
    [
        *[
            (command, bad, message)
            for command in ("report", "table", "neurons", "sink-layer")
            for bad, message in COMMON
        ],
        *[(command, bad, message) for command in ("report", "table") for bad, message in STUDY],
    ],
)
def test_bad_arguments_fail_before_the_model_loads(
    command, bad, message, study, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    out = ["--out", str(tmp_path / "out")] if command == "report" else []
    model_given = (
        study[2:] if "--model" in bad else study
    )  # one --model (only `table` takes several)
    assert main([command, *model_given, *out, *bad]) == 2
    assert message in _one_error_line(capsys)


NEED_THE_MODEL = [
    (["--layers", "6"], "layer 6 is out of range"),
    (["--words", "the", "dust"], "'dust' is"),
    (["--n-repeats", "5000"], "longer than the context"),
]


@pytest.mark.parametrize(
    "command, bad, message",
    [
        (command, bad, message)
        for command in ("report", "table", "neurons")
        for bad, message in NEED_THE_MODEL
        if command != "neurons" or bad[0] == "--layers"  # neurons repeats no words
    ],
)
def test_bad_arguments_that_need_the_model_fail_before_the_first_forward_pass(
    command, bad, message, study, tmp_path, capsys, monkeypatch
):
    import sinklens.run.cache as cache

    monkeypatch.setattr(
        cache.TransformerBridge,
        "run_with_cache",
        lambda *a, **k: pytest.fail("ran a forward pass before checking"),
    )
    monkeypatch.setattr(
        cache.TransformerBridge,
        "run_with_hooks",
        lambda *a, **k: pytest.fail("ran a forward pass before checking"),
    )
    out = ["--out", str(tmp_path / "out")] if command == "report" else []
    short = (
        ["--n-repeats", "20"] if command != "neurons" else []
    )  # the tiny model's context is 256 tokens
    assert main([command, *study, *out, *short, *bad]) == 2
    assert message in _one_error_line(capsys)


def test_out_must_be_a_writable_directory(study, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    existing = tmp_path / "a-file"
    existing.write_text("not a directory")
    assert main(["report", *study, "--out", str(existing)]) == 2
    assert "is an existing file, not a directory" in _one_error_line(capsys)
    assert main(["report", *study, "--out", str(existing / "below")]) == 2
    assert "which is a file" in _one_error_line(capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        io_module.os, "access", lambda p, m: False if str(p) == str(locked) else real_access(p, m)
    )
    assert main(["report", *study, "--out", str(locked / "out")]) == 2
    assert "is not writable" in _one_error_line(capsys)


def test_an_error_is_not_printed_on_a_progress_bar_line(study, tmp_path, capsys, monkeypatch):
    from sinklens.errors import SinklensError

    def fail_midway(*args, **kwargs):
        raise SinklensError("something went wrong in an analysis", "this is a test")

    monkeypatch.setattr(report_module, "ablation_study", fail_midway)
    assert (
        main(
            [
                "report",
                *study,
                "--out",
                str(tmp_path / "out"),
                "--words",
                "the",
                "--n-repeats",
                "20",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "sinklens report" in err  # a bar was open when the error came
    assert "\nsinklens: error: something went wrong" in err.replace("\r", "\n")


def test_quiet_by_default_and_verbose_on_request(study, capsys):
    assert main(["sink-layer", *study]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert main(["sink-layer", *study, "--verbose"]) == 0
    assert "Loading weights" in capsys.readouterr().err


def test_sinklens_notices_are_printed_as_one_line(study, capsys):
    assert main(["sink-layer", *study]) == 0
    capsys.readouterr()
    logging.getLogger("sinklens").info("fetching something once")
    assert capsys.readouterr().err == "sinklens: fetching something once\n"


def test_usage_errors_are_one_line_too(capsys):
    assert (
        subprocess.run(
            [sys.executable, "-m", "sinklens", "table", "--n-repeats", "x"],
            capture_output=True,
            text=True,
        ).returncode
        == 2
    )
    assert main(["table", "--n-repeats", "x"]) == 2
    assert "argument --n-repeats: invalid" in _one_error_line(capsys)


HEAVY = ("torch", "transformer_lens", "transformers", "plotly", "pandas", "sklearn")


def _modules_loaded(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return set(proc.stdout.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["table", "--help"],
        ["table", "--dtype", "float8"],
        ["scan", "--shard", "3/2"],
        ["nonsense"],
    ],
)
def test_help_and_argument_errors_answer_before_any_heavy_import(argv):
    loaded = _modules_loaded(
        f"from sinklens.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    )
    assert "sinklens" in loaded and not loaded & set(HEAVY), loaded & set(HEAVY)


def test_import_sinklens_is_lazy_and_keeps_every_public_name():
    assert not _modules_loaded("import sinklens") & set(HEAVY)
    import sinklens

    assert sorted(sinklens.__all__) == sorted(set(sinklens.__all__)) and set(
        sinklens.__all__
    ) <= set(dir(sinklens))
    for name in sinklens.__all__:
        assert getattr(sinklens, name) is not None, name
    from sinklens.run.sink_patch import SinkPatch

    assert sinklens.SinkPatch is SinkPatch and sinklens.ReportConfig is sinklens.Settings
    with pytest.raises(AttributeError, match="has no attribute 'load_modle'"):
        sinklens.load_modle  # noqa: B018


def test_version_and_the_gpu_placement_flags_in_help(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sinklens {version('sinklens')}"
    assert main(["table", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--max-memory" in shown and "Example: sinklens table" in shown


def test_max_memory_needs_the_auto_device_and_a_size(study, capsys):
    assert main(["table", *study, "--max-memory", "0=20GiB,cpu=64GiB"]) == 2
    assert "--device auto" in _one_error_line(capsys)
    assert main(["table", *study, "--device", "auto", "--max-memory", "0=lots"]) == 2
    assert "is not a size" in _one_error_line(capsys)

import json

import pytest
from conftest import SINK_LAYER

from sinklens import ReportConfig, SinklensError, run_report
from sinklens.present import report as report_module
from sinklens.present.cli import main

STABLE_KEYS = {"model", "versions", "first_token", "sink_layer", "typical_norm", "first_token_norm", "words"}


@pytest.fixture
def config(tiny_dir, corpus_file):
    return ReportConfig(model=str(tiny_dir), words=["the", "you"], n_repeats=30, corpus=str(corpus_file))


def test_report_writes_results_and_a_self_contained_page(tiny, config, tmp_path):
    results = run_report(config, tmp_path, model=tiny)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert STABLE_KEYS <= set(on_disk)
    assert on_disk["sink_layer"] == SINK_LAYER
    assert on_disk["first_token"] == {"id": tiny.tokenizer.bos_token_id, "text": "<s>"}
    assert on_disk["first_token_norm"] > on_disk["typical_norm"] > 0
    assert [w["word"] for w in on_disk["words"]] == [" the", " you"]
    assert all(w["n_repeats"] == 30 for w in on_disk["words"])
    page = (tmp_path / "report.html").read_text()
    assert "<script src=" not in page  # plotly.js is inlined, so the page opens offline
    assert page.count("Plotly.newPlot") >= 4 and "Sink layer" in page


def test_report_resumes_from_checkpoints(tiny, config, tmp_path, monkeypatch):
    run_report(config, tmp_path, model=tiny)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a checkpointed step")

    monkeypatch.setattr(report_module, "find_sink_layer", fail)
    monkeypatch.setattr(report_module, "repetition_curves", fail)
    assert run_report(config, tmp_path, model=tiny)["sink_layer"] == SINK_LAYER
    changed = ReportConfig(**{**config.__dict__, "n_repeats": 31})
    with pytest.raises(AssertionError, match="recomputed"):
        run_report(changed, tmp_path, model=tiny)


def test_report_checks_every_word_before_computing(tiny, config, tmp_path):
    bad = ReportConfig(**{**config.__dict__, "words": ["the", "dust"]})
    with pytest.raises(SinklensError, match="'dust' is"):
        run_report(bad, tmp_path, model=tiny)
    too_long = ReportConfig(**{**config.__dict__, "n_repeats": tiny.cfg.n_ctx})
    with pytest.raises(SinklensError, match="longer than the context"):
        run_report(too_long, tmp_path, model=tiny)
    assert not (tmp_path / "results.json").exists()


def test_cli_report_and_errors(tiny_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["report", "--model", str(tiny_dir), "--out", str(out), "--words", "the", "--n-repeats", "20",
                 "--corpus", str(corpus_file)])
    assert code == 0
    assert json.loads((out / "results.json").read_text())["sink_layer"] == SINK_LAYER
    assert "sink layer 2" in capsys.readouterr().out
    code = main(["report", "--model", str(tmp_path / "missing.gguf"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("sinklens: error:") and "does not exist" in err and "\n" not in err


def test_cli_sink_layer(tiny_dir, capsys):
    assert main(["sink-layer", "--model", str(tiny_dir)]) == 0
    assert "sink layer: 2" in capsys.readouterr().out


def test_report_uses_a_sink_layer_given_by_the_user(tiny, config, tmp_path):
    results = run_report(ReportConfig(**{**config.__dict__, "sink_layer": 4}), tmp_path, model=tiny)
    assert results["sink_layer"] == 4 and results["sink_layer_method"] == "given by the user"
    assert results["sink_layer_detail"]["sink_layer"] == SINK_LAYER  # the detection is still reported
    assert results["norm_baseline"]["layer"] == 4
    with pytest.raises(SinklensError, match="layer 6 is out of range"):
        run_report(ReportConfig(**{**config.__dict__, "sink_layer": 6}), tmp_path, model=tiny)

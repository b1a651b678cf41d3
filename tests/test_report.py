import html
import json

import pytest

from conftest import SINK_LAYER, SINK_NEURON
from sinklens import ReportConfig, SinklensError, run_report
from sinklens.studies import report as report_module

STABLE_KEYS = {
    "model",
    "versions",
    "first_token",
    "sink_layer",
    "typical_norm",
    "first_token_norm",
    "words",
    "sink_neurons",
    "sinks",
}


@pytest.fixture
def config(tiny_dir, long_corpus_file):
    return ReportConfig(
        model=str(tiny_dir),
        words=["the", "you"],
        n_repeats=30,
        corpus=str(long_corpus_file),
        corpus_chars=600,
    )


def test_report_writes_results_and_a_self_contained_page(tiny, config, tmp_path):
    results = run_report(config, tmp_path, model=tiny)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert STABLE_KEYS <= set(on_disk)
    assert on_disk["sink_layer"] == SINK_LAYER and on_disk["sink_found"] is True
    first = on_disk["first_token"]
    assert (first["id"], first["text"]) == (tiny.tokenizer.bos_token_id, "<s>")
    assert first["chosen_by"].startswith("the tokenizer's BOS, which the model makes a sink")
    assert on_disk["first_token_norm"] > on_disk["typical_norm"] > 0
    assert [w["word"] for w in on_disk["words"]] == [" the", " you"]
    assert all(w["n_repeats"] == 30 and "first_crossing" in w for w in on_disk["words"])
    assert on_disk["sink_neurons"]["sink_neurons"] == [[SINK_LAYER, SINK_NEURON]]
    assert on_disk["table_row"]["sink_neurons"] == [SINK_NEURON]
    assert on_disk["ablation"]["neurons"] == [[SINK_LAYER, SINK_NEURON]]
    first_sink = on_disk["sinks"]["sinks"][
        0
    ]  # the census of the natural text counts the first token
    assert (first_sink["position"], first_sink["first_layer"], first_sink["neurons"]) == (
        0,
        SINK_LAYER,
        [[SINK_LAYER, SINK_NEURON]],
    )
    assert any("sink neurons layer 2: 5" in line for line in on_disk["summary"])
    assert any("Llama-2-7B" in line for line in on_disk["summary"])
    # The tiny model's sink neuron reads the first token's embedding: a sink wherever the token
    # stands.
    assert on_disk["circuit"]["first_token_dependence"]["mark_traced"] is False
    assert any(line.startswith("No first-token mark") for line in on_disk["summary"])
    page = (tmp_path / "report.html").read_text()
    assert "<script src=" not in page  # plotly.js is inlined, so the page opens offline
    assert page.count("Plotly.newPlot") >= 9
    for title in (
        "Summary",
        "Table 1, this model beside the paper",
        "Sink neurons",
        "Ablating the sink neurons",
        "How the model marks the first token",
        "Every sink in natural text",
    ):
        assert f"<h2>{title}" in page
    assert page.index("<h2>Summary</h2>") < page.index("<h2>Sink layer</h2>")
    # The findings in a few plain sentences first, then every summary sentence one click away.
    findings, details = page.index('<ul class="findings">'), page.index("<details")
    assert page.index("<h2>Summary</h2>") < findings < details < page.index("<h2>Table 1")
    folded = page[details : page.index("</details>")]
    assert all(f"<li>{html.escape(line)}</li>" in folded for line in on_disk["summary"])
    assert "The sink is the first token, &#x27;&lt;s&gt;&#x27;" in page[findings:details]
    assert page.count('<div class="table-box">') == page.count("<table")  # wide tables scroll


def test_report_resumes_from_checkpoints(tiny, config, tmp_path, monkeypatch):
    run_report(config, tmp_path, model=tiny)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a checkpointed step")

    monkeypatch.setattr("sinklens.studies.table.sink_table_row", fail)
    for name in (
        "ablation_study",
        "attention_received",
        "attention_score_maps",
        "first_layer_circuit",
    ):
        monkeypatch.setattr(report_module, name, fail)
    assert run_report(config, tmp_path, model=tiny)["sink_layer"] == SINK_LAYER
    changed = ReportConfig(**{**config.__dict__, "n_repeats": 31})
    with pytest.raises(AssertionError, match="recomputed"):
        run_report(changed, tmp_path, model=tiny)


def test_report_checks_every_word_before_computing(tiny, config, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "sinklens.studies.table.sink_table_row",
        lambda *a, **k: pytest.fail("computed before checking"),
    )
    bad = ReportConfig(**{**config.__dict__, "words": ["the", "dust"]})
    with pytest.raises(SinklensError, match="'dust' is"):
        run_report(bad, tmp_path, model=tiny)
    too_long = ReportConfig(**{**config.__dict__, "n_repeats": tiny.cfg.n_ctx})
    with pytest.raises(SinklensError, match="longer than the context"):
        run_report(too_long, tmp_path, model=tiny)
    with pytest.raises(SinklensError, match="layer 6 is out of range"):
        run_report(ReportConfig(**{**config.__dict__, "sink_layer": 6}), tmp_path, model=tiny)
    assert not (tmp_path / "results.json").exists()


def test_report_uses_a_sink_layer_given_by_the_user(tiny, config, tmp_path):
    results = run_report(ReportConfig(**{**config.__dict__, "sink_layer": 4}), tmp_path, model=tiny)
    assert results["sink_layer"] == 4 and results["sink_layer_method"] == "given by the user"
    assert (
        results["sink_layer_detail"]["sink_layer"] == SINK_LAYER
    )  # the detection is still reported
    assert results["norm_baseline"]["layer"] == 4


def test_report_notes_a_circuit_it_cannot_compute(tiny, config, corpus_file, tmp_path):
    short = ReportConfig(**{**config.__dict__, "corpus": str(corpus_file), "corpus_chars": 1000})
    results = run_report(short, tmp_path, model=tiny)
    assert "too few to" in results["circuit"]["skipped"]
    assert "Skipped: " in (tmp_path / "report.html").read_text()

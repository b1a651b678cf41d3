"""Every analysis notebook runs top to bottom (on the tiny model, with short runs)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "analyses").glob("*.ipynb"))


def test_there_is_a_notebook_per_figure():
    assert {p.name for p in NOTEBOOKS} >= {"fig1_attention_maps.ipynb", "fig2_norm_curves.ipynb", "fig3_sink_neurons.ipynb",
                                           "fig4_first_detector.ipynb", "fig5_convergence.ipynb", "circuit.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tiny_dir, long_corpus_file, monkeypatch):
    monkeypatch.setenv("SINKLENS_MODEL", str(tiny_dir))
    monkeypatch.setenv("SINKLENS_CORPUS", str(long_corpus_file))
    monkeypatch.setenv("SINKLENS_CORPUS_CHARS", "600")  # the tiny model's context is 256 tokens
    monkeypatch.setenv("SINKLENS_N_REPEATS", "20")
    namespace: dict = {}
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    if "sink" in namespace:  # the tiny model's planted sink is found wherever a notebook looks for it
        assert namespace["sink"].sink_layer == 2
    if "neurons" in namespace:
        assert namespace["neurons"].sink_neurons == [(2, 5)]
    if "result" in namespace:  # the convergence notebook
        assert all(fit["slope"] < 0 for word in namespace["result"].slopes().values() for fit in word.values())

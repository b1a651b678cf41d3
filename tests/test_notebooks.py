"""Every analysis notebook runs top to bottom (on the tiny model, with short runs)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "analyses").glob("*.ipynb"))


def test_there_is_a_notebook_per_figure():
    assert {p.name for p in NOTEBOOKS} >= {"fig1_attention_maps.ipynb", "fig2_norm_curves.ipynb", "fig3_sink_neurons.ipynb",
                                           "fig4_first_detector.ipynb", "fig5_convergence.ipynb", "circuit.ipynb",
                                           "patch.ipynb", "scan_attack.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tiny_dir, long_corpus_file, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a notebook may write files (the patch notebook writes patch.json)
    monkeypatch.setenv("SINKLENS_MODEL", str(tiny_dir))
    monkeypatch.setenv("SINKLENS_CORPUS", str(long_corpus_file))
    monkeypatch.setenv("SINKLENS_CORPUS_CHARS", "600")  # the tiny model's context is 256 tokens
    monkeypatch.setenv("SINKLENS_N_REPEATS", "20")
    monkeypatch.setenv("SINKLENS_BENCHMARK_ITEMS", "0")  # the real benchmark data is for the integration tests
    monkeypatch.setenv("SINKLENS_SCAN_TOKENS", "60")
    monkeypatch.setenv("SINKLENS_ATTACK_LENGTHS", "8,16")
    namespace: dict = {}
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    if "sink" in namespace:  # the tiny model's planted sink is found wherever a notebook looks for it
        assert namespace["sink"].sink_layer == 2
    if "neurons" in namespace:
        assert namespace["neurons"].sink_neurons == [(2, 5)]
    if "patch_choice" in namespace:  # the patch notebook clamps the planted neuron and leaves the first token alone
        assert namespace["patch"].neurons == ((2, 5),)
        assert namespace["patch_choice"].to_frame()["first_token_norm_change"].abs().max() <= 0.01
    if "attack" in namespace:  # the scan notebook: the sample asked for, and every condition measured
        assert namespace["scan"].summary()["n_tokens"] == 60
        assert set(namespace["attack"].rates()["condition"]) == {"cluster", "repeat", "random"}
    if "result" in namespace:  # the convergence notebook
        assert all(fit["slope"] < 0 for word in namespace["result"].slopes().values() for fit in word.values())

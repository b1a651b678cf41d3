"""The nnsight backend gives the bridge's numbers: here, in nnsight's local simulation of a remote run, and
through a loopback stand-in for an NDIF server running in a separate process in which sinklens,
TransformerLens and jaxtyping cannot be imported.

What these tests cannot prove is the real NDIF service: its queueing, GPUs, deployments (which models run
now), its limits on request time and result size, and its websocket (blocking) path, which sinklens does not
use. The stand-in speaks the HTTP protocol of nnsight 0.8.1's non-blocking client as nnsight's own source
defines it; a change on NDIF's side would not show here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import CORPUS, SINK_LAYER, SINK_NEURON, save_arch, save_tiny
from ndif_standin import launch
from sinklens import load_model
from sinklens.errors import SinklensError
from sinklens.run.activation_patching import activation_gradients
from sinklens.run.cache import forward, run_cache, shared_prefix
from sinklens.run.interventions import ablation_hooks
from sinklens.run.sink_patch import patch_for
from sinklens.run.tokens import text_tokens
from sinklens.studies.census import find_sinks
from sinklens.studies.table import sink_table_row

pytest.importorskip("nnsight")

FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "gpt2")
KEY = "test-key"
WHERE = {
    "backend",
    "device",
    "dtype",
}  # where a model ran: the only fields the backends may differ in


def assert_close(expected, found, path: str = "", rel: float = 1e-4) -> None:
    """``found`` equals ``expected`` field by field: floats within ``rel`` (relative), the rest exactly."""
    if isinstance(expected, dict):
        assert set(expected) == set(found), f"{path}: {set(expected) ^ set(found)}"
        for key in expected:
            assert_close(expected[key], found[key], f"{path}.{key}", rel)
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(found), path
        for i, (a, b) in enumerate(zip(expected, found)):
            assert_close(a, b, f"{path}[{i}]", rel)
    elif isinstance(expected, float) and isinstance(found, float):
        assert abs(expected - found) <= rel * max(abs(expected), abs(found), 1e-9), (
            path,
            expected,
            found,
        )
    else:
        assert expected == found, (path, expected, found)


def _summary(result) -> dict:
    summary = copy.deepcopy(result.summary())
    summary["setup"]["settings"].pop("backend")
    return {key: value for key, value in summary.items() if key not in WHERE}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    return {f: save_arch(tmp_path_factory.mktemp(f), f, 3) for f in FAMILIES}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The tiny Llama with a planted sink (neuron SINK_NEURON of layer SINK_LAYER), as a directory."""
    return save_tiny(tmp_path_factory.mktemp("planted"))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hook_an_analysis_reads_matches_the_bridge(arch_dirs, family):
    bridge = load_model(str(arch_dirs[family]), device="cpu")
    traced = load_model(str(arch_dirs[family]), device="cpu", backend="nnsight")
    names = [
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_pattern",
        "blocks.0.mlp.hook_pre",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_resid_post",
    ]
    if family == "gemma3":  # a norm after the MLP: hook_mlp_out reads after it, as on the bridge
        names += ["blocks.1.ln2_post.hook_in", "blocks.1.ln2_post.hook_out"]
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 9, 8, 7, 6, 5, 4, 3, 2, 1]])
    ablate = ablation_hooks(bridge, [[(0, 3), (1, 5)], [(1, 7)]])
    for interventions in ([], ablate):
        expected = run_cache(bridge, tokens, names, interventions=interventions)
        found = run_cache(traced, tokens, names, interventions=interventions)
        for name in names:
            assert found[name].dtype == torch.float32
            torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-5)
    # the ablation changes the neurons it names, and nothing before them
    plain = run_cache(traced, tokens, names)
    edited = run_cache(traced, tokens, names, interventions=ablate)
    assert torch.equal(edited["blocks.1.mlp.hook_post"][0, :, 5], torch.zeros(10))
    assert not torch.equal(plain["blocks.1.mlp.hook_post"][0, :, 5], torch.zeros(10))
    torch.testing.assert_close(edited["blocks.0.hook_resid_pre"], plain["blocks.0.hook_resid_pre"])
    torch.testing.assert_close(bridge.blocks[1].mlp.W_out, traced.blocks[1].mlp.W_out)
    assert hasattr(traced.blocks[1], "ln2_post") == hasattr(bridge.blocks[1], "ln2_post")
    assert traced.cfg.d_mlp == bridge.cfg.d_mlp and traced.cfg.n_layers == bridge.cfg.n_layers


def test_a_shared_prefix_gives_the_full_runs_numbers(arch_dirs):
    traced = load_model(str(arch_dirs["llama"]), device="cpu", backend="nnsight")
    bridge = load_model(str(arch_dirs["llama"]), device="cpu")
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9]])
    names = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
    prefix = shared_prefix(traced, tokens[:, :4], names)
    rows = tokens[:, 4:].expand(3, -1)
    found = run_cache(
        traced,
        rows,
        names,
        prefix=prefix,
        interventions=ablation_hooks(traced, [[], [(0, 1)], [(1, 2)]]),
    )
    expected = run_cache(
        bridge,
        rows,
        names,
        prefix=shared_prefix(bridge, tokens[:, :4], names),
        interventions=ablation_hooks(bridge, [[], [(0, 1)], [(1, 2)]]),
    )
    assert found[names[0]].shape == (
        3,
        2,
        32,
    )  # only the positions after the prefix, as on the bridge
    for name in names:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def bridge_row(planted):
    return sink_table_row(load_model(str(planted), device="cpu"), CORPUS, n_repeats=60)


@pytest.mark.parametrize("remote", [False, "local"], ids=["here", "local-simulation"])
def test_the_table_row_and_census_equal_the_bridges(planted, bridge_row, remote):
    traced = load_model(str(planted), device="cpu", backend="nnsight", remote=remote)
    row = sink_table_row(traced, CORPUS, n_repeats=60)
    assert row.setup.sink_neurons == [(SINK_LAYER, SINK_NEURON)]
    assert_close(_summary(bridge_row), _summary(row))
    assert row.placement["backend"].startswith("nnsight")
    assert traced.requests == 0 if remote is False else traced.requests > 10
    tokens = text_tokens(traced, CORPUS[:300], first=row.choice.token.id)
    bridge = load_model(str(planted), device="cpu")
    census = find_sinks(traced, tokens, corpus_chars=300)
    expected = find_sinks(bridge, tokens, corpus_chars=300)
    assert census.sinks and census.sinks[0].neurons == ((SINK_LAYER, SINK_NEURON),)
    assert_close(_summary(expected), _summary(census))


def test_what_a_traced_model_cannot_do_is_refused_in_one_line(arch_dirs):
    traced = load_model(str(arch_dirs["llama"]), device="cpu", backend="nnsight")
    with pytest.raises(SinklensError, match="nnsight backend does not give") as refused:
        traced.generate(torch.tensor([[1, 2]]))
    assert "\n" not in str(refused.value) and "TransformerLens backend" in str(refused.value)
    assert getattr(traced, "hf_device_map", None) is None  # probing with a default still answers
    with pytest.raises(SinklensError, match="does not edit them"):
        run_cache(
            traced,
            torch.tensor([[1, 2]]),
            ["blocks.1.hook_resid_post"],
            interventions=[("blocks.0.attn.hook_pattern", lambda x, hook: x)],
        )
    with pytest.raises(SinklensError, match="has no hook 'blocks.0.attn.hook_attn_scores'"):
        run_cache(traced, torch.tensor([[1, 2]]), ["blocks.0.attn.hook_attn_scores"])
    with pytest.raises(
        SinklensError, match="cannot be installed on .* the server's model is shared"
    ):
        patch_for(traced, [(1, 3)]).install(traced)
    with pytest.raises(SinklensError, match="the nnsight backend runs without them"):
        activation_gradients(
            traced, torch.tensor([[1, 2]]), ["blocks.0.hook_resid_post"], lambda a: 0
        )
    simulated = load_model(str(arch_dirs["llama"]), device="cpu", backend="nnsight", remote="local")
    with pytest.raises(SinklensError, match="never comes back"):
        forward(simulated, torch.tensor([[1, 2]]), [], hooks=[("blocks.0.hook_resid_post", print)])
    with pytest.raises(SinklensError, match="add backend='nnsight'"):
        load_model(str(arch_dirs["llama"]), remote=True)
    with pytest.raises(
        SinklensError, match="drop --dtype, --device and --max-memory with --remote"
    ):
        load_model(str(arch_dirs["llama"]), backend="nnsight", remote=True, dtype="bfloat16")


# The loopback stand-in for NDIF.


@pytest.fixture(scope="module")
def standin(planted):
    server, host = launch([planted], KEY, planted.parent / "standin-port")
    yield host
    server.kill()
    server.wait()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    monkeypatch.delenv("NDIF_HOST", raising=False)


def test_the_standin_cannot_import_sinklens_transformerlens_or_jaxtyping(standin):
    import httpx

    packages = httpx.get(f"{standin}/env").json()["packages"]
    assert {"torch", "transformers", "nnsight"} <= set(packages)
    assert not {"sinklens", "transformer_lens", "jaxtyping"} & set(packages)


def test_a_remote_table_row_and_census_equal_the_bridges(planted, bridge_row, standin, key, caplog):
    caplog.set_level(logging.DEBUG, logger="sinklens")
    remote = load_model(str(planted), backend="nnsight", remote=True, host=standin)
    assert remote.original_model.device.type == "meta"  # the weights stay on the server
    row = sink_table_row(remote, CORPUS, n_repeats=60)
    assert_close(_summary(bridge_row), _summary(row))
    assert row.placement == {"backend": "nnsight", "dtype": "float32 (declared)", "device": standin}
    assert remote.requests > 10 and "COMPLETED" in caplog.text
    tokens = text_tokens(remote, CORPUS[:300], first=row.choice.token.id)
    bridge = load_model(str(planted), device="cpu")
    assert_close(
        _summary(find_sinks(bridge, tokens, corpus_chars=300)),
        _summary(find_sinks(remote, tokens, corpus_chars=300)),
    )


def test_a_wrong_key_and_a_model_not_served_are_one_line(planted, arch_dirs, standin, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "not-the-key")
    remote = load_model(str(planted), backend="nnsight", remote=True, host=standin)
    with pytest.raises(SinklensError, match="refused the NDIF API key") as refused:
        run_cache(remote, torch.tensor([[1, 2]]), ["blocks.0.hook_resid_post"])
    assert "\n" not in str(refused.value)
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    unserved = load_model(str(arch_dirs["llama"]), backend="nnsight", remote=True, host=standin)
    with pytest.raises(SinklensError, match="failed on .*is not deployed") as failed:
        run_cache(unserved, torch.tensor([[1, 2]]), ["blocks.0.hook_resid_post"])
    assert "\n" not in str(failed.value) and "nnsight.ndif_status()" in str(failed.value)


class _Stuck(BaseHTTPRequestHandler):
    """A host that takes every job and never finishes one."""

    def log_message(self, format, *args):
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._reply({"id": "stuck", "status": "RECEIVED"})

    def do_GET(self):
        self._reply({"id": "stuck", "status": "QUEUED"})


def test_a_job_that_outlives_its_timeout_is_one_line(planted, key, caplog):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stuck)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        remote = load_model(
            str(planted), backend="nnsight", remote=True, host=host, remote_timeout=0.5
        )
        with (
            caplog.at_level(logging.INFO, logger="sinklens"),
            pytest.raises(SinklensError, match="did not finish in 0 s"),
        ):
            run_cache(remote, torch.tensor([[1, 2]]), ["blocks.0.hook_resid_post"])
        assert "QUEUED" in caplog.text  # a job waiting in a queue says so
    finally:
        server.shutdown()


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sinklens", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_the_command_line_refuses_a_missing_key_and_a_silent_host(planted):
    env = {k: v for k, v in os.environ.items() if k not in ("NDIF_API_KEY", "NDIF_HOST")}
    env["NNSIGHT_CONFIG"] = str(
        planted / "no-such-config.yaml"
    )  # no key saved in nnsight's config either
    base = (
        "table",
        "--model",
        str(planted),
        "--n-repeats",
        "60",
        "--backend",
        "nnsight",
        "--remote",
    )
    no_key = _cli(*base, env=env)
    assert no_key.returncode == 2
    assert no_key.stderr.strip().splitlines()[-1].startswith("sinklens: error: no NDIF API key")
    silent = _cli(*base, "--host", "http://127.0.0.1:9", env={**env, "NDIF_API_KEY": KEY})
    assert silent.returncode == 2, silent.stderr
    last = silent.stderr.strip().splitlines()[-1]
    assert last.startswith("sinklens: error: the NDIF host http://127.0.0.1:9 did not answer")


def _where_it_ran(summary: dict) -> dict:
    summary = copy.deepcopy(summary)
    summary["setup"]["settings"].pop("backend")
    return {k: v for k, v in summary.items() if k not in WHERE | {"layers_loaded"}}


def test_the_default_models_table_and_sinks_commands_on_nnsight_equal_the_bridges(smollm2):
    """``sinklens table --backend nnsight --json`` and ``sinklens sinks --backend nnsight --json`` on SmolLM2 give
    the bridge's sink layer, neurons and census, and its norms and attention shares within 1e-4."""
    from sinklens.settings import Settings
    from sinklens.studies.census import census_of

    env = dict(os.environ)
    table = _cli("table", "--backend", "nnsight", "--json", env=env)
    assert table.returncode == 0, table.stderr
    found = json.loads(table.stdout)
    settings = Settings()
    row = sink_table_row(smollm2, settings.corpus_text(), settings)
    assert found["sink_layer"] == 11 and found["sink_neurons"] == [
        1229,
        1487,
    ]  # docs/results.md's row
    assert found["backend"] == "nnsight"
    assert_close(_where_it_ran(row.summary()), _where_it_ran(found))
    sinks = _cli("sinks", "--backend", "nnsight", "--json", env=env)
    assert sinks.returncode == 0, sinks.stderr
    census = census_of(settings, model=smollm2)
    assert_close(_where_it_ran(census.summary()), _where_it_ran(json.loads(sinks.stdout)))


def test_without_nnsight_installed_the_backend_is_one_line(arch_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "nnsight", None)  # as if it were not installed
    with pytest.raises(SinklensError, match=r"pip install 'sinklens\[nnsight\]'"):
        load_model(str(arch_dirs["llama"]), device="cpu", backend="nnsight")


def test_a_remote_model_whose_config_cannot_be_read_is_one_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NDIF_API_KEY": KEY}
    offline = _cli(
        "sink-layer", "--model", "no-org/no-such-model", "--backend", "nnsight", "--remote", env=env
    )
    assert offline.returncode == 2
    last = offline.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "sinklens: error: could not read the config and tokenizer of no-org/no-such-model"
    )
    alias = _cli(
        "sink-layer", "--backend", "nnsight", "--remote", env=env
    )  # the default model, an alias
    assert alias.returncode == 2
    assert "of HuggingFaceTB/SmolLM2-135M-Instruct" in alias.stderr.strip().splitlines()[-1]

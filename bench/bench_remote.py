"""Benchmark: what a remote (NDIF) Table-1 row and sink census cost, measured against a loopback stand-in.

The default model's row (``sink_table_row``, what ``sinklens table`` runs) and census (``find_sinks``, what
``sinklens sinks`` runs) are measured three ways in one process, side by side:

* **bridge**: the TransformerBridge here (``--backend transformer_lens``, the default);
* **nnsight**: the nnsight backend here (``--backend nnsight``);
* **remote**: the nnsight backend with ``--remote``, against ``tests/ndif_standin.py`` in a separate process
  (sinklens, TransformerLens and jaxtyping unimportable there), which runs each request on its own copy
  of the model on this machine, as NDIF runs it on its GPUs. It serves the directory the default model's
  GGUF converts to, as a self-hosted server serves a directory it shares (NDIF itself serves hub names).

It prints, per study and way: the wall time, the time over the bridge's, and for the remote way the requests
made, the bytes sent and received (requests of the row and of the census). All three must give the same sink layer, sink
neurons and census, and the first-token norm and attention shares within 1e-4: the last line is one JSON
object with everything.

What this cannot measure: NDIF's queue and its GPUs. A request to NDIF also waits for a free worker, and a
7B model's forward pass on its GPU takes milliseconds where this stand-in's CPU takes a second; the requests
and bytes are what they would be there.

Usage: ``python bench/bench_remote.py [--n-repeats N]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-repeats", type=int, default=1000)
    args = parser.parse_args()

    from sinklens import load_model
    from sinklens.load.corpus import shakespeare
    from sinklens.load.models import alias_weights
    from sinklens.load.registry import DEFAULT_MODEL
    from sinklens.run.tokens import text_tokens
    from sinklens.settings import PAPER_CORPUS_CHARS
    from sinklens.studies.census import find_sinks
    from sinklens.studies.table import sink_table_row

    text = shakespeare()[:PAPER_CORPUS_CHARS]
    os.environ["NDIF_API_KEY"] = "bench"
    sys.path.insert(0, str(ROOT / "tests"))
    from ndif_standin import launch

    server, host = launch(
        [alias_weights(DEFAULT_MODEL)], "bench", Path(tempfile.mkdtemp()) / "port"
    )
    try:
        ways = {
            "bridge": load_model(DEFAULT_MODEL, device="cpu"),
            "nnsight": load_model(DEFAULT_MODEL, device="cpu", backend="nnsight"),
            "remote": load_model(
                str(alias_weights(DEFAULT_MODEL)), backend="nnsight", remote=True, host=host
            ),
        }
        results: dict = {}
        for way, model in ways.items():
            start = time.perf_counter()
            row = sink_table_row(model, text, n_repeats=args.n_repeats)
            row_time = time.perf_counter() - start
            sent, requests = getattr(model, "bytes_sent", 0), getattr(model, "requests", 0)
            tokens = text_tokens(model, text, first=row.choice.token.id)
            start = time.perf_counter()
            census = find_sinks(model, tokens, setup=row.setup)
            census_time = time.perf_counter() - start
            results[way] = {
                "row_s": round(row_time, 1),
                "census_s": round(census_time, 1),
                "sink_layer": row.setup.sink_layer,
                "sink_neurons": row.setup.sink_neurons,
                "first_token_norm": row.summary()["first_token_norm"],
                "census": [(s.position, s.first_layer, s.neurons) for s in census.sinks],
                "attention_shares": [s.attention_share for s in census.sinks],
            }
            if way == "remote":
                results[way] |= {
                    "row_requests": requests,
                    "census_requests": model.requests - requests,
                    "row_mb_sent": round(sent / 1e6, 2),
                    "mb_sent": round(model.bytes_sent / 1e6, 2),
                    "mb_received": round(model.bytes_received / 1e6, 2),
                }
            print(way, results[way], flush=True)
    finally:
        server.kill()
    bridge = results["bridge"]
    for way in ("nnsight", "remote"):
        found = results[way]
        assert found["sink_layer"] == bridge["sink_layer"], way
        assert found["sink_neurons"] == bridge["sink_neurons"], way
        assert found["census"] == bridge["census"], way
        for a, b in zip(
            [bridge["first_token_norm"], *bridge["attention_shares"]],
            [found["first_token_norm"], *found["attention_shares"]],
        ):
            assert a is None and b is None or abs(a - b) <= 1e-4 * abs(a), (way, a, b)
        found["row_over_bridge"] = round(found["row_s"] / bridge["row_s"], 2)
        found["census_over_bridge"] = round(found["census_s"] / bridge["census_s"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

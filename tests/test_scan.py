"""The vocabulary scan and the cluster attack on a tiny model with planted sink-opening tokens.

Three byte tokens that never occur in the test corpus get the first token's marker on residual
dimension 0, so the sink neuron fires on them wherever they stand: the scan must find exactly them,
from their first repeat; mixed without repetition they keep the sink open, and a calibrated clamp
of the sink neuron closes it."""

import dataclasses
import json

import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

from conftest import CORPUS, SINK_LAYER, SINK_NEURON, save_tiny
from sinklens.cli import main
from sinklens.errors import SinklensError
from sinklens.load.models import load_model
from sinklens.run.sink_patch import patch_for
from sinklens.studies import scan as scan_module
from sinklens.studies import scan_store as scan_store_module
from sinklens.studies.attack import cluster_attack, key_clusters, sample_sequences
from sinklens.studies.scan import run_scan, scan_setup, scan_tokens, select_tokens
from sinklens.studies.scan_store import ScanSetup, Screen, prepare_scan_dir, screen_score
from sinklens.studies.vocab_scan import merge_scan

PLANTED = ("Z", "Q", "X")
N_REPEATS = 24


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny(tmp_path_factory.mktemp("tiny-planted"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in PLANTED]
    assert not set(ids) & set(tokenizer(CORPUS * 4).input_ids)  # never in natural text
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[ids, 0] = 1.0  # the marker the sink neuron reads
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def planted(planted_dir):
    model = load_model(str(planted_dir), device="cpu")
    model.planted_ids = sorted(model.tokenizer.convert_tokens_to_ids(t) for t in PLANTED)
    return model


@pytest.fixture(scope="module")
def setup(planted, long_corpus_file):
    return scan_setup(planted, long_corpus_file.read_text(), n_repeats=N_REPEATS)


@pytest.fixture(scope="module")
def tokens(planted):
    return select_tokens(planted)


@pytest.fixture(scope="module")
def whole(planted, setup, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan-whole")
    assert run_scan(planted, setup, tokens, out, batch_size=32) == (0, len(tokens))
    return merge_scan(out, tokens)


def test_the_setup_finds_the_sink_and_the_scan_finds_the_planted_tokens(
    planted, setup, whole, tokens
):
    assert setup.sink_neurons == ((SINK_LAYER, SINK_NEURON),) and setup.layer == SINK_LAYER
    frame = whole.to_frame()
    assert len(frame) == len(tokens) and frame["token_id"].is_unique
    assert sorted(frame.loc[frame["reached_sink"], "token_id"]) == planted.planted_ids
    planted_rows = frame[frame["token_id"].isin(planted.planted_ids)]
    assert (planted_rows["repeats_to_sink"] == 1).all() and (
        planted_rows["sink_neuron_ratio"] > 0.5
    ).all()
    assert (
        frame.loc[~frame["reached_sink"], "peak_ratio"].max()
        < planted_rows["peak_ratio"].min() / 10
    )
    summary = whole.summary()
    assert (summary["n_tokens"], summary["n_reached_sink"]) == (len(tokens), 3)
    assert summary["ci_low"] < 3 / len(tokens) < summary["ci_high"]
    assert {t["token_id"] for t in summary["top_tokens"][:3]} == set(planted.planted_ids)
    for correlation in summary["correlations"]:
        assert correlation["n"] == len(tokens)
        assert (
            correlation["ci_low"]
            <= correlation["spearman_with_peak_ratio"]
            <= correlation["ci_high"]
        )
    json.dumps(summary)
    assert whole.plot().data


def _interrupt_on_batch(monkeypatch, number: int):
    """Make the scan stop with Ctrl-C when it starts batch ``number`` (1-based); returns the real function."""
    real = scan_module.scan_rows
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(scan_module, "scan_rows", interrupted)
    return real


def test_a_killed_scan_resumes_with_no_row_lost_or_doubled(
    planted, setup, tokens, whole, tmp_path, monkeypatch
):
    real = _interrupt_on_batch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_scan(planted, setup, tokens, tmp_path, batch_size=32)
    rows_file = tmp_path / "rows-1-of-1.jsonl"
    with rows_file.open(
        "a"
    ) as f:  # a kill in the middle of a write: a whole row, but its newline never written
        f.write(json.dumps(whole.rows[-1]))
    monkeypatch.setattr(scan_module, "scan_rows", real)
    assert run_scan(planted, setup, tokens, tmp_path, batch_size=32).full == len(tokens) - 64
    resumed = merge_scan(tmp_path, tokens).to_frame()
    assert len(rows_file.read_text().splitlines()) == len(tokens)
    assert resumed.equals(whole.to_frame())


def test_shards_merge_to_the_same_table_as_one_run(planted, setup, tokens, whole, tmp_path):
    for index in (3, 1, 2):
        run_scan(planted, setup, tokens, tmp_path, shard=(index, 3), batch_size=32)
    assert sorted(p.name for p in tmp_path.glob("rows-*")) == [
        f"rows-{i}-of-3.jsonl" for i in (1, 2, 3)
    ]
    # other batches, so the floats may differ in the last bits; every decision and count is the same
    assert_frame_equal(
        merge_scan(tmp_path, tokens).to_frame(), whole.to_frame(), check_exact=False, rtol=1e-5
    )
    assert run_scan(planted, setup, tokens, tmp_path) == (
        0,
        0,
    )  # a plain run over the directory finds nothing missing
    assert (tmp_path / "scan.parquet").is_file()


def test_a_scan_directory_refuses_other_settings(setup, tmp_path):
    prepare_scan_dir(tmp_path, setup, None, [5, 6])
    other = ScanSetup.from_json({**setup.to_json(), "n_repeats": setup.n_repeats + 1})
    with pytest.raises(SinklensError, match="other settings \\(n_repeats differ\\)"):
        prepare_scan_dir(tmp_path, other, None, [5, 6])


def test_the_default_sample_is_stratified_by_token_id_and_seeded(planted, tokens):
    sample = select_tokens(planted, 40, seed=1)
    assert (
        len(sample) == 40
        and set(sample) <= set(tokens)
        and sample == select_tokens(planted, 40, seed=1)
    )
    assert sample != select_tokens(planted, 40, seed=2)
    strata = torch.tensor_split(torch.tensor(tokens), 10)
    assert all(sum(int(t) in set(s.tolist()) for t in sample) == 4 for s in strata)
    assert not set(planted.tokenizer.all_special_ids) & set(tokens)


def test_sequences_never_repeat_a_token_back_to_back():
    sequences = sample_sequences([1, 2, 3], 50, 40, seed=0)
    assert sequences.shape == (50, 40) and (sequences[:, 1:] != sequences[:, :-1]).all()
    assert set(sequences.unique().tolist()) == {1, 2, 3}


def test_the_attack_opens_the_sink_without_repetition_and_a_calibrated_clamp_closes_it(
    planted, setup, whole
):
    patch = patch_for(
        planted, [(SINK_LAYER, SINK_NEURON)], hook="post", value="calibrated", values=[0.0]
    )
    result = cluster_attack(
        planted,
        setup,
        whole,
        clustering="sink_tokens",
        lengths=(6, 12),
        n_sequences=10,
        patch=patch,
    )
    assert sorted(result.cluster) == planted.planted_ids and result.cluster_sink_share == 1.0
    rates = result.rates().set_index(["condition", "length"])["success_rate"]
    assert (rates["cluster"] == 1.0).all() and (rates["repeat"] == 1.0).all()
    assert (rates["cluster_patched"] == 0.0).all()
    assert (rates["random"] < 1.0).all()
    summary = result.summary()
    for condition in ("cluster", "repeat", "random", "cluster_patched"):
        assert (
            set(summary[condition]) >= {"n", "success_rate", "ci_low", "ci_high"}
            and summary[condition]["n"] == 10
        )
    assert "success:" in summary["definition"]


def test_key_clusters_partition_the_scanned_tokens(planted, whole):
    clusters = key_clusters(planted, whole, n_clusters=8)
    assert len(clusters) == 8 and sorted(t for c in clusters for t in c) == sorted(
        r["token_id"] for r in whole.rows
    )


def test_scan_and_attack_commands(planted_dir, long_corpus_file, tmp_path, capsys):
    study = [
        "--model",
        str(planted_dir),
        "--corpus",
        str(long_corpus_file),
        "--n-repeats",
        str(N_REPEATS),
    ]
    out = tmp_path / "scan"
    assert (
        main(
            [
                "scan",
                *study,
                "--out",
                str(out),
                "--tokens",
                "60",
                "--shard",
                "2/2",
                "--exhaustive",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["rows_written"] == 30
    assert (
        main(["scan", *study, "--out", str(out), "--tokens", "60", "--exhaustive", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_tokens"] == 60 and {
        "n_reached_sink",
        "share_reached_sink",
        "ci_low",
        "ci_high",
    } <= set(summary)
    assert (out / "scan.parquet").is_file() and (out / "scan.html").is_file()
    assert (
        main(
            [
                "attack",
                *study,
                "--scan",
                str(out),
                "--clustering",
                "keys",
                "--lengths",
                "8",
                "--sequences",
                "4",
                "--json",
            ]
        )
        == 0
    )
    attack = json.loads(capsys.readouterr().out)
    assert {"cluster", "repeat", "random", "definition"} <= set(attack) and attack["cluster"][
        "n"
    ] == 4


@pytest.mark.parametrize(
    "command, bad, message",
    [
        ("scan", ["--shard", "0/2"], "the index must be in 1..2"),
        ("scan", ["--shard", "3/2"], "the index must be in 1..2"),
        ("scan", ["--shard", "x"], "not a shard like 1/4"),
        ("scan", ["--screen-threshold", "1.5"], "not a number in 0..1"),
        ("scan", ["--calibration", "-1"], "is not a count (it is negative)"),
        ("scan", ["--tokens", "0"], "not a positive number"),
        ("scan", ["--token-ids", "5,x"], "not a list of token ids"),
        ("scan", ["--token-ids", "@no-such-file"], "cannot read no-such-file"),
        ("attack", ["--lengths", "1"], "at least 2"),
        ("attack", ["--clustering", "vibes"], "invalid choice"),
        ("attack", ["--patch", "missing.json"], "does not exist"),
        ("attack", ["--scan", "no-such-scan"], "holds no scan"),
    ],
)
def test_scan_and_attack_bad_input_is_one_line(
    command, bad, message, planted_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    assert main([command, "--model", str(planted_dir), *bad]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sinklens: error:") and message in err[0], err


def test_an_in_memory_scan_equals_the_file_scan(planted, setup, whole):
    some = [r["token_id"] for r in whole.rows[:20]]
    in_memory = scan_tokens(planted, setup, some, batch_size=7).to_frame()
    assert_frame_equal(in_memory, whole.to_frame().head(20), check_exact=False, rtol=1e-5)


def test_ctrl_c_is_one_line_and_the_rerun_resumes(
    planted_dir, long_corpus_file, tmp_path, capsys, monkeypatch
):
    real = _interrupt_on_batch(monkeypatch, 2)
    args = [
        "scan",
        "--model",
        str(planted_dir),
        "--corpus",
        str(long_corpus_file),
        "--n-repeats",
        str(N_REPEATS),
        "--out",
        str(tmp_path),
        "--tokens",
        "40",
        "--batch-size",
        "10",
        "--json",
    ]
    assert main(args) == 130
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("sinklens:")]
    assert len(messages) == 1 and "interrupted" in messages[0] and "resumes" in messages[0], err
    assert (
        err.rstrip().endswith(messages[0]) and "screen shard 1/1" in err
    )  # progress on stderr, even with --json
    monkeypatch.setattr(scan_module, "scan_rows", real)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["n_tokens"] == 40
    assert len((tmp_path / "screen-1-of-1.jsonl").read_text().splitlines()) == 40


@pytest.mark.parametrize(
    "ids, message", [("5,999999", "outside the vocabulary"), (",", "the token subset is empty")]
)
def test_a_bad_token_subset_fails_before_the_first_forward_pass(
    ids, message, planted_dir, long_corpus_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        scan_module, "scan_setup", lambda *a, **k: pytest.fail("measured before checking")
    )
    assert (
        main(
            [
                "scan",
                "--model",
                str(planted_dir),
                "--corpus",
                str(long_corpus_file),
                "--out",
                str(tmp_path),
                "--n-repeats",
                "20",
                "--token-ids",
                ids,
            ]
        )
        == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_a_token_subset_is_scanned_as_given(
    planted, planted_dir, long_corpus_file, tmp_path, capsys
):
    ids = planted.planted_ids + [t for t in (300, 301) if t not in planted.planted_ids]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)))
    assert (
        main(
            [
                "scan",
                "--model",
                str(planted_dir),
                "--corpus",
                str(long_corpus_file),
                "--n-repeats",
                str(N_REPEATS),
                "--out",
                str(tmp_path / "out"),
                "--token-ids",
                f"@{tmp_path / 'ids.txt'}",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_tokens"], summary["n_reached_sink"]) == (len(ids), 3)


def _screen_for(planted, setup, *, missed: int, calibration: int) -> Screen:
    """A screen whose threshold lets exactly ``missed`` planted tokens through as negatives."""
    short = scan_tokens(planted, dataclasses.replace(setup, n_repeats=4), planted.planted_ids).rows
    scores = sorted(screen_score(row, setup) for row in short)
    assert scores[0] > 0.9  # the planted tokens head for the sink from their first repeats
    threshold = (scores[missed - 1] + scores[missed]) / 2 if missed else 0.5
    return Screen(n_repeats=4, threshold=threshold, calibration=calibration, seed=3)


def test_a_screened_scan_runs_in_full_only_the_positives_and_the_calibration(
    planted, setup, tokens, whole, tmp_path
):
    screen = _screen_for(planted, setup, missed=0, calibration=20)
    written = run_scan(planted, setup, tokens, tmp_path, screen=screen, batch_size=32)
    scan = merge_scan(tmp_path, tokens)
    frame = scan.to_frame()
    assert written.screened == len(frame) == len(tokens) and frame["token_id"].is_unique
    positives = set(frame.loc[frame["screen_positive"], "token_id"])
    calibration = set(frame.loc[frame["calibration"], "token_id"])
    assert positives == set(planted.planted_ids) and len(calibration) == 20
    run_in_full = {
        json.loads(line)["token_id"]
        for line in (tmp_path / "rows-1-of-1.jsonl").read_text().splitlines()
    }
    assert set(frame.loc[frame["verified"], "token_id"]) == positives | calibration == run_in_full
    assert written.full == len(positives | calibration)
    assert sorted(frame.loc[frame["reached_sink"], "token_id"]) == planted.planted_ids
    exhaustive = whole.to_frame().set_index("token_id")
    verified = frame[frame["verified"]].set_index("token_id")
    for column in ("peak_ratio", "final_ratio", "sink_neuron_ratio", "first_detector_score"):
        assert verified[column].to_numpy() == pytest.approx(
            exhaustive.loc[verified.index, column].to_numpy(), rel=1e-5
        )
    summary = scan.summary()
    assert summary["n_reached_sink"] == 3 and summary["missing"] == 0
    assert summary["share_reached_sink"] == pytest.approx(3 / len(tokens)) and summary[
        "ci_low"
    ] == pytest.approx(3 / len(tokens))
    assert summary["ci_high"] > summary["share_reached_sink"] and summary["screen_recall"] == 1.0
    assert summary["screen_recall_ci_low"] < 1.0 and summary["screen"][
        "n_calibration_negatives_run"
    ] == len(calibration - positives)
    assert all(c["n"] == 20 for c in summary["correlations"])  # over the uniform sample only
    json.dumps(summary)
    parquet = pd.read_parquet(tmp_path / "scan.parquet")
    assert {"token_id", "verified", "reached_sink"} <= set(parquet) and len(parquet) == len(tokens)


def test_the_screen_recall_counts_what_the_screen_missed(planted, setup, tokens, tmp_path):
    screen = _screen_for(
        planted, setup, missed=1, calibration=len(tokens)
    )  # every negative is checked
    run_scan(planted, setup, tokens, tmp_path, screen=screen, batch_size=32)
    summary = merge_scan(tmp_path, tokens).summary()
    assert (
        summary["screen"]["n_screen_positive"] == 2
        and summary["screen"]["n_missed_in_calibration"] == 1
    )
    assert summary["screen_recall"] == pytest.approx(2 / 3) and summary[
        "share_reached_sink"
    ] == pytest.approx(3 / len(tokens))
    assert summary["screen_recall_ci_low"] <= 2 / 3 <= summary["screen_recall_ci_high"]


def test_with_no_calibration_negative_the_share_is_unknown_within_its_bounds(
    planted, setup, tokens, tmp_path
):
    run_scan(
        planted,
        setup,
        tokens,
        tmp_path,
        screen=Screen(n_repeats=4, threshold=0.5, calibration=0),
        batch_size=32,
    )
    summary = merge_scan(tmp_path, tokens).summary()
    assert summary["share_reached_sink"] is None and summary["screen_recall"] is None
    assert summary["ci_low"] == pytest.approx(3 / len(tokens)) and summary[
        "ci_high"
    ] == pytest.approx(1.0)
    json.dumps(summary, allow_nan=False)


def test_screened_shards_merge_to_the_same_table_and_resume(
    planted, setup, tokens, tmp_path, monkeypatch
):
    screen = _screen_for(planted, setup, missed=0, calibration=15)
    one = tmp_path / "one"
    run_scan(planted, setup, tokens, one, screen=screen, batch_size=32)
    sharded = tmp_path / "sharded"
    real = _interrupt_on_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_scan(planted, setup, tokens, sharded, shard=(2, 2), screen=screen, batch_size=32)
    monkeypatch.setattr(scan_module, "scan_rows", real)
    for index in (2, 1):
        run_scan(planted, setup, tokens, sharded, shard=(index, 2), screen=screen, batch_size=32)
    assert run_scan(planted, setup, tokens, sharded, screen=screen) == (0, 0)
    columns = ["token_id", "verified", "calibration", "screen_positive", "reached_sink"]
    assert (
        merge_scan(sharded, tokens)
        .to_frame()[columns]
        .equals(merge_scan(one, tokens).to_frame()[columns])
    )


def test_a_directory_holds_one_kind_of_scan(planted, setup, tokens, tmp_path):
    screen = Screen(n_repeats=4, threshold=0.5, calibration=5)
    run_scan(planted, setup, tokens[:8], tmp_path / "exhaustive", batch_size=8)
    with pytest.raises(SinklensError, match="holds an exhaustive scan.*pass --exhaustive"):
        run_scan(planted, setup, tokens[:8], tmp_path / "exhaustive", screen=screen)
    run_scan(planted, setup, tokens[:8], tmp_path / "screened", screen=screen, batch_size=8)
    with pytest.raises(SinklensError, match="holds a screened scan.*drop --exhaustive"):
        run_scan(planted, setup, tokens[:8], tmp_path / "screened")
    with pytest.raises(SinklensError, match=r"another screen \(threshold differ\)"):
        run_scan(
            planted, setup, tokens[:8], tmp_path / "screened", screen=screen._replace(threshold=0.6)
        )


def test_the_scan_command_screens_by_default(planted_dir, long_corpus_file, tmp_path, capsys):
    assert (
        main(
            [
                "scan",
                "--model",
                str(planted_dir),
                "--corpus",
                str(long_corpus_file),
                "--n-repeats",
                str(N_REPEATS),
                "--out",
                str(tmp_path),
                "--tokens",
                "60",
                "--screen-repeats",
                "4",
                "--screen-threshold",
                "0.5",
                "--calibration",
                "10",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert {
        "screen_recall",
        "screen_recall_ci_low",
        "screen_recall_ci_high",
        "n_tokens",
        "share_reached_sink",
        "ci_low",
        "ci_high",
    } <= set(summary)
    assert (
        summary["n_tokens"] == 60
        and summary["screen"]["n_repeats"] == 4
        and summary["n_verified"] < 60
    )
    assert "screen shard 1/1" in captured.err and "full runs shard 1/1" in captured.err


def test_running_a_share_of_the_positives_widens_the_interval_and_keeps_the_rest_unverified(
    planted, setup, tokens, tmp_path
):
    everything = Screen(
        n_repeats=4, threshold=-1.0, calibration=5, positives=1.0
    )  # every token a screen positive
    run_scan(planted, setup, tokens, tmp_path / "all", screen=everything, batch_size=32)
    run_scan(
        planted,
        setup,
        tokens,
        tmp_path / "half",
        screen=everything._replace(positives=0.5),
        batch_size=32,
    )
    full, half = (merge_scan(tmp_path / name, tokens) for name in ("all", "half"))
    exact, sampled = full.summary(), half.summary()
    assert (
        exact["ci_low"]
        == exact["share_reached_sink"]
        == exact["ci_high"]
        == pytest.approx(3 / len(tokens))
    )
    frame = half.to_frame()
    assert frame["verified"].equals(frame["due"]) and 0.3 < frame["verified"].mean() < 0.7
    assert (
        sampled["missing"] == 0 and sampled["screen"]["n_positives_run"] == frame["verified"].sum()
    )
    assert sampled["ci_low"] < sampled["share_reached_sink"] < sampled["ci_high"]
    assert (frame.loc[~frame["verified"], "reached_sink"]).all()  # unverified: the screen's verdict


SCREENED = [
    "--n-repeats",
    str(N_REPEATS),
    "--screen-repeats",
    "4",
    "--screen-threshold",
    "0.5",
    "--calibration",
    "12",
]


def _attack_rows(out, study, capsys) -> pd.DataFrame:
    """`sinklens attack --scan out`, and the scan table it merged (scan.parquet, rewritten by it)."""
    assert (
        main(["attack", *study, "--scan", str(out), "--lengths", "8", "--sequences", "4", "--json"])
        == 0
    )
    capsys.readouterr()
    return pd.read_parquet(out / "scan.parquet")


def test_attack_on_an_unfinished_screen_draws_the_calibration_from_the_request(
    planted, planted_dir, long_corpus_file, tmp_path, capsys
):
    """A killed scan (here: one of two shards done) leaves a screen without every token: the attack's merge still
    draws the calibration sample from the tokens the scan asked for, and counts the rest as missing."""
    study = ["--model", str(planted_dir), "--corpus", str(long_corpus_file)]
    out = tmp_path / "scan"
    assert (
        main(
            [
                "scan",
                *study,
                *SCREENED,
                "--tokens",
                "80",
                "--shard",
                "1/2",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    request = json.loads((out / "request.json").read_text())["token_ids"]
    assert len(request) == 80
    rows = _attack_rows(out, study, capsys)
    calibration, _ = scan_store_module.screen_draws(request, Screen(4, 0.5, 12, 1.0, 0))
    assert len(rows) == 40 and set(rows["token_id"]) < set(request)  # half the request screened
    assert set(rows.loc[rows["calibration"], "token_id"]) == calibration & set(rows["token_id"])
    assert (
        merge_scan(out).summary()["missing"] == merge_scan(out, request).summary()["missing"] >= 40
    )


def test_attack_on_a_directory_that_served_two_requests_agrees_with_its_summary(
    planted_dir, long_corpus_file, tmp_path, capsys
):
    """Two scans into one directory (another sample, the same setup and screen): the attack merges the last
    request, as the last scan's summary.json reports it, and leaves scan.parquet as that scan wrote it."""
    study = ["--model", str(planted_dir), "--corpus", str(long_corpus_file)]
    out = tmp_path / "scan"
    for sample in ("40", "60"):
        assert (
            main(
                [
                    "scan",
                    *study,
                    *SCREENED,
                    "--tokens",
                    sample,
                    "--seed",
                    "0",
                    "--out",
                    str(out),
                    "--json",
                ]
            )
            == 0
        )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = pd.read_parquet(out / "scan.parquet")
    rows = _attack_rows(out, study, capsys)
    assert_frame_equal(rows, written)
    assert len(rows) == summary["n_tokens"] == 60 and summary["missing"] == 0
    assert int(rows["calibration"].sum()) == summary["screen"]["n_calibration_negatives_run"] + int(
        (rows["calibration"] & rows["screen_positive"]).sum()
    )

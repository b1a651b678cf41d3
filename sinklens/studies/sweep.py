"""Table-1 sweeps over several models and scans split into shards, locally or as Ray tasks.

Every part (one model's row, one shard of a scan) lands in one output directory as it finishes, so
an interrupted sweep, or a part whose Ray worker was lost, is redone by the next run of the same
command, and nothing is counted twice. Locally the parts run one after another; with Ray each runs
as a task, one model or shard per worker and one GPU per worker where the cluster has GPUs. Ray
workers write into the output directory themselves, so on a cluster of several machines it must
be on a filesystem they all see (a local Ray instance always does).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sinklens._io import check_output_dir, write_json
from sinklens.defaults import RAY_LOCAL
from sinklens.errors import SinklensError
from sinklens.results import load_or_compute
from sinklens.settings import Settings
from sinklens.studies.scan import ScanSetup, Screen, Written, run_scan
from sinklens.studies.table import SinkTableRow, sink_table_row

TABLE_FILE = "table.json"


@dataclass(frozen=True)
class PartFailed:
    """A part that ended with a sinklens error (a model without a sink, say): the rest of the sweep stands."""

    name: str
    error: str


def connect_ray(address: str) -> None:
    """Join the Ray cluster at ``address`` (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``), or start a local
    instance for :data:`RAY_LOCAL`. Missing Ray or an unreachable address is one clear error, before any work
    (Ray itself would retry an unreachable address for minutes)."""
    try:
        import ray
    except ImportError:
        raise SinklensError(
            "--ray needs Ray, which is not installed", "pip install 'sinklens[ray]'"
        ) from None
    if address not in (RAY_LOCAL, "auto"):
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise SinklensError(
                f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})",
                "start it with `ray start --head`, check the address, or pass --ray alone to start "
                "a local instance",
            ) from None
    try:
        ray.init(
            address=None if address == RAY_LOCAL else address,
            ignore_reinit_error=True,
            log_to_driver=False,
            include_dashboard=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SinklensError(
            f"cannot join the Ray cluster at {address} ({str(exc).splitlines()[0][:200]})",
            "check the address, or pass --ray alone to start a local instance",
        ) from None


def _host_port(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if not match:
        raise SinklensError(
            f"{address!r} is not a Ray address", "pass HOST:PORT, ray://HOST:PORT or auto"
        )
    return match[1], int(match[2])


def _run_parts(parts: Sequence[tuple[str, Callable, tuple]], *, ray: bool, desc: str) -> list:
    """Run ``function(*arguments)`` for each ``(name, function, arguments)``, in this process or as Ray tasks;
    a part's sinklens error becomes a :class:`PartFailed` and the others go on. Results in ``parts`` order."""
    results: list = [None] * len(parts)
    with tqdm(total=len(parts), desc=desc, unit="part") as bar:
        if not ray:
            for i, (name, function, arguments) in enumerate(parts):
                results[i] = _part(name, function, arguments)
                bar.update()
            return results
        import ray as ray_module

        gpus = 1 if ray_module.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray_module.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(_part)
        pending = {
            task.remote(name, function, arguments): i
            for i, (name, function, arguments) in enumerate(parts)
        }
        while pending:
            done, _ = ray_module.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                results[index] = ray_module.get(done[0])
            except (
                ray_module.exceptions.RayError
            ) as exc:  # a lost worker: the next run redoes this part
                results[index] = PartFailed(
                    parts[index][0],
                    f"its Ray task failed ({type(exc).__name__}); run the "
                    "same command again to redo it",
                )
            bar.update()
    return results


def _part(name: str, function: Callable, arguments: tuple):
    try:
        return function(*arguments)
    except SinklensError as exc:
        return PartFailed(name, str(exc))


def _row_path(out: Path, config: Settings) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", config.model).strip("_")[-60:]
    return out / "rows" / f"{slug}-{config.fingerprint()}.pt"


def table_row_into(config: Settings, out: Path) -> SinkTableRow:
    """One model's Table-1 row, read from ``out`` if a run of the same settings wrote it, else measured (on the
    layers it needs only) and written there."""
    return load_or_compute(
        _row_path(out, config),
        lambda: sink_table_row(config.load_model(early_layers_only=True), None, config),
    )


def table_sweep(
    configs: Sequence[Settings], out: str | Path, *, ray: str | None = None
) -> list[SinkTableRow | PartFailed]:
    """Every model's Table-1 row, in ``configs`` order, through ``out`` (see the module docstring), on the Ray
    cluster at ``ray`` (``"local"``: a new local instance) or in this process; ``table.json`` holds each
    model's row summary, or its error."""
    out = check_output_dir(out)
    if ray is not None:
        connect_ray(ray)
    parts = [(config.model, table_row_into, (config, out)) for config in configs]
    rows = _run_parts(parts, ray=ray is not None, desc="sinklens table")
    write_json(out / TABLE_FILE, {"rows": [row_summary(row) for row in rows]})
    return rows


def row_summary(row: SinkTableRow | PartFailed) -> dict:
    """A row's summary, or the model's name and its error."""
    return (
        row.summary() if isinstance(row, SinkTableRow) else {"model": row.name, "error": row.error}
    )


def scan_shard(
    config: Settings,
    setup: ScanSetup,
    token_ids: Sequence[int],
    out: Path,
    shard: tuple[int, int],
    batch_size: int | None,
    screen: Screen | None,
) -> Written:
    """One shard of a scan whose setup ``out`` already holds, on a model loaded here (the layers it needs only)."""
    model = config.load_model(early_layers_only=True)
    return run_scan(model, setup, token_ids, out, shard=shard, batch_size=batch_size, screen=screen)


def scan_shards(
    config: Settings,
    setup: ScanSetup,
    token_ids: Sequence[int],
    out: str | Path,
    n_shards: int,
    *,
    batch_size: int | None,
    screen: Screen | None,
    ray: bool = True,
) -> list[Written | PartFailed]:
    """Shards ``1/n`` ... ``n/n`` of a scan, each a part (a Ray task with ``ray``)."""
    parts = [
        (
            f"shard {i}/{n_shards}",
            scan_shard,
            (config, setup, list(token_ids), Path(out), (i, n_shards), batch_size, screen),
        )
        for i in range(1, n_shards + 1)
    ]
    return _run_parts(parts, ray=ray, desc="sinklens scan shards")


def default_shards() -> int:
    """Shards for a scan on Ray: one per GPU of the cluster, else one per two CPUs."""
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)) // 2)

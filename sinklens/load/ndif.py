"""Remote runs on NDIF (the National Deep Inference Fabric), or a self-hosted NDIF: the host, the key, the
requests and what can go wrong with them, each as one line.

A :class:`~sinklens.load.traced.TracedModel` loaded with ``remote=True`` sends every trace to an
:class:`NdifHost` as a non-blocking request (nnsight's HTTP path: submit, then poll for the status and fetch
the saved values), so a long job shows its status on the ``sinklens`` logger (queueing at INFO) and a job
that outlives its timeout is an error rather than a hang. sinklens' own code travels with each request by
value (the server has torch, transformers and nnsight, not sinklens).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sinklens.errors import SinklensError

log = logging.getLogger("sinklens")

NDIF_HOST = "https://api.ndif.us"
FIRST_POLL_SECONDS = 0.02  # a short job is answered at once; a long one is polled ever less often
POLL_SECONDS = 2.0
POLL_RETRIES = (
    10  # polls in a row a host may fail (5xx, no connection) before the run gives up on it
)
ROUTINE_STATUSES = (
    "RECEIVED",
    "RUNNING",
    "COMPLETED",
)  # logged at DEBUG; queueing and the like at INFO


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def require_nnsight():
    """The nnsight package, or one clear error naming the extra that installs it."""
    try:
        import nnsight
    except ImportError:
        raise SinklensError(
            "the nnsight backend needs the nnsight package", "pip install 'sinklens[nnsight]'"
        ) from None
    return nnsight


def remote_host(host: str | None) -> str:
    """The NDIF host to use: ``host``, else ``NDIF_HOST``, else nnsight's configured host (NDIF itself)."""
    if host:
        chosen = host
    else:
        from nnsight import CONFIG

        chosen = os.environ.get("NDIF_HOST") or CONFIG.API.HOST or NDIF_HOST
    if not chosen.startswith(("http://", "https://")):
        raise SinklensError(
            f"the NDIF host {chosen!r} is not a URL", "pass --host http(s)://host[:port]"
        )
    return chosen.rstrip("/")


def remote_api_key(host: str) -> str:
    """The NDIF API key (``NDIF_API_KEY``, else nnsight's config), or one line saying how to set one."""
    from nnsight import CONFIG

    key = os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
    if not key:
        raise SinklensError(
            f"no NDIF API key for {host}",
            "set NDIF_API_KEY (a free key from https://login.ndif.us), or save one with "
            "nnsight.CONFIG.set_default_api_key('...')",
        )
    return key


@functools.lru_cache(maxsize=1)
def register_for_remote() -> None:
    """Ship sinklens' own code with remote requests by value (the server has torch, transformers and nnsight,
    not sinklens): the hook functions an analysis passes (ablations, reductions) run there."""
    require_nnsight().register("sinklens")


@dataclass
class NdifHost:
    """An NDIF server a model runs on, and what its requests have carried so far."""

    url: str
    api_key: str = field(repr=False)
    model_name: str
    timeout: float
    bytes_sent: int = 0
    bytes_received: int = 0

    @classmethod
    def of(cls, host: str | None, model_name: str, timeout: float) -> NdifHost:
        """The host to use (:func:`remote_host`) with its key (:func:`remote_api_key`), checked before anything
        is sent."""
        url = remote_host(host)
        return cls(url, remote_api_key(url), model_name, timeout)

    def backend(self, envoy: Any) -> Any:
        """A non-blocking nnsight request of ``envoy``'s model to this host, counting its bytes."""
        from nnsight.intervention.backends.display import StatusDisplay
        from nnsight.intervention.backends.remote import RemoteBackend

        host = self

        class Counted(RemoteBackend):
            def _serialize(self, tracer):
                blob = super()._serialize(tracer)
                host.bytes_sent += len(blob)
                return blob

            def finalize(self, content: bytes):
                host.bytes_received += len(content)
                return super().finalize(content)

        try:
            key = (
                envoy.to_model_key()
            )  # a hub name is canonicalised through the hub, once per process
        except Exception as exc:  # the hub's errors come in many types
            raise SinklensError(
                f"could not resolve {self.model_name} on the hub for NDIF ({first_line(exc)})",
                "check the name and the network (a remote run names its model by its hub id)",
            ) from exc
        backend = Counted(
            key,
            host=self.url,
            api_key=self.api_key,
            env=envoy._remoteable_get_env(),
            blocking=False,
        )
        # nnsight prints each status to stdout, which would mix into --json output: sinklens logs them instead
        backend.display = StatusDisplay(enabled=False, verbose=False)
        return backend

    @contextmanager
    def errors(self) -> Iterator[None]:
        """A request the host refuses, or a host that does not answer, as one clear error (nnsight raises its
        ``RemoteError`` for both when it submits, with the HTTP error as its cause)."""
        from nnsight.intervention.backends.remote import RemoteError

        try:
            yield
        except RemoteError as exc:
            raise self.failed(exc, exc.__cause__) from None

    def wait(self, backend: Any, what: str) -> dict[str, Any]:
        """Poll a submitted request until its saved values arrive, logging each new status; one clear error
        for a failed job or one that outlives :attr:`timeout`."""
        import httpx
        from nnsight.intervention.backends.remote import RemoteError

        start, status, pause, misses = time.monotonic(), None, FIRST_POLL_SECONDS, 0
        while True:
            result = None
            try:
                result = backend()
                misses = 0
            except RemoteError as exc:  # the job failed on the host
                raise self.failed(exc) from None
            except (httpx.HTTPStatusError, httpx.TransportError) as exc:
                # a refusal ends the run; a busy host (5xx) or a dropped connection is asked again, a while
                answer = getattr(getattr(exc, "response", None), "status_code", 500)
                misses += 1
                if answer < 500:
                    raise self.failed(exc, exc) from None
                if misses > POLL_RETRIES:
                    raise self.unreachable(exc) from None
                log.info("%s on %s: %s; asking again", what, self.url, first_line(exc))
            if backend.status != status:
                status = backend.status
                name = getattr(status, "value", status)
                level = logging.DEBUG if name in ROUTINE_STATUSES else logging.INFO
                log.log(level, "%s on %s: %s", what, self.url, name)
            if result is not None:
                return result
            if time.monotonic() - start > self.timeout:
                raise SinklensError(
                    f"the remote job {backend.job_id} ({what}) on {self.url} did not finish in "
                    f"{self.timeout:.0f} s",
                    "try again when the host is less busy, or raise the limit (--remote-timeout)",
                )
            time.sleep(pause)
            pause = min(pause * 2, POLL_SECONDS)

    def failed(self, exc: Exception, http: BaseException | None = None) -> SinklensError:
        """The one line for a request the host refused (``http``: the HTTP error behind it, if any) or a job that
        failed on it."""
        status = getattr(getattr(http, "response", None), "status_code", None)
        detail = first_line(exc).removeprefix("Failed to send request: ")
        if status in (401, 403):
            return SinklensError(
                f"{self.url} refused the NDIF API key ({detail})",
                "check NDIF_API_KEY (or nnsight's saved key) against https://login.ndif.us",
            )
        if http is not None and status is None:
            return self.unreachable(http)
        return SinklensError(
            f"the remote job for {self.model_name} failed on {self.url}: {detail}",
            "check that the host serves this model (nnsight.ndif_status() lists what runs) and that the "
            "request fits its limits (fewer --n-repeats)",
        )

    def unreachable(self, exc: BaseException) -> SinklensError:
        return SinklensError(
            f"the NDIF host {self.url} did not answer ({first_line(exc)})",
            "check --host (or NDIF_HOST) and the network; https://nnsight.net/status says whether NDIF is up",
        )

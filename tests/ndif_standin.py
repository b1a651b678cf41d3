"""A loopback stand-in for an NDIF server, for the remote path's tests: a separate process in which sinklens,
TransformerLens and jaxtyping cannot be imported, as on NDIF.

It speaks the part of NDIF's HTTP protocol that nnsight's non-blocking client uses (the one sinklens uses):
``POST /request`` (form field ``data``: the request's JSON envelope; file ``blob``: the serialised trace; header
``ndif-api-key``), ``GET /response/<id>`` (the job's status, as nnsight's ``ResponseModel`` JSON) and the result's
URL, which serves the saved values as ``torch.save`` bytes (zstd-compressed when the request was). A job runs
as the server runs one: the trace is deserialised against the server's own copy of the model
(``RequestModel.deserialize`` with the model's persistent objects), executed, and only its saved values
return. It serves the model directories named on its command line, and answers a wrong key with 401 and a
model it does not serve with an ERROR status, as NDIF does.

What it cannot stand for: NDIF's queueing, its GPUs and deployments, its limits on time and result size,
and its websocket (blocking) path.

    python tests/ndif_standin.py --serve MODEL_DIR --key KEY --port-file PORT_FILE
"""

import sys

_BLOCKED = ("sinklens", "transformer_lens", "jaxtyping")


class _Unimportable:
    """A meta-path finder that makes the packages NDIF lacks unimportable here, whatever is installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(
                f"No module named {name!r} (not on the NDIF stand-in)", name=name
            )
        return None


if (
    __name__ == "__main__"
):  # the server process; a test imports this module only to start one (launch)
    sys.meta_path.insert(0, _Unimportable())

import argparse  # noqa: E402  (after the blocker, so nothing below can import what it blocks)
import email.parser  # noqa: E402
import email.policy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


class Jobs:
    """The jobs received, their statuses and results, run one at a time (one model copy)."""

    def __init__(self, served: set[str]):
        self.served = served
        self.models: dict[str, object] = {}
        self.status: dict[str, dict] = {}
        self.results: dict[str, bytes] = {}
        self.run_lock = threading.Lock()

    def model(self, model_key: str):
        from nnsight.modeling.mixins.remotable import Remotable
        from transformers import AutoTokenizer

        repo = json.loads(model_key.split(":", 1)[1])["repo_id"]
        if repo not in self.served:
            raise LookupError(f"Model {repo!r} is not deployed on this server")
        if model_key not in self.models:
            model = Remotable.from_model_key(
                model_key, tokenizer=AutoTokenizer.from_pretrained(repo), task="text-generation"
            )
            model.dispatch()
            self.models[model_key] = model
        return self.models[model_key]

    def run(self, job_id: str, envelope: dict, blob: bytes, base_url: str) -> None:
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        self.status[job_id] = {"id": job_id, "status": "QUEUED"}
        with self.run_lock:
            self.status[job_id] = {"id": job_id, "status": "RUNNING"}
            try:
                model = self.model(envelope["model_key"])
                model._remoteable_set_env(envelope.get("env") or {})
                compress = bool(envelope.get("compress"))
                tracer = RequestModel.deserialize(
                    blob, model._remoteable_persistent_objects(), compress=compress
                )
                inc()
                try:
                    with torch.no_grad():
                        tracer.execute(tracer.info.code)
                    saved = {
                        name: value
                        for name, value in tracer.info.frame.f_locals.items()
                        if id(value) in _saves()
                    }
                finally:
                    dec()
                buffer = io.BytesIO()
                torch.save(saved, buffer)
                data = buffer.getvalue()
                if compress:
                    import zstandard

                    data = zstandard.ZstdCompressor(level=6).compress(data)
                self.results[job_id] = data
                self.status[job_id] = {
                    "id": job_id,
                    "status": "COMPLETED",
                    "data": f"{base_url}/result/{job_id}",
                }
            except Exception as exc:  # the job's error goes back to the client, as NDIF sends it
                traceback.print_exc()
                line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.status[job_id] = {
                    "id": job_id,
                    "status": "ERROR",
                    "description": f"{type(exc).__name__}: {line}",
                }


def environment() -> dict:
    """The server's Python and the packages it can import, among those a trace may need."""
    import importlib
    from importlib.metadata import version

    packages = {}
    for name in ("torch", "transformers", "nnsight", "numpy", "einops", *_BLOCKED):
        try:
            importlib.import_module(name)
            packages[name] = version(name)
        except ImportError:
            continue
    return {"python": sys.version.split()[0], "packages": packages}


def handler(jobs: Jobs, key: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # quiet: the tests read statuses, not logs
            pass

        def reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def authorised(self) -> bool:
            if self.headers.get("ndif-api-key") == key:
                return True
            self.reply(401, json.dumps({"detail": "Invalid or missing API key"}).encode())
            return False

        def do_POST(self):
            if self.path != "/request":
                return self.reply(404, b'{"detail": "Not Found"}')
            if not self.authorised():
                return None
            body = self.rfile.read(int(self.headers["Content-Length"]))
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
            )
            parts = {
                part.get_param("name", header="content-disposition"): part
                for part in message.iter_parts()
            }
            envelope = json.loads(parts["data"].get_content())
            blob = parts["blob"].get_payload(decode=True)
            job_id = uuid.uuid4().hex
            base_url = f"http://{self.headers['Host']}"
            jobs.status[job_id] = {"id": job_id, "status": "RECEIVED"}
            threading.Thread(
                target=jobs.run, args=(job_id, envelope, blob, base_url), daemon=True
            ).start()
            return self.reply(200, json.dumps({"id": job_id, "status": "RECEIVED"}).encode())

        def do_GET(self):
            if self.path == "/env":  # what NDIF's /env answers: the server's Python and packages
                return self.reply(200, json.dumps(environment()).encode())
            if self.path.startswith("/response/"):
                if not self.authorised():
                    return None
                status = jobs.status.get(self.path.removeprefix("/response/"))
                if status is None:
                    return self.reply(404, b'{"detail": "no such job"}')
                return self.reply(200, json.dumps(status).encode())
            if self.path.startswith("/result/"):
                data = jobs.results.get(self.path.removeprefix("/result/"))
                if data is None:
                    return self.reply(404, b'{"detail": "no such result"}')
                return self.reply(200, data, "application/octet-stream")
            return self.reply(404, b'{"detail": "Not Found"}')

    return Handler


def launch(models: list[Path], key: str, port_file: Path) -> tuple[subprocess.Popen, str]:
    """Start the stand-in serving ``models`` in a separate, isolated (``python -I``) process; its process and
    URL once it listens (the port is written to ``port_file``)."""
    command = [sys.executable, "-I", __file__, "--key", key, "--port-file", str(port_file)]
    for model in models:
        command += ["--serve", str(model)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if port_file.exists() and port_file.read_text():
            return server, f"http://127.0.0.1:{port_file.read_text()}"
        if server.poll() is not None:
            raise RuntimeError(
                f"the stand-in stopped: {server.stderr.read() if server.stderr else ''}"
            )
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("the stand-in did not start in 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="append", default=[], help="a model directory to serve")
    parser.add_argument("--key", required=True, help="the API key it accepts")
    parser.add_argument("--port-file", required=True, help="where to write the port it listens on")
    args = parser.parse_args()
    jobs = Jobs({str(Path(p)) for p in args.serve})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(jobs, args.key))
    Path(args.port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()

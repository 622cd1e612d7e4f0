"""`tinylm serve`: the trained model over HTTP, OpenAI-compatible, with a playground page.

The API and the page are tinylm/serve/ (app.py lists the endpoints); this module loads the
models, binds the socket and runs uvicorn. The socket is bound before the models load, so a port
already in use is one line at once, and `--port 0` takes a free port: the line that says where
the server listens names it.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from tinylm.cli.models import Source, add_source_arguments, load, resolve_device, sources
from tinylm.errors import PipelineError

DESCRIPTION = """\
Serve the trained model over HTTP: OpenAI's /v1/completions (streaming included), /v1/models and
/health, and a playground page at / to generate, see each token's surprisal and the attention of
every head. With several --rev, each revision is a model of its own (`model` in a request picks
it). It listens on 127.0.0.1 only unless --host says otherwise; there is no authentication, so a
wider --host lets anyone who can reach the port use the model (docs/serving.md)."""

EPILOG = """\
examples:
  tinylm serve
  tinylm serve --rev main --rev exp-lr6e-4 --port 8080
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Once upon a time", "max_tokens": 30, "seed": 1}'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes the model to the network (default: %(default)s)")
    server.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    server.add_argument("--threads", type=int, default=8, metavar="N",
                        help="generations decoded at once; more requests wait their turn (default: %(default)s)")
    add_source_arguments(parser, with_model=True)


def model_id(source: Source) -> str:
    """What `model` in a request names it by: the revision, or `tinylm` for a model folder."""
    return source.rev if source.rev is not None else "tinylm"


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise PipelineError(f"--port must be in 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)  # now: a client that connects once the address is printed waits in the backlog
    except OSError as exc:
        raise PipelineError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port, or a "
                            "--host of this machine") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise PipelineError(f"--threads must be >= 1, got {args.threads}")
    chosen = sources(args, with_model=True)
    ids = [model_id(source) for source in chosen]
    if len(set(ids)) < len(ids):
        raise PipelineError(f"--rev names a revision twice ({', '.join(ids)}): give each once")
    sock = bind(args.host, args.port)
    # token_nll (scoring) reports progress with tqdm, read from the environment when first imported (here,
    # or by dvc for --rev): a progress bar per request would fill the server's log.
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = resolve_device(args.device)
    models = [load(source, device) for source in chosen]

    import uvicorn

    from tinylm.serve.app import Served, create_app
    from tinylm.serve.workers import Workers

    app = create_app([Served.of(i, loaded) for i, loaded in zip(ids, models)], Workers(args.threads))
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"tinylm serve: {', '.join(ids)} at {url}/v1 (playground: {url}/); Ctrl-C stops", flush=True)
    if not is_loopback(args.host):
        print(f"tinylm serve: warning: listening on {args.host}: anyone who can reach this port can use the model "
              "(no authentication, no TLS)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0

"""``python -m gptoss_jax.serve``: an OpenAI-compatible HTTP server for a gpt-oss checkpoint.

    python -m gptoss_jax.serve --checkpoint openai/gpt-oss-20b --max-batch 16
    python -m gptoss_jax.serve --checkpoint DIR --port 0 --api-key secret   # any free port

Routes: ``/v1/responses``, ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health``, ``/v1/stats``, ``/openapi.json`` (see :mod:`gptoss_jax.server`). Binds 127.0.0.1
unless ``--host`` says otherwise; ``--api-key`` (or ``$GPTOSS_API_KEY``) is then required on
every route. Every argument is checked before anything loads, and the port is bound before the
model: a bad argument or a taken port is a one-line error and exit code 2 (``cli.common``).
Once listening, one line ``serving MODEL on http://HOST:PORT`` goes to stderr; ``/health``
answers 200 after warm-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from gptoss_jax.cli import common
from gptoss_jax.cli.common import UsageError
from gptoss_jax.inference.engine import Engine
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.background import bind_socket

PROG = "python -m gptoss_jax.serve"
API_KEY_ENV = "GPTOSS_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = common.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots (concurrent requests)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="tokens per sequence, prompt + output (KV cache length)")
    p.add_argument("--max-prefill-batch", type=int, default=1,
                   help="prompts prefilled in one call (powers of two up to this)")
    p.add_argument("--warmup", default="64,128",
                   help="comma-separated prompt lengths to compile before serving ('' = none)")
    p.add_argument("--model-name", help="the model id clients use (default: the checkpoint's name)")
    p.add_argument("--api-key", help=f"require this bearer key (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--store-size", type=int, default=1000, help="stored responses kept in memory")
    p.add_argument("--log-level", default="info", help="debug | info | warning | error")
    common.add_model_args(p)
    return p


def check_args(args) -> None:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_batch", "max_context", "max_prefill_batch", "store_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    common.check_model_args(args)
    try:
        args.warmup = [int(x) for x in args.warmup.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--warmup must be comma-separated integers, got {args.warmup!r}") from None
    if any(not 1 <= n < args.max_context for n in args.warmup):
        raise UsageError(f"--warmup lengths must be in [1, --max-context), got {args.warmup}")
    if args.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError(f"--log-level must be debug, info, warning or error, got {args.log_level!r}")


def model_name(checkpoint: str) -> str:
    path = checkpoint.rstrip("/")
    name = os.path.basename(path)
    if name == "original":  # OpenAI's layout sits in <model>/original
        name = os.path.basename(os.path.dirname(path)) or name
    return name or checkpoint


def _listen(args):
    try:
        return bind_socket(args.host, args.port)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e}") from None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.check_or_exit(parser, check_args, args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> int:
        sock = _listen(args)  # before loading: a taken port fails fast
        model = common.load_model(args, mesh=common.setup_mesh(args))
        engine = Engine(model, max_batch=args.max_batch, max_len=args.max_context)
        return serve(args, sock, engine, common.tokenizer_for(model), api_key)

    return common.run(PROG, body)


def serve(args, sock, engine, tokenizer, api_key: str | None) -> int:
    """Serve until interrupted (Ctrl-C is a normal stop: exit status 0)."""
    name = args.model_name or model_name(args.checkpoint)
    scheduler = Scheduler(engine, max_prefill_batch=args.max_prefill_batch, warmup_lengths=args.warmup,
                          warmup_constrained=True)  # structured outputs: no compile on first use
    app = create_app(scheduler, tokenizer, model_name=name, api_key=api_key, store_size=args.store_size)
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port} (max batch {args.max_batch}, context "
          f"{args.max_context}{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower(), timeout_keep_alive=30))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m gptoss_jax.serve``: an OpenAI-compatible HTTP server for a gpt-oss checkpoint.

    python -m gptoss_jax.serve --checkpoint openai/gpt-oss-20b --max-batch 16
    python -m gptoss_jax.serve --checkpoint DIR --port 0 --api-key secret   # any free port

Routes: ``/v1/responses`` (+ retrieve, delete, input_items, cancel), ``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/health``, ``/v1/stats``, ``/openapi.json`` (see
:mod:`gptoss_jax.server`). ``--model-name`` may be given several times (aliases; the first is
the main id). ``--store PATH`` keeps stored responses in an SQLite file across restarts (default:
in memory, the ``--store-size`` most recently used). Binds 127.0.0.1
unless ``--host`` says otherwise; ``--api-key`` (or ``$GPTOSS_API_KEY``) is then required on
every route. Every argument is checked before anything loads, and the port is bound before the
model: a bad argument or a taken port is a one-line error and exit code 2 (``cli.common``).
Once listening, one line ``serving MODEL on http://HOST:PORT`` goes to stderr; ``/health``
answers 200 after warm-up.

Built-in tools (``--browser``, ``--python``, ``--tool-server``: ``cli.common.add_tool_args``)
start after the port is bound and before the model loads, so a backend that cannot start fails
fast (one line, exit 2); Responses requests that enable them run the tool loop. The server never
executes code unless started with ``--python``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import jax
import uvicorn

from gptoss_jax.cli import common
from gptoss_jax.cli.common import UsageError
from gptoss_jax.inference.engine import Engine
from gptoss_jax.server import Scheduler, create_app
from gptoss_jax.server.background import bind_socket
from gptoss_jax.server.response_store import MemoryResponseStore
from gptoss_jax.server.sqlite_store import SQLiteResponseStore, StoreFileError

PROG = "python -m gptoss_jax.serve"
API_KEY_ENV = "GPTOSS_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = common.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences running at once")
    p.add_argument("--max-context", type=int, default=4096,
                   help="tokens per sequence, prompt + output")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                    help="KV cache pool size in token positions, shared by all sequences "
                         "(default: room for --max-batch sequences of --max-context tokens)")
    kv.add_argument("--kv-cache-memory", type=float, default=None, metavar="FRACTION",
                    help="KV cache pool size as a fraction of the free device memory")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled per step (longer prompts run in chunks)")
    p.add_argument("--max-prefill-batch", type=int, default=8,
                   help="prefill chunks run in one call (powers of two up to this)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of prompt prefixes seen before")
    p.add_argument("--warmup", default="64,128",
                   help="comma-separated prompt lengths to compile before serving ('' = none)")
    p.add_argument("--model-name", action="append",
                   help="a model id clients use; repeat for aliases (default: the checkpoint's name)")
    p.add_argument("--api-key", help=f"require this bearer key (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--store", metavar="PATH",
                   help="keep stored responses in this SQLite file, across restarts (default: in memory)")
    p.add_argument("--store-size", type=int, default=1000,
                   help="stored responses kept (the least recently used finished ones go first)")
    p.add_argument("--log-level", default="info", help="debug | info | warning | error")
    common.add_model_args(p)
    common.add_tool_args(p)
    common.add_serving_args(p)
    return p


def check_args(args) -> None:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_batch", "max_context", "max_prefill_batch", "store_size", "prefill_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise UsageError(f"--kv-cache-tokens must be >= 1, got {args.kv_cache_tokens}")
    if args.kv_cache_memory is not None and not 0 < args.kv_cache_memory < 1:
        raise UsageError(f"--kv-cache-memory must be in (0, 1), got {args.kv_cache_memory}")
    common.check_model_args(args)
    common.check_tool_args(args)
    try:
        args.warmup = [int(x) for x in args.warmup.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--warmup must be comma-separated integers, got {args.warmup!r}") from None
    if any(not 1 <= n < args.max_context for n in args.warmup):
        raise UsageError(f"--warmup lengths must be in [1, --max-context), got {args.warmup}")
    if any(not name.strip() for name in args.model_name or ()):
        raise UsageError("--model-name must not be empty")
    if args.store is not None and os.path.isdir(args.store):
        raise UsageError(f"--store {args.store!r} is a directory; give the SQLite file's path")
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
        mesh = common.setup_mesh(args)  # multi-host: connects the processes first
        leader = jax.process_index() == 0
        sock = _listen(args) if leader else None  # before loading: a taken port fails fast
        store = open_store(args) if leader else None  # likewise a store file that cannot be used
        try:
            toolbox = common.build_toolbox(args) if leader else None  # so does a tool backend
            model = common.load_model(args, mesh=mesh, quiet=not leader)
            engine = make_engine(args, model, common.channel_for(args))
            if not leader:  # a follower runs the leader's steps until it stops
                engine.follow()
                return 0
            return serve(args, sock, engine, common.tokenizer_for(model), api_key, toolbox, store)
        finally:
            if store is not None:
                store.close()

    return common.run(PROG, body)


def open_store(args):
    if args.store is None:
        return MemoryResponseStore(args.store_size)
    try:
        return SQLiteResponseStore(args.store, max_size=args.store_size)
    except StoreFileError as e:
        raise UsageError(str(e)) from None


def make_engine(args, model, channel=None) -> Engine:
    return Engine(model, max_batch=args.max_batch, max_len=args.max_context,
                  kv_cache_tokens=args.kv_cache_tokens, kv_cache_memory=args.kv_cache_memory,
                  prefill_tokens=args.prefill_tokens, max_prefill_rows=args.max_prefill_batch,
                  prefix_caching=not args.no_prefix_caching, channel=channel)


def serve(args, sock, engine, tokenizer, api_key: str | None, toolbox=None, store=None) -> int:
    """Serve until interrupted (Ctrl-C is a normal stop: exit status 0); the app closes
    ``toolbox`` at shutdown. ``store``: where responses are kept (default: in memory)."""
    names = args.model_name or [model_name(args.checkpoint)]
    name = names[0]
    fatal: list[BaseException] = []
    scheduler = Scheduler(engine, warmup_lengths=args.warmup, on_fatal=lambda e: stop(e),
                          warmup_constrained=True)  # structured outputs: no compile on first use
    app = create_app(scheduler, tokenizer, model_name=names, api_key=api_key, store_size=args.store_size,
                     store=store, toolbox=toolbox)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower(), timeout_keep_alive=30))

    def stop(error: BaseException) -> None:
        """The engine is gone (a multi-host process died; the requests got their 503s): stop
        serving, and exit even if a collective never returns."""
        fatal.append(error)
        server.should_exit = True
        threading.Timer(15.0, os._exit, (3,)).start()

    if engine.channel is not None:  # a step that never ends: 503s, then exit
        engine.channel.watchdog.on_timeout = scheduler.abort
    host, port = sock.getsockname()[:2]
    pool = engine.pages.pool.num_pages * engine.pages.page_size
    tools = f", tools {', '.join(toolbox.namespaces)}" if toolbox else ""
    kept = f"responses in {args.store}" if args.store else "responses in memory"
    aliases = f", also as {', '.join(names[1:])}" if len(names) > 1 else ""
    print(f"serving {name} on http://{host}:{port} (max batch {args.max_batch}, context "
          f"{args.max_context}, KV pool {pool} tokens, {kept}{aliases}"
          f"{', API key required' if api_key else ''}{tools})", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if fatal:
        print(f"{PROG}: error: {fatal[0]}; exiting", file=sys.stderr, flush=True)
        os._exit(3)  # not through atexit: jax.distributed's shutdown would wait for the lost peer
    return 0


if __name__ == "__main__":
    sys.exit(main())

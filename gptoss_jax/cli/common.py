"""What every command line shares: one-line errors, the model flags, and model loading.

* :class:`ArgumentParser` reports a bad argument in one line (``PROG: error: ...``) and exits 2;
  argparse would print the whole usage first.
* :func:`run` is the one error epilogue: :class:`UsageError`, ``ValueError`` (``CheckpointError``,
  ``ConfigError``, ``AdapterError``, ``DataError``, ``ShardingError`` are ValueErrors),
  ``OSError`` and a missing vocabulary become ``PROG: error: <first line>`` on stderr and exit
  status 2, no traceback; Ctrl-C is 130. A lost multi-host process (``multihost.PeerLost``) is
  one line and exit status 3, at once (``os._exit``: ``jax.distributed``'s shutdown would wait
  for the lost process).
* :func:`read_line` is ``input()`` for a chat that keeps a multi-host engine's heartbeat going
  while the user types; :func:`with_heartbeats` keeps it going while a tool call runs.
* :func:`add_model_args` declares ``--checkpoint``, ``--dtype``, ``--adapter`` and, through
  :func:`gptoss_jax.parallel.distributed.add_distributed_args`, ``--mesh`` and the multi-host
  flags (``--coordinator-address``, ``--num-processes``, ``--process-id``) the same way in every
  CLI; :func:`check_model_args`, :func:`setup_mesh` and :func:`load_model` read them.
* :func:`add_tool_args` declares the built-in tool flags of ``generate`` and ``serve``
  (``--browser``, ``--python``, ``--tool-server``, ``--python-allow-network``,
  ``--max-tool-iterations``, ``--tool-output-max-tokens``, ``--tool-output-max-chars``);
  :func:`build_toolbox` turns them into a :class:`gptoss_jax.tools.Toolbox` (None without
  tools), reading an HTTP browser backend's key from its environment variable; a backend that
  cannot start is a :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import jax

from gptoss_jax.chat.tokenizer import Tokenizer, VocabFileError, load_tokenizer
from gptoss_jax.checkpoint.load import DTYPES, load
from gptoss_jax.finetune.export import load_adapter
from gptoss_jax.inference.multihost import Channel, PeerLost
from gptoss_jax.model.model import Model
from gptoss_jax.parallel.distributed import add_distributed_args, setup_from_args
from gptoss_jax.tools import Toolbox, ToolSetupError, api_key_from_env, build_tools

DEFAULT_CHECKPOINT = "openai/gpt-oss-20b"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2 (sub-commands inherit it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run(prog: str, body: Callable[[], int]) -> int:
    """``body()``'s exit status, with every CLI's error epilogue (see the module docstring)."""
    try:
        return body()
    except (UsageError, ValueError, OSError, VocabFileError) as e:
        print(f"{prog}: error: {_first_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except PeerLost as e:
        sys.stdout.flush()
        print(f"{prog}: error: {_first_line(e)}; exiting", file=sys.stderr, flush=True)
        os._exit(3)


def check_or_exit(parser: argparse.ArgumentParser, check: Callable[[argparse.Namespace], None],
                  args: argparse.Namespace) -> None:
    """Run ``check(args)`` and report a :class:`UsageError` as argparse does (exit 2): for a
    CLI that checks every argument before it does anything else."""
    try:
        check(args)
    except UsageError as e:
        parser.error(str(e))


def add_model_args(parser: argparse.ArgumentParser, *, checkpoint_required: bool = False,
                   adapter: bool = True) -> argparse.ArgumentParser:
    """``--checkpoint``, ``--dtype``, ``--adapter`` (unless ``adapter=False``), ``--mesh`` and
    the multi-host flags."""
    help_text = "local folder (HF MXFP4/bf16 or original/) or hub id"
    if checkpoint_required:
        parser.add_argument("--checkpoint", required=True, help=help_text)
    else:
        parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=help_text + " (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16",
                        help="bfloat16 | float32: compute and storage dtype of the dense weights")
    if adapter:
        parser.add_argument("--adapter", help="LoRA adapter folder written by gptoss_jax.finetune")
    add_distributed_args(parser)
    return parser


def check_model_args(args: argparse.Namespace) -> None:
    """Check ``--dtype`` (UsageError) and spell it ``bfloat16`` or ``float32``."""
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be bfloat16 or float32, got {args.dtype!r}")
    args.dtype = "bfloat16" if DTYPES[args.dtype] == DTYPES["bfloat16"] else "float32"


def add_serving_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--step-timeout`` (the multi-host flags' companion for ``serve`` and ``generate``)."""
    parser.add_argument("--step-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="multi-host: a model step the other processes do not finish within "
                             "this time (first runs of a shape: 15x longer, for compiling) means "
                             "one is gone; the leader fails its requests with a 503 and exits")
    return parser


def channel_for(args: argparse.Namespace):
    """The leader/follower channel of a multi-host ``serve`` or ``generate`` (None in one
    process): process 0 leads, the others follow its steps."""
    if jax.process_count() == 1:
        return None
    if not args.step_timeout > 0:
        raise UsageError(f"--step-timeout must be > 0, got {args.step_timeout}")
    return Channel(step_timeout_s=args.step_timeout, compile_timeout_s=15 * args.step_timeout)


def chat_lines(engine_of: Callable[[], object]) -> Iterator[str]:
    """The user's lines of an interactive chat (``read_line`` with the engine of the moment,
    ``engine_of()``), until an empty line or the end of input."""
    while True:
        try:
            line = read_line("> ", engine_of())
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def read_line(prompt: str, engine=None) -> str:
    """``input(prompt)``; with a multi-host ``engine`` (one that has a channel) the line is read
    on another thread while this one sends the followers their heartbeats (a follower that hears
    nothing for long takes the leader for dead). EOFError at the end of input, as input()."""
    if engine is None or getattr(engine, "channel", None) is None:
        return input(prompt)
    answer: queue.Queue = queue.Queue()

    def read():
        try:
            answer.put(input(prompt))
        except BaseException as e:  # EOFError, KeyboardInterrupt: raised on the caller's thread
            answer.put(e)
    threading.Thread(target=read, name="gptoss-input", daemon=True).start()
    while True:
        try:
            line = answer.get(timeout=0.5)
        except queue.Empty:
            engine.heartbeat()
            continue
        if isinstance(line, BaseException):
            raise line
        return line


async def with_heartbeats(work: Awaitable, engine_of: Callable[[], object], every_s: float = 0.5):
    """``await work`` (a chat turn of the tool loop) while a task on the same event loop sends
    the multi-host engine's followers their heartbeats whenever the loop is free: a tool call
    awaits a subprocess or the network for as long as it takes, longer than a follower waits
    for a message. The task runs on the thread that drives the engine, so it never pings in
    the middle of a step. ``engine_of()``: the engine now (None, or one without a channel: no
    heartbeat)."""
    async def beat():
        while True:
            await asyncio.sleep(every_s)
            engine = engine_of()
            if engine is not None and getattr(engine, "channel", None) is not None:
                engine.heartbeat()  # pings only when the channel has been quiet for a while

    task = asyncio.ensure_future(beat())
    try:
        return await work
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def setup_mesh(args: argparse.Namespace):
    """Start multi-host JAX if the flags ask for it, then build the ``--mesh`` (None without
    one). A mesh that does not fit the devices, or bad process flags: ValueError. In a
    multi-host run, what native code writes to stdout goes to stderr from then on
    (:func:`_native_stdout_to_stderr`)."""
    mesh = setup_from_args(args)
    if jax.process_count() > 1:
        _native_stdout_to_stderr()
    return mesh


def _native_stdout_to_stderr() -> None:
    """Point file descriptor 1 at stderr and give ``sys.stdout`` a copy of the real stdout:
    gloo (the CPU collectives) prints its connection lines on the C library's stdout when the
    first collective runs, and a CLI's stdout is its output (``generate --json``)."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(real, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors,
                      buffering=1)


def add_tool_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The built-in tool flags (see the module docstring); nothing runs code or touches the
    network unless they ask for it."""
    g = parser.add_argument_group("built-in tools")
    g.add_argument("--browser", metavar="BACKEND",
                   help="enable the browser tool: local:DIR (offline search over DIR's .txt/.md/.html), exa "
                        "($EXA_API_KEY) or youcom ($YDC_API_KEY)")
    g.add_argument("--python", metavar="BACKEND",
                   help="enable the python tool: subprocess (sandbox), docker[:IMAGE] or jupyter (a kernel per "
                        "conversation); without it no code is ever run")
    g.add_argument("--tool-server", metavar="URL[,URL...]", action="append", default=[],
                   help="MCP tool server(s) whose tools the model may call (repeatable)")
    g.add_argument("--python-allow-network", action="store_true",
                   help="run the python sandbox where no network namespace can be made (code gets the network)")
    g.add_argument("--max-tool-iterations", type=int, default=16, metavar="N",
                   help="most tool calls run for one reply (default: %(default)s)")
    g.add_argument("--tool-output-max-tokens", type=int, default=4096, metavar="N",
                   help="tokens of one tool result the model sees (default: %(default)s)")
    g.add_argument("--tool-output-max-chars", type=int, default=20000, metavar="N",
                   help="characters of one tool result the model sees (default: %(default)s)")
    return parser


def check_tool_args(args: argparse.Namespace) -> None:
    for name in ("max_tool_iterations", "tool_output_max_tokens", "tool_output_max_chars"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def build_toolbox(args: argparse.Namespace) -> Toolbox | None:
    """The tools ``add_tool_args``' flags ask for, started now (MCP servers are contacted to
    list their tools); None when none is asked for."""
    if not (args.browser or args.python or args.tool_server):
        return None
    tok = load_tokenizer()  # every gpt-oss checkpoint has this vocabulary

    def count_tokens(text: str) -> int:
        return len(tok.encode(text, allow_special=False))

    try:
        return build_tools(args.browser, args.python, args.tool_server,
                           browser_api_key=api_key_from_env(args.browser) if args.browser else None,
                           python_allow_network=args.python_allow_network,
                           max_tool_iterations=args.max_tool_iterations,
                           max_output_chars=args.tool_output_max_chars,
                           max_output_tokens=args.tool_output_max_tokens, count_tokens=count_tokens)
    except ToolSetupError as e:
        raise UsageError(str(e)) from None


def log(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def load_model(args: argparse.Namespace, *, mesh=None, quiet: bool = False) -> Model:
    """``--checkpoint`` in ``--dtype`` on ``mesh``, with ``--adapter`` applied if given."""
    t0 = time.perf_counter()
    model = load(args.checkpoint, dtype=args.dtype, progress=not quiet, mesh=mesh)
    if getattr(args, "adapter", None):
        model = load_adapter(model, args.adapter)
    log(f"loaded {model.path} in {time.perf_counter() - t0:.1f}s", quiet)
    return model


def tokenizer_for(model: Model) -> Tokenizer:
    """The checkpoint's own ``tokenizer.json`` if it has one, else the offline o200k_harmony."""
    return load_tokenizer(model.path or None)

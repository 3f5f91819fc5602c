"""``python -m gptoss_jax.generate``: chat with (or continue text from) a gpt-oss checkpoint.

    python -m gptoss_jax.generate --checkpoint openai/gpt-oss-20b --prompt "Hi" --reasoning-effort low
    python -m gptoss_jax.generate --checkpoint DIR --raw --prompt "Once upon a time"
    python -m gptoss_jax.generate --checkpoint DIR --prompt-ids 200006,17360,200008 --json
    python -m gptoss_jax.generate --checkpoint DIR            # interactive multi-turn chat
    python -m gptoss_jax.generate --checkpoint DIR --prompt "2**100?" --python subprocess
    python -m gptoss_jax.generate --checkpoint DIR --prompt "A user record" --json-schema user.json
    python -m gptoss_jax.generate --checkpoint DIR --raw --prompt "Date:" --regex "[0-9]{4}-[0-9]{2}"

Thin CLI over :func:`gptoss_jax.inference.api.generate_stream` and :mod:`gptoss_jax.chat`; with
built-in tools (``--browser``, ``--python``, ``--tool-server``) the chat runs the tool loop
(:mod:`gptoss_jax.cli.tool_chat`). Bad arguments give a one-line error and exit code 2
(``cli.common``), a schema, regex or grammar that cannot be enforced included (checked before
the model loads). With a chat prompt the output format constrains the final answer (reasoning
stays free); with ``--raw`` / ``--prompt-ids`` that open no assistant turn, the continuation
itself. """

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from gptoss_jax.chat import parse, render
from gptoss_jax.chat.render import EFFORTS
from gptoss_jax.cli import common, tool_chat
from gptoss_jax.cli.common import UsageError
from gptoss_jax.inference import api
from gptoss_jax.inference import engine as sampler
from gptoss_jax.inference.constraints import ConstraintError, Lark, Regex, generate_constraint
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.inference.slot_constraints import is_harmony_prompt

PROG = "python -m gptoss_jax.generate"


def build_parser() -> argparse.ArgumentParser:
    p = common.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--prompt", help="user message (chat) or text (--raw); omit for interactive chat")
    p.add_argument("--prompt-ids", help="comma-separated token ids fed as-is (no chat format)")
    p.add_argument("--raw", action="store_true", help="plain-text continuation, no chat format")
    p.add_argument("--system", help="developer instructions for the chat")
    p.add_argument("--reasoning-effort", default="medium", help="low | medium | high")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-reasoning", action="store_true", help="print the analysis channel")
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, channels, timings)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="FILE_OR_JSON",
                     help="constrain the answer to this JSON Schema (a file, or the JSON itself)")
    fmt.add_argument("--regex", metavar="R", help="constrain the answer to this regular expression")
    fmt.add_argument("--grammar", metavar="FILE", help="constrain the answer to this Lark grammar (llguidance)")
    p.add_argument("--json-whitespace", default="compact", choices=("compact", "flexible"),
                   help="JSON layout under --json-schema: no whitespace between tokens, or any")
    common.add_model_args(p)
    common.add_tool_args(p)
    common.add_serving_args(p)
    return p


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path!r}: {e.strerror}") from None


def response_format_of(args):
    """The output format the flags ask for (None, a JSON Schema dict, ``Regex`` or ``Lark``),
    compiled once to check it: a bad one is a UsageError naming its flag."""
    if args.json_schema is not None:
        flag, text = "--json-schema", args.json_schema
        if os.path.isfile(text):
            text = _read(text, flag)
        try:
            fmt = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--json-schema: neither a file nor JSON ({e})") from None
        if not isinstance(fmt, dict):
            raise UsageError(f"--json-schema: a schema is a JSON object, got {type(fmt).__name__}")
        fmt = {"type": "json_schema", "name": "response", "schema": fmt, "strict": True}
    elif args.regex is not None:
        flag, fmt = "--regex", Regex(args.regex)
    elif args.grammar is not None:
        flag, fmt = "--grammar", Lark(_read(args.grammar, "--grammar"))
    else:
        return None
    try:
        generate_constraint(fmt, harmony=not args.raw and args.prompt_ids is None,
                            whitespace=args.json_whitespace)
    except ConstraintError as e:
        raise UsageError(f"{flag}: {e.message}") from None
    return fmt


def check_args(args) -> None:
    if args.reasoning_effort not in EFFORTS:
        raise UsageError(f"--reasoning-effort must be one of {', '.join(EFFORTS)}, "
                         f"got {args.reasoning_effort!r}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.min_p < 1:
        raise UsageError(f"--min-p must be in [0, 1), got {args.min_p}")
    common.check_model_args(args)
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.prompt is not None and args.prompt_ids is not None:
        raise UsageError("give either --prompt or --prompt-ids, not both")
    if args.prompt_ids is not None:
        try:
            args.prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        if not args.prompt_ids:
            raise UsageError("--prompt-ids is empty")
    if args.raw and args.prompt is None and args.prompt_ids is None:
        raise UsageError("--raw needs --prompt (interactive mode is a chat)")
    common.check_tool_args(args)
    if (args.browser or args.python or args.tool_server) and (args.raw or args.prompt_ids is not None):
        raise UsageError("--browser, --python and --tool-server need the chat, not --raw or --prompt-ids")
    args.response_format = response_format_of(args)
    if args.response_format is not None and (args.browser or args.python or args.tool_server):
        raise UsageError("--json-schema, --regex and --grammar constrain a plain answer: not "
                         "with --browser, --python or --tool-server")


MULTIHOST_CONTEXT = 16384  # a multi-host chat's engine is fixed up front (every process builds it)


def multihost_engine(model, channel) -> sampler.Engine:
    """The engine of a multi-host run: the same on every process, made before any prompt."""
    return sampler.Engine(model, max_batch=1, channel=channel,
                          max_len=min(model.config.max_position_embeddings, MULTIHOST_CONTEXT))


class Session:
    """One model + engine; runs a prompt and reports timings. The engine is kept across turns
    (a chat's next prompt reuses the KV of the conversation so far) and made larger when a
    prompt needs it, unless it was given (multi-host: fixed)."""

    def __init__(self, model, args, engine=None):
        self.model, self.args = model, args
        self.engine, self.fixed = engine, engine is not None
        self.timings: dict = {}
        self.error: str | None = None  # why the last run's output constraint failed

    def run(self, prompt_ids: list[int], on_token) -> tuple[list[int], str, dict, str | None]:
        """The whole reply: ``(tokens, finish_reason, timings, error)`` (error: why an output
        constraint failed, for finish reason "error")."""
        tokens, reason = [], "length"
        for token, finish in self.stream(prompt_ids, self.args.max_new_tokens):
            if token is not None:
                tokens.append(token)
                on_token(token)
            reason = finish or reason
        return tokens, reason, self.timings, self.error

    def stream(self, prompt_ids: list[int], max_new_tokens: int):
        """``(token, finish_reason)`` as they are generated (token None only on an "error"
        event: ``error`` says why); ``timings`` describes the run after."""
        a, c = self.args, self.model.config
        limit = self.engine.max_len if self.fixed else c.max_position_embeddings
        if len(prompt_ids) + max_new_tokens > limit:
            raise UsageError(f"prompt of {len(prompt_ids)} tokens + --max-new-tokens "
                             f"{max_new_tokens} exceeds the context of {limit} tokens")
        need = sampler.bucket(len(prompt_ids) + max_new_tokens)
        if self.engine is None or self.engine.max_len < len(prompt_ids) + max_new_tokens:
            self.engine = sampler.Engine(self.model, max_batch=1,
                                         max_len=min(max(need, 1024), c.max_position_embeddings))
        if not a.json:
            print("compiling...", end="", file=sys.stderr, flush=True)
        compile_s = self.engine.compile(len(prompt_ids), sampling=SamplingParams(
            temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p, seed=a.seed),
            constrained=a.response_format is not None)
        if not a.json:
            print(f" {compile_s:.1f}s", file=sys.stderr, flush=True)
        tokens, t_first = [], None
        self.error = None
        t0 = time.perf_counter()
        for ev in api.generate_stream(
                self.model, [prompt_ids], max_new_tokens=max_new_tokens,
                temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                seed=a.seed, engine=self.engine, response_format=a.response_format,
                json_whitespace=a.json_whitespace):
            if t_first is None:
                t_first = time.perf_counter() - t0
            self.error = ev.error
            if ev.token is not None:
                tokens.append(ev.token)
            yield ev.token, ev.finish_reason
        total = time.perf_counter() - t0
        decode = total - t_first
        self.timings = {"prompt_tokens": len(prompt_ids), "new_tokens": len(tokens),
                        "compile_s": round(compile_s, 3),
                        "time_to_first_token_s": round(t_first, 4), "decode_s": round(decode, 4),
                        "decode_tokens_per_s": (round((len(tokens) - 1) / decode, 2)
                                                if len(tokens) > 1 and decode > 0 else None)}


def _report_turn(t: dict, quiet: bool) -> None:
    rate = t.get("decode_tokens_per_s")
    common.log(f"[{t['model_calls']} model call(s), {t.get('new_tokens', 0)} new tokens, decode "
               f"{rate if rate is not None else '-'} tok/s]", quiet)


def _report(t: dict, quiet: bool) -> None:
    rate = t["decode_tokens_per_s"]
    common.log(f"[{t['prompt_tokens']} prompt tokens, first token after {t['time_to_first_token_s']:.2f}s, "
         f"{t['new_tokens']} new tokens, decode {rate if rate is not None else '-'} tok/s]", quiet)


def run_once(args, model, engine=None) -> int:
    tok = common.tokenizer_for(model)
    chat = not args.raw and args.prompt_ids is None
    if args.prompt_ids is not None:
        prompt_ids = args.prompt_ids
    elif args.raw:
        prompt_ids = tok.encode(args.prompt)
    else:
        prompt_ids = render.render_prompt([{"role": "user", "content": args.prompt}],
                                          reasoning_effort=args.reasoning_effort,
                                          instructions=args.system)
    bad = [t for t in prompt_ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise UsageError(f"prompt token {bad[0]} is outside the model's vocabulary "
                         f"({model.config.vocab_size})")
    if args.response_format is not None and not args.raw and args.prompt_ids is not None:
        chat = is_harmony_prompt(prompt_ids)  # ids that open an assistant turn: a whole turn
    session = Session(model, args, engine)
    stream = parse.ReplyStream() if chat else None
    printer = _Printer(args, tok, stream)
    tokens, reason, timings, error = session.run(prompt_ids, printer.on_token)
    printer.close()
    reply = parse.parse_reply(tokens) if chat else None
    if error is not None:
        common.log(f"{PROG}: the output constraint failed: {error}")
    if args.json:
        out = {"prompt_tokens": prompt_ids, "tokens": tokens, "text": tok.decode(tokens),
               "finish_reason": reason, "timings": timings}
        if error is not None:
            out["error"] = error
        if reply is not None:
            out["channels"] = {"analysis": reply.analysis, "final": reply.final,
                               "commentary": reply.commentary,
                               "tool_calls": [{"name": c.name, "arguments": c.arguments}
                                              for c in reply.tool_calls],
                               "error": reply.error}
        print(json.dumps(out, ensure_ascii=False))
    _report(timings, args.json)
    return 1 if error is not None else 0


class _Printer:
    """Streams text to stdout as tokens arrive: the final channel (and analysis if asked)."""

    def __init__(self, args, tok, stream):
        self.args, self.tok, self.stream = args, tok, stream
        self.pending: list[int] = []
        self.channel = None
        self.tokens: list[int] = []
        self.shown = False

    def on_token(self, token: int) -> None:
        self.tokens.append(token)
        if self.args.json:
            if self.stream:
                self.stream.feed(token)
            return
        if self.stream is None:
            self.pending.append(token)
            text = self.tok.decode(self.pending)
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                sys.stdout.write(text)
                sys.stdout.flush()
                self.pending = []
            return
        for ev in self.stream.feed(token):
            if isinstance(ev, parse.TextDelta):
                show = ev.channel in (None, "final") or (self.args.show_reasoning and ev.channel == "analysis")
                if show:
                    if ev.channel != self.channel:
                        if self.channel is not None:
                            sys.stdout.write("\n")
                        if ev.channel == "analysis":
                            sys.stdout.write("[reasoning] ")
                        self.channel = ev.channel
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                    self.shown = True
            elif isinstance(ev, parse.ToolCallStart):
                sys.stdout.write(f"\n[tool call {ev}]\n")

    def close(self) -> None:
        if not self.args.json:
            if self.stream is None and self.pending:
                sys.stdout.write(self.tok.decode(self.pending))
            if self.stream is not None and not self.shown:
                reply = self.stream.reply
                why = f" ({reply.error})" if reply.error else ""
                hidden = " (reasoning only; --show-reasoning prints it)" if reply.analysis else ""
                sys.stdout.write(f"[no final answer in the harmony format{why}{hidden}; raw text: "
                                 f"{self.tok.decode(self.tokens)!r}]")
            sys.stdout.write("\n")
            sys.stdout.flush()


def interactive(args, model, engine=None) -> int:
    """Multi-turn chat; history kept, past reasoning dropped (render.render_prompt does that)."""
    tok = common.tokenizer_for(model)
    session = Session(model, args, engine)
    history: list = []
    print("Interactive chat. Empty line or Ctrl-D to quit.", file=sys.stderr)
    for line in common.chat_lines(lambda: session.engine):
        history.append({"role": "user", "content": line})
        prompt = render.render_prompt(history, reasoning_effort=args.reasoning_effort,
                                      instructions=args.system)
        stream = parse.ReplyStream()
        printer = _Printer(args, tok, stream)
        try:
            tokens, _, timings, error = session.run(prompt, printer.on_token)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        printer.close()
        reply = parse.parse_reply(tokens)
        if error is not None:
            print(f"[the output constraint failed: {error}]", file=sys.stderr)
        if reply.error:
            print(f"[note: the reply did not parse cleanly: {reply.error}]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.final, "thinking": reply.analysis or None})
        _report(timings, False)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_args(args)
        toolbox = common.build_toolbox(args)  # before loading: a backend that cannot start fails fast
        mesh = common.setup_mesh(args)
        leader = jax.process_index() == 0
        model = common.load_model(args, mesh=mesh, quiet=args.json or not leader)
        channel = common.channel_for(args)
        engine = None if channel is None else multihost_engine(model, channel)
        if not leader:  # a follower runs process 0's steps (it reads the prompts) until it stops
            engine.follow()
            return 0
        try:
            if toolbox is not None:
                return tool_chat.run_chat(Session(model, args, engine), toolbox, args, report=_report_turn)
            chat = interactive if args.prompt is None and args.prompt_ids is None else run_once
            return chat(args, model, engine)
        finally:
            if engine is not None:
                engine.close()

    return common.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())

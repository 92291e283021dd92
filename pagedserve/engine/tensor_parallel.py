"""Tensor parallelism: the driver (rank 0, in the engine process) and the rank processes it starts and watches.

The driver owns everything but the other ranks' shards: scheduler, block manager, sampler, the service loop. It
starts ``tensor_parallel_size - 1`` rank processes (multiprocessing ``spawn``), and every step sends them the
step as one packed int64 tensor over a gloo broadcast (``StepChannel``); each rank runs the same ``ModelRunner``
step on its shard, the row-parallel layers all-reduce, and the logits are gathered on the driver.

Why a broadcast of one packed tensor rather than shared memory: it is the same code on one node and on many
(a shared-memory ring would need a second path across nodes), it needs no polling loop on the ranks (an idle
engine leaves them blocked in the broadcast), and a step description is a few kilobytes, so its cost is the
receiving rank being scheduled, which a shared-memory flag would not avoid either (docs/benchmarks.md). The
header (sizes) goes first as a fixed 12-integer broadcast, then the body.

Lifecycle invariants:
  * Start-up: each rank loads its shard and reports its KV pool size (or its error) over its own pipe; the
    driver fails fast with the first rank's error or exit, else sends every rank the smallest pool size, and
    then all join the process group. A rank that cannot start never leaves the driver waiting on a collective.
  * A rank dies with the driver, also on SIGKILL of the driver: ``PR_SET_PDEATHSIG`` plus a watchdog thread
    that polls the parent pid.
  * A rank that dies, or takes no part in a step for ``COLLECTIVE_TIMEOUT_S`` (stopped, hung), or a step that
    fails on the driver's side of a collective makes that step and every later one raise ``EngineDeadError``
    (the ranks' state is no longer known to agree, so the engine cannot go on), and the ranks are killed then.
  * Messages on the pipes are JSON; nothing is pickled after the processes start.
  * A rank logs in the driver's format: JSON lines when the driver's are JSON (a service worker's), else text.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Connection, wait
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.cpu_threads import omp_places, pinned_cpus, rank_share
from pagedserve.engine.errors import EngineDeadError
from pagedserve.engine.model_runner import ModelRunner, StepPlan
from pagedserve.engine.parallel_layers import TensorParallelGroup

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a large shard from a network disk takes minutes
# How long the driver waits for the other ranks in any collective of a step (the step broadcast included): a rank
# that is alive but takes no part (stopped, hung) fails the step after this long. The ranks run the same step in
# lockstep, so the wait is their skew, not a step's length: a long prefill does not come near it.
COLLECTIVE_TIMEOUT_S = 300.0
IDLE_TIMEOUT = timedelta(days=365)  # a rank waits for the driver's next step as long as the engine idles
STOP_JOIN_S = 10.0
HEADER_LEN = 12
_STEP, _STOP = 1, 0


# ------------------------------------------------------------------------------------------ step channel
class StepChannel:
    """The driver's step plans to every rank: a 12-integer header broadcast, then one packed int64 body.

    Header: kind, tokens, sequences, block-table width, sample rows, swap-outs, swap-ins, copies, decode_only,
    body length, the leading decodes of a mixed step. Body: input ids, positions, slots (one each per token), cu_seqlens_q, seq_lens, block tables
    (row-major), sample rows, then the (src, dst) pairs of the three block-op lists.
    """

    def __init__(self, group) -> None:
        self.group = group
        self.seconds = 0.0  # host time the driver spent sending (for the benchmark)
        self.steps = 0

    def send(self, plan: StepPlan) -> None:
        t = time.perf_counter()
        parts = [plan.input_ids, plan.positions, plan.slot_mapping, plan.cu_seqlens_q, plan.seq_lens,
                 plan.block_tables.ravel(), plan.sample_rows, plan.swap_out, plan.swap_in, plan.copies]
        body = np.concatenate([np.asarray(p, dtype=np.int64).ravel() for p in parts])
        num_seqs, width = plan.block_tables.shape if len(plan.seq_lens) else (0, 0)
        header = torch.tensor([_STEP, len(plan.input_ids), num_seqs, width, len(plan.sample_rows),
                               len(plan.swap_out), len(plan.swap_in), len(plan.copies), int(plan.decode_only),
                               body.size, plan.num_decodes, 0], dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        dist.broadcast(torch.from_numpy(body), 0, group=self.group)
        self.seconds += time.perf_counter() - t
        self.steps += 1

    def send_stop(self) -> None:
        dist.broadcast(torch.zeros(HEADER_LEN, dtype=torch.int64), 0, group=self.group)

    def recv(self) -> StepPlan | None:
        """The next step's plan (on a rank other than 0), or None when the driver stops."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        kind, tokens, seqs, width, samples, outs, ins, copies, decode_only, size, decodes = header[:11].tolist()
        if kind == _STOP:
            return None
        body = torch.empty(size, dtype=torch.int64)
        dist.broadcast(body, 0, group=self.group)
        arr = body.numpy()
        cuts = np.cumsum([tokens, tokens, tokens, seqs + 1, seqs, seqs * width, samples,
                          2 * outs, 2 * ins, 2 * copies])
        ids, pos, slots, cu, lens, tables, rows, out, inn, cp, _ = np.split(arr, cuts)
        pairs = lambda a: [tuple(p) for p in a.reshape(-1, 2).tolist()]  # noqa: E731
        return StepPlan(ids, pos, slots, cu, lens, tables.reshape(seqs, width), bool(decode_only), rows,
                        pairs(out), pairs(inn), pairs(cp), num_decodes=decodes)


# ------------------------------------------------------------------------------------------ rank process
def _die_with_parent(parent_pid: int) -> None:
    """Exit when the driver does, even on its SIGKILL: the kernel's parent-death signal, and a thread polling
    the parent pid for where that signal cannot be set or the parent died before it was."""
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger): alive, but it runs nothing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _utc_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _JsonLines(logging.Formatter):
    """One JSON object per record, with the keys of the service's JSON log (timestamp, level, logger, event) and
    the rank; a traceback is one field, ``exception``, so that a log collector keeps it with its line."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        line = {"timestamp": _utc_iso(record.created),
                "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage(),
                "rank": self.rank}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def _configure_rank_logging(rank: int, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines(rank) if log_format == "json" else logging.Formatter(
        f"%(asctime)s tp-rank{rank} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _driver_log_format() -> str:
    """``json`` when this process writes the engine's log records as JSON objects (a service worker set to log
    JSON), else ``text``: what the handlers make of a probe record tells, so the engine need not know who set
    them up."""
    probe = logging.LogRecord(log.name, logging.INFO, __file__, 0, "probe", None, None)
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            try:
                if isinstance(json.loads(handler.format(probe)), dict):
                    return "json"
            except Exception:  # a handler's formatter that cannot take the probe, or text that is not JSON
                continue
        logger = logger.parent if logger.propagate else None
    return "text"


def _send(conn: Connection, **msg) -> None:
    conn.send_bytes(json.dumps(msg).encode())


def _recv(conn: Connection) -> dict:
    return json.loads(conn.recv_bytes())


def _init_groups(tp: TensorParallelGroup, device: torch.device, init_method: str, step_timeout: timedelta):
    """Join the process group (NCCL between GPUs, gloo on the CPU); return the gloo group steps travel on.

    The step channel has its own gloo group, whose timeout each process sets for itself: the driver's is
    ``COLLECTIVE_TIMEOUT_S`` (gloo's root waits for every receiver, so a stopped rank would hold the driver's
    send for ever), the ranks' ``IDLE_TIMEOUT`` (an idle engine leaves them waiting in its broadcast).
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=tp.rank, world_size=tp.size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    tp.group = dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=step_timeout)


def _rank_main(rank: int, size: int, config: dict, model_dir: str, hf_config: dict, max_model_len: int,
               max_num_batched_tokens: int, init_method: str, conn: Connection, parent_pid: int,
               log_format: str) -> None:
    """A rank process: load the shard, agree on the pool, then run every step the driver sends until it stops."""
    # Ctrl-C and a service manager's stop signal the whole process group: the driver alone decides (it drains,
    # then stops its ranks; they die with it in any case).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    _configure_rank_logging(rank, log_format)
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    tp = TensorParallelGroup(rank, size)
    group = None

    def agree(num_blocks: int) -> int:
        nonlocal group
        _send(conn, num_gpu_blocks=num_blocks)
        agreed = _recv(conn)["num_gpu_blocks"]
        group = _init_groups(tp, torch.device(cfg.device), init_method, IDLE_TIMEOUT)
        return agreed

    try:
        cfg = EngineConfig(**config)
        torch.manual_seed(cfg.seed)
        # The driver's parsed config as attributes: the rank need not import transformers (seconds per start).
        runner = ModelRunner(cfg, model_dir, SimpleNamespace(**hf_config), max_model_len, max_num_batched_tokens,
                             tp=tp, agree_num_blocks=agree)
        channel = StepChannel(group)
        log.info("tensor-parallel rank %d of %d ready on %s", rank, size, cfg.device)
        while (plan := channel.recv()) is not None:
            runner.execute_plan(plan)
    except BaseException as exc:
        log.exception("tensor-parallel rank %d failed", rank)
        try:
            _send(conn, error=f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        os._exit(1)  # no clean-up that could wait on a collective the others will never join
    log.info("tensor-parallel rank %d stopped", rank)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the driver
RENDEZVOUS_PREFIX = "pagedserve-tp-"


def _remove_stale_rendezvous() -> None:
    """Remove the rendezvous directories of drivers that are gone: one that ended without ``close()`` (SIGKILL,
    SIGTERM without a handler) left its directory behind. Each name carries its driver's pid."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(RENDEZVOUS_PREFIX):
            continue
        pid = name.removeprefix(RENDEZVOUS_PREFIX).split("-", 1)[0]
        if not pid.isdigit():  # an older engine's name, without its pid: whose it is cannot be told
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:  # alive, under another user
            pass


def _weak_close(runner: TensorParallelRunner):
    """``runner.close`` without a reference that would keep a dropped runner alive."""
    ref = weakref.ref(runner)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    return close


@contextlib.contextmanager
def _started_on(cpus: tuple[int, ...] | None):
    """Processes started inside run on ``cpus`` (one OpenMP place each), when the driver is pinned: a child
    takes the starting thread's affinity, which OpenMP has narrowed to the driver's first place."""
    if cpus is None:
        yield
        return
    affinity, places = os.sched_getaffinity(0), os.environ.get("OMP_PLACES")
    os.environ["OMP_PLACES"] = omp_places(cpus)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, affinity)
        os.environ["OMP_PLACES"] = places


@contextlib.contextmanager
def _born_ignoring_sigint():
    """Processes started inside ignore Ctrl-C from their first instruction (an ignored signal stays ignored
    across exec), not only once ``_rank_main`` runs: a Ctrl-C while they import printed a rank's traceback beside
    the driver's. Only the main thread may set a handler; elsewhere the driver gets no SIGINT anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if before is not None:  # None: set outside Python, and not ours to put back
            signal.signal(signal.SIGINT, before)


def _check_main_importable() -> None:
    """``spawn`` starts each rank by running this program's main module again: one read from stdin (``python -
    < script.py``) has no file to run, and the rank failed after the driver's load, its reason only in its own
    traceback. Said at once instead."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is not None and getattr(main, "__spec__", None) is None and not os.path.exists(path):
        raise RuntimeError(f"tensor_parallel_size: each rank starts by running this program's main module again, "
                           f"and {path!r} is no file (a script read from stdin?): run it from a file, under "
                           "if __name__ == \"__main__\":")


# A rank's exit status when it was about to make an engine of its own (below); the driver names the cause.
UNGUARDED_MAIN_EXIT = 78
UNGUARDED_MAIN = ("each rank starts by running this program's main module again, and the module makes an LLM when "
                  "imported (no if __name__ == \"__main__\": guard around it): put the code that makes and uses the "
                  "LLM under that guard")


def exit_if_made_by_a_rank() -> None:
    """A rank process that is still importing the program's main module (``spawn``'s preparation) and makes a
    tensor-parallel engine there: the script makes one at import, without a ``__main__`` guard. Without this the
    rank loaded the tokenizer, then failed in multiprocessing's bootstrapping check with two tracebacks, and the
    driver said only "exited with code 1". One line on stderr, and an exit status the driver names."""
    if getattr(mp.current_process(), "_inheriting", False):
        sys.stderr.write(f"pagedserve tensor-parallel rank: {UNGUARDED_MAIN}\n")
        sys.stderr.flush()
        os._exit(UNGUARDED_MAIN_EXIT)


def _no_engine() -> None:
    return None


# The process's tensor-parallel driver (torch has one default process group per process), weakly: a dead one
# still holding the group is closed when a new one starts.
_engine_of_process: Callable[[], TensorParallelRunner | None] = _no_engine


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner: starts and supervises the other ranks and sends each step to them first."""

    def __init__(self, config: EngineConfig, model_dir: str, hf_config, max_model_len: int,
                 max_num_batched_tokens: int) -> None:
        global _engine_of_process
        size = config.tensor_parallel_size
        _check_main_importable()
        held = _engine_of_process() if dist.is_initialized() else None
        if held is not None and held.dead:  # its group is all that is left of it: "make a new one" must work
            held.close()
        if dist.is_initialized():  # torch has one default process group per process
            raise RuntimeError("tensor_parallel_size: another tensor-parallel engine is running in this process; "
                               "close it first (llm.close()): one at a time per process")
        self._tp = TensorParallelGroup(0, size)
        self._procs: list[mp.Process] = []
        self._conns: list[Connection] = []
        self._dead: EngineDeadError | None = None
        self._closed = False
        _engine_of_process = weakref.ref(self)
        # At interpreter exit multiprocessing joins its children before any finalizer of ours runs, and a rank
        # ignores SIGTERM: a script that never called close() (or ended in an exception) would wait for ever.
        # atexit runs its callbacks last-registered first, so this one runs before multiprocessing's.
        self._close_at_exit = _weak_close(self)
        atexit.register(self._close_at_exit)
        self.channel: StepChannel | None = None
        self._threads = torch.get_num_threads()
        # The ranks meet through a file in a private directory: torch's TCP store would listen on every
        # interface, unauthenticated, for the engine's life (ranks share one machine; no port is needed).
        _remove_stale_rendezvous()
        self._rendezvous = tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{os.getpid()}-")
        init_method = f"file://{os.path.join(self._rendezvous, 'store')}"
        ctx = mp.get_context("spawn")
        # Each rank is its own engine process config-wise: its device, the driver's dtype (the rank's config
        # carries no torch dtype), and no further ranks of its own.
        dtype = config.torch_dtype(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None))
        hf_dict = hf_config.to_dict()
        log_format = _driver_log_format()
        pinned = pinned_cpus() if config.torch_device.type == "cpu" else None
        for rank in range(1, size):
            rank_config = dataclasses.asdict(dataclasses.replace(
                config, device=config.rank_device(rank), dtype=str(dtype).removeprefix("torch."),
                tensor_parallel_size=1, seed=torch.initial_seed()))  # the engine's seed, drawn if it had none
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_main, name=f"pagedserve-tp-rank{rank}", daemon=True,
                args=(rank, size, rank_config, str(model_dir), hf_dict, max_model_len,
                      max_num_batched_tokens, init_method, theirs, os.getpid(), log_format))
            with _started_on(None if pinned is None else rank_share(pinned, rank, size)), _born_ignoring_sigint():
                proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
        log.info("tensor-parallel: started ranks 1..%d (pids %s)", size - 1, [p.pid for p in self._procs])
        tp = self._tp

        def agree(num_blocks: int) -> int:
            agreed = min([num_blocks, *self._wait_ready()])
            for conn in self._conns:
                _send(conn, num_gpu_blocks=agreed)
            self.channel = StepChannel(_init_groups(tp, config.torch_device, init_method,
                                                    timedelta(seconds=COLLECTIVE_TIMEOUT_S)))
            return agreed

        if config.torch_device.type == "cpu":
            torch.set_num_threads(max(1, self._threads // size))  # the ranks share this machine's cores
        try:
            super().__init__(config, model_dir, hf_config, max_model_len, max_num_batched_tokens, tp=tp,
                             agree_num_blocks=agree)
        except BaseException:
            self.close()
            raise
        log.info("tensor-parallel: %d ranks ready, %d KV blocks each", size, self.num_gpu_blocks)

    @property
    def rank_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _wait_ready(self) -> list[int]:
        """Every other rank's KV pool size, or the first failure: a rank's error, its exit, or the timeout."""
        blocks: dict[int, int] = {}
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(blocks) < len(self._procs):
            waiting = [r for r in range(len(self._procs)) if r not in blocks]
            left = deadline - time.monotonic()
            if left <= 0 or not wait([self._conns[r] for r in waiting] + [self._procs[r].sentinel for r in waiting],
                                     timeout=left):
                raise RuntimeError(f"tensor-parallel: ranks {[r + 1 for r in waiting]} not ready after "
                                   f"{START_TIMEOUT_S:.0f} s")
            for r in waiting:
                msg = self._poll(r)
                if msg is not None and "num_gpu_blocks" in msg:
                    blocks[r] = msg["num_gpu_blocks"]
                elif msg is not None or self._procs[r].exitcode is not None:
                    raise RuntimeError(f"tensor-parallel rank {r + 1} failed to start: "
                                       f"{self._describe(r, msg)}")
        return list(blocks.values())

    def _poll(self, r: int, timeout: float = 0.0) -> dict | None:
        """Rank ``r + 1``'s next message, {} if its pipe closed, None if it said nothing."""
        conn = self._conns[r]
        try:
            return _recv(conn) if conn.poll(timeout) else None
        except (EOFError, OSError):
            return {}

    def _describe(self, r: int, msg: dict | None) -> str:
        if msg and "error" in msg:
            return msg["error"]
        proc = self._procs[r]
        proc.join(1.0)
        if proc.exitcode == UNGUARDED_MAIN_EXIT:
            return UNGUARDED_MAIN
        return f"exited with code {proc.exitcode}" if proc.exitcode is not None else "closed its pipe"

    @property
    def dead(self) -> bool:
        """A step failed, or a rank has exited: no step can run on this engine again."""
        return self._dead is not None or any(proc.exitcode is not None for proc in self._procs)

    # ---------------------------------------------------------------------------------------- per step
    def check_alive(self) -> None:
        """Raise ``EngineDeadError`` once a rank has exited (or a step failed), or the engine was closed: no step
        could run."""
        if self._closed:  # its ranks exited as told: say so rather than report the exit of rank 1
            raise EngineDeadError("tensor-parallel engine was closed (close()): make a new one")
        if self._dead is not None:
            raise self._dead
        for r, proc in enumerate(self._procs):
            if proc.exitcode is not None:
                self._dead = EngineDeadError(f"tensor-parallel rank {r + 1} {self._describe(r, self._poll(r))}")
                raise self._dead

    def execute_plan(self, plan: StepPlan, pending_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        # The ranks never see the driver's sampled tokens: every input token is known before a step is sent
        # (the engine reads tokens back at once with more than one rank, ``LLMEngine.async_scheduling``).
        assert not plan.pending_rows, "a tensor-parallel step cannot take its input from the device"
        self.check_alive()
        start = time.monotonic()
        try:
            self.channel.send(plan)
            return super().execute_plan(plan)
        except Exception as exc:
            self._dead = self._failure(exc, timed_out=time.monotonic() - start >= COLLECTIVE_TIMEOUT_S)
            self._stop_ranks(healthy=False)  # each holds a shard of the weights and of the KV pool, for nothing
            raise self._dead from exc
        except BaseException as exc:  # KeyboardInterrupt: the ranks are left inside this step's collectives
            self._dead = EngineDeadError(f"tensor-parallel step interrupted on rank 0 ({type(exc).__name__}): "
                                         "the ranks are out of step; make a new engine")
            self._stop_ranks(healthy=False)
            raise

    def _failure(self, exc: Exception, timed_out: bool) -> EngineDeadError:
        """What took the step down: the first rank that died or reported an error; else, when the driver's wait
        ran out, the ranks that took no part (the stopped ones, else any of them); else the driver's error."""
        deadline = time.monotonic() + 2.0  # a dying rank's exit and message lag the broken collective a little
        while time.monotonic() < deadline:
            # A rank killed by a signal first: the others then fail on the broken connection, and say so.
            killed = [r for r, proc in enumerate(self._procs) if (proc.exitcode or 0) < 0]
            for r in killed + [r for r in range(len(self._procs)) if r not in killed]:
                msg = self._poll(r)
                if self._procs[r].exitcode is not None or msg:
                    return EngineDeadError(f"tensor-parallel rank {r + 1} {self._describe(r, msg)}")
            time.sleep(0.05)
        if timed_out:
            stopped = [r + 1 for r, proc in enumerate(self._procs) if _is_stopped(proc.pid)]
            if len(stopped) == 1:
                who = f"rank {stopped[0]} is stopped"
            elif stopped:
                who = f"ranks {', '.join(map(str, stopped))} are stopped"
            else:
                who = "rank 1 hangs" if len(self._procs) == 1 else f"one of ranks 1-{len(self._procs)} hangs"
            return EngineDeadError(f"tensor-parallel {who}: no part in a step for {COLLECTIVE_TIMEOUT_S:.0f} s "
                                   "(COLLECTIVE_TIMEOUT_S); the ranks were killed, make a new engine")
        return EngineDeadError(f"tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}")

    @property
    def comm_seconds(self) -> float:
        """Driver-side host time in communication: step broadcasts, all-reduces and the logits gather."""
        return self.tp.comm_seconds + (self.channel.seconds if self.channel else 0.0)

    # ---------------------------------------------------------------------------------------- shutdown
    def __del__(self) -> None:
        # A dropped engine (``del llm``) stops its ranks then, not at this process's exit: each holds a shard of
        # the weights and of the KV pool. Nothing may escape a finalizer, least of all at interpreter shutdown.
        try:
            self.close()
        except Exception:
            pass

    def _stop_ranks(self, healthy: bool) -> None:
        """Wait for ranks sent the stop message; kill the rest (and any still running after the wait)."""
        for proc in self._procs:
            proc.join(STOP_JOIN_S if healthy else 0.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join(STOP_JOIN_S)

    def close(self) -> None:
        """Stop the ranks (a stop message when they are healthy, else SIGKILL) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        # Healthy ranks stop on the message; ranks still starting, or after a failure, are killed at once.
        healthy = self.channel is not None and self._dead is None and all(p.exitcode is None for p in self._procs)
        if healthy:
            try:
                self.channel.send_stop()
            except Exception:
                log.warning("tensor-parallel: stop message not delivered; killing the ranks")
                healthy = False
        self._stop_ranks(healthy)
        for conn in self._conns:
            conn.close()
        if self._tp.group is not None:  # this runner joined the process group
            dist.destroy_process_group()
            self._tp.group = None
        shutil.rmtree(self._rendezvous, ignore_errors=True)
        torch.set_num_threads(self._threads)
        log.info("tensor-parallel: ranks stopped")

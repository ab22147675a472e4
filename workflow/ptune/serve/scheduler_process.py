"""The continuous-batching scheduler (serve/batching.py) in a process of its own, for `ptune serve` on a CPU.

In one process the HTTP server's event loop and the scheduler take turns at the GIL: on a small model, where a
decoding step is mostly Python, every request's parsing, routing and answer (and every streamed event) is time the
model stands still. Here a child process runs the `Scheduler` on the server's own model, whose weights it maps from
shared memory (torch.multiprocessing's pickling: no copy), with the tokenizer (for stop strings); the server sends each
request's prompt ids and settings and receives, once per decoding step, the step's tokens (with their
log-probabilities, for the rows that asked) and the rows that ended. A cancel is sent at once; the child
drops the row before its next step, as in one process.

The child is spawned (a fresh interpreter: forking a process that has run torch's thread pools is not safe) and
spends a few seconds importing torch and transformers; `Child` starts it before the server loads the model, so
that both happen at once. This module imports neither at its top, so that starting the child costs the server
nothing.

The child may die (the kernel's OOM killer picks the process with the most memory of its own): its rows in flight
then fail, every later `submit` raises `Ended`, and `on_end` is called once, after which the engine decodes in a
thread (Engine._fall_back). The reader thread is the only way answers come back, so nothing a row's callbacks raise
may end it: such a row fails alone (`_hand_over`).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PtuneError

if TYPE_CHECKING:
    import torch

    from .batching import Row

log = logging.getLogger(__name__)

PROCESS_ENV = "PTUNE_SERVE_PROCESS"
# What the engine does once the process has ended (killed, say by the OOM killer): a thread takes over (the
# default), or nothing does and the server answers 503, /health included, for a supervisor to restart it.
FALLBACK_ENV = "PTUNE_SERVE_FALLBACK"
THREAD, NONE = "thread", "none"


class Ended(RuntimeError):
    """The scheduler's process has ended: nothing more can be submitted to it."""

    def __init__(self, exitcode: int | None):
        super().__init__(f"the scheduler's process has ended (exit code {exitcode})")


def in_a_process(device: "torch.device", *modules) -> bool:
    """Whether the engine runs its scheduler in a child process (SchedulerProcess): on a CPU, where the weights fit
    twice in /dev/shm, unless $PTUNE_SERVE_PROCESS is 0 (on a GPU the kernels run apart from Python already)."""
    if device.type != "cpu" or not wanted():
        return False
    shm = Path("/dev/shm")
    if not shm.is_dir():  # elsewhere torch shares through files; a failure to start falls back to a thread
        return True
    need = sum(t.numel() * t.element_size() for m in modules if m is not None for t in m.state_dict().values())
    return shutil.disk_usage(shm).free > 2 * need


class SchedulerProcess:
    """A `Scheduler` in a child process, with the same face to the engine (submit, cancel, counts): this side hands
    each step's tokens and ended rows to their rows' callbacks (in its reader thread), then calls `after_step`."""

    def __init__(
        self,
        model,
        encoders,
        stop_ids: Sequence[int],
        max_batch: int = 8,
        threads: int | None = None,
        after_step: Callable[[], None] | None = None,
        child: "Child | None" = None,
        on_end: Callable[[], None] | None = None,
        tokenizer=None,
    ):
        """`child`: a process started earlier (`Child`), which has imported what it needs while the model loaded
        here; else one is started now. `on_end`: called once in the reader thread if the process ends, after its
        rows in flight have failed (it must not hold the engine: the reader would keep it alive)."""
        from .batching import mergeable

        self.after_step = after_step or (lambda: None)
        self.max_batch = max(1, max_batch) if mergeable(model) else 1
        self._counts = _Counts()
        self._ready = threading.Event()  # the child has its scheduler (or has ended)
        self._gone = threading.Event()  # the reader has seen the pipe close: no row can be answered any more
        self._rows: dict[int, Row] = {}  # rows in the child, by number
        self._next = 0
        self._send_lock = threading.Lock()
        # Held, no request reaches the child (as the thread scheduler's `_cv` keeps them waiting; tests hold it).
        self._cv = threading.Condition(self._send_lock)
        import torch.multiprocessing  # noqa: F401  (registers the pickling of tensors through shared memory)

        child = child or Child()
        self._conn, self._process = child.conn, child.process
        try:
            # The weights go through shared memory (torch.multiprocessing's pickling): the child maps them, no copy.
            # Every prefix goes with it (a name's encoder, as the thread's scheduler takes them), each shared so.
            self._conn.send(("load", model, encoders, list(stop_ids), self.max_batch, threads, tokenizer))
        except BaseException:
            child.close()
            raise
        # The reader holds the rows and the connection, not this object: when the engine is dropped, the finalizer
        # tells the child to exit, and the reader ends on the closed pipe.
        self._reader = threading.Thread(
            target=_read,
            args=(
                self._conn,
                self._rows,
                self._counts,
                self.after_step,
                self._ready,
                self._gone,
                self._send_lock,
                on_end or (lambda: None),
            ),
            daemon=True,
            name="ptune-scheduler-reader",
        )
        self._reader.start()
        weakref.finalize(self, _stop, self._conn, self._send_lock, self._process)

    def wait_ready(self, timeout: float = 600) -> bool:
        """Wait until the child has loaded (about as long as importing torch and transformers): a server announces
        itself ready only then, so its first request does not wait for it. Whether the child is running."""
        self._ready.wait(timeout)
        return self._process.is_alive()

    @property
    def ended(self) -> bool:
        """Whether the process has ended (a request submitted now would raise `Ended`)."""
        return self._gone.is_set() or not self._process.is_alive()

    @property
    def exitcode(self) -> int | None:
        """The process's exit status once it has ended (negative: the signal that ended it, -9 for SIGKILL)."""
        self._process.join(timeout=1)  # the pipe can close a moment before the process is reaped
        return self._process.exitcode

    @property
    def steps(self) -> int:
        return self._counts.steps

    @property
    def largest_batch(self) -> int:
        return self._counts.largest

    @property
    def busy_rows(self) -> int:
        return self._counts.batch

    def submit(self, row: Row) -> None:
        """Send the row to the child; `Ended` (and the row not taken) if the process has ended. Under the lock the
        reader takes when the pipe closes: a row is either failed by the reader or refused here, never left
        waiting for an answer that cannot come."""
        with self._send_lock:
            if self.ended:
                raise Ended(self._process.exitcode)
            row.number = self._next
            self._next += 1
            self._rows[row.number] = row
            try:
                stop_ids = None if row.stop_ids is None else sorted(row.stop_ids)
                self._conn.send(
                    (
                        "submit",
                        row.number,
                        row.ids,
                        row.max_new_tokens,
                        row.kwargs,
                        row.seed,
                        row.stop,
                        row.logprobs,
                        row.prefix,
                        stop_ids,
                    )
                )
            except (OSError, ValueError):  # the pipe has closed; the reader has not seen it yet
                del self._rows[row.number]
                raise Ended(self._process.exitcode) from None
        if row.cancel.is_set():
            self.cancel(row)

    def cancel(self, row: Row) -> None:
        """The row's cancel event is set: tell the child, which drops the row before its next step."""
        if row.number in self._rows:
            _send_cancel(self._conn, self._send_lock, row.number)


def _send_cancel(conn, lock: threading.Lock, number: int) -> None:
    try:
        with lock:
            conn.send(("cancel", number))
    except (OSError, ValueError):  # the process has ended: the reader fails its rows
        pass


class _Counts:
    """What the child's last step message said (for tests and logs, as the in-process scheduler's attributes)."""

    def __init__(self):
        self.steps = 0
        self.batch = 0
        self.largest = 0


def _read(
    conn,
    rows: dict[int, Row],
    counts: _Counts,
    after_step: Callable[[], None],
    ready: threading.Event,
    gone: threading.Event,
    lock: threading.Lock,
    on_end: Callable[[], None],
) -> None:
    """This side's reader: each step's tokens and ended rows to their callbacks, then `after_step`. When the pipe
    closes (the process has ended), the rows in flight fail and `on_end` is called. It ends only then: whatever a
    row's callbacks or `after_step` raise is logged, or every later answer would wait forever."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            with lock:  # as `submit`: a row is sent before this, and failed here, or refused there
                gone.set()
                left = [(n, RuntimeError("the scheduler's process has ended")) for n in rows]
            ready.set()
            _hand_over(("step", counts.steps, 0, [], left), rows, counts, conn, lock)
            _guarded(after_step)
            _guarded(on_end)
            return
        if message[0] == "ready":
            ready.set()
        else:
            _hand_over(message, rows, counts, conn, lock)  # a function: no row stays referenced here once it has ended
            _guarded(after_step)
        del message


def _hand_over(message: tuple, rows: dict[int, Row], counts: _Counts, conn, lock: threading.Lock) -> None:
    """One step's tokens and ends to their rows' callbacks. A row whose callback raises fails alone: it is ended
    here with that error (its reader gets it), the child is told to drop it, and its later tokens are ignored."""
    _, counts.steps, counts.batch, tokens, ended = message
    counts.largest = max(counts.largest, counts.batch)
    for number, token, info in tokens:
        row = rows.get(number)
        if row is None:  # failed here already; the child has not seen the cancel yet
            continue
        row.tokens.append(token)
        try:
            if info is None:
                row.on_token(token)
            else:
                row.on_token(token, info)
        except Exception as exc:
            log.exception("row %d: handing over its token failed; that answer fails, the others go on", number)
            del rows[number]
            _send_cancel(conn, lock, number)
            _end(number, row, exc)
    for number, error in ended:
        row = rows.pop(number, None)
        if row is not None:
            _end(number, row, error)


def _end(number: int, row: Row, error: BaseException | None) -> None:
    try:
        row.on_done(row.tokens, error)
    except Exception:
        log.exception("row %d: handing over its end failed", number)


def _guarded(call: Callable[[], None]) -> None:
    try:
        call()
    except Exception:
        log.exception("the scheduler's reader: a callback failed")


def _stop(conn, lock: threading.Lock, process) -> None:
    try:
        with lock:
            conn.send(("exit",))
    except (OSError, ValueError):
        pass
    process.join(timeout=5)


class Child:
    """A scheduler's process, started before the model is loaded: it imports torch and transformers (spawned, it
    starts from a fresh interpreter) while the parent loads the model, then waits for the model on its pipe
    (`SchedulerProcess`). One that is not used is closed (`close`)."""

    def __init__(self):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_child, args=(child,), daemon=True, name="ptune-scheduler")
        self.process.start()
        child.close()

    def close(self) -> None:
        """Not used after all: it holds nothing yet, so it is ended at once rather than asked."""
        self.conn.close()
        self.process.terminate()
        self.process.join(timeout=5)


def _child(conn) -> None:
    """The child process: imports the scheduler (torch, transformers), waits for the model, then runs a Scheduler on
    it; requests and cancels come in on `conn`, each step's tokens and ended rows go out on it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's (chat stops an answer with it)
    from .batching import Row, Scheduler

    try:
        message = conn.recv()
    except (EOFError, OSError):
        os._exit(0)
    if message[0] != "load":  # ("exit",): not needed after all
        os._exit(0)
    _, model, encoders, stop_ids, max_batch, threads, tokenizer = message
    del message
    rows: dict[int, Row] = {}
    tokens: list[tuple[int, int, tuple | None]] = []
    ended: list[tuple[int, BaseException | None]] = []
    sent = [0]

    def flush() -> None:
        if not tokens and not ended and scheduler.steps == sent[0]:
            return
        message = ("step", scheduler.steps, len(scheduler.active), list(tokens), [(n, _portable(e)) for n, e in ended])
        tokens.clear()
        ended.clear()
        sent[0] = scheduler.steps
        conn.send(message)

    scheduler = Scheduler(model, encoders, stop_ids, max_batch, threads, after_step=flush, tokenizer=tokenizer)
    conn.send(("ready",))

    def handle(message: tuple) -> bool:
        if message[0] == "submit":
            _, number, ids, max_new_tokens, kwargs, seed, stop, logprobs, prefix, row_stop_ids = message

            def on_token(token: int, info: tuple | None = None) -> None:
                tokens.append((number, token, info))

            def on_done(new: list[int], error: BaseException | None) -> None:
                rows.pop(number, None)
                ended.append((number, error))

            rows[number] = Row(
                ids,
                max_new_tokens,
                kwargs,
                seed,
                threading.Event(),
                on_token,
                on_done,
                stop=stop,
                logprobs=logprobs,
                prefix=prefix,
                stop_ids=row_stop_ids,
            )
            scheduler.submit(rows[number])
        elif message[0] == "cancel":
            row = rows.get(message[1])
            if row is not None:
                row.cancel.set()
        else:
            return False
        return True

    running = True
    while running:
        try:
            messages = [conn.recv()]
            while conn.poll():
                messages.append(conn.recv())
        except (EOFError, OSError):
            break
        with scheduler._cv:  # requests that came in together are admitted together
            for message in messages:
                running = running and handle(message)
    os._exit(0)


def _portable(error: BaseException | None) -> BaseException | None:
    """An error as it can cross to the parent (pickled), else a RuntimeError that says what it was."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def early_child(max_batch: int) -> Child | None:
    """The child for `ptune serve`, started first thing (before torch is imported here) unless it will not be used:
    $PTUNE_SERVE_PROCESS=0 or one row at a time. On a GPU it is started all the same (knowing needs torch) and closed
    once the engine has its device."""
    if max_batch <= 1 or not wanted():
        return None
    return Child()


def wanted() -> bool:
    """$PTUNE_SERVE_PROCESS: unset or 1 (a process where it helps), 0 (a thread)."""
    value = os.environ.get(PROCESS_ENV, "")
    if value not in ("", "0", "1"):
        raise PtuneError(f"{PROCESS_ENV}={value!r}: 1 (a child process for the scheduler) or 0 (a thread)")
    return value != "0"


def fallback() -> str:
    """$PTUNE_SERVE_FALLBACK: unset or `thread` (a thread decodes once the process has ended), `none` (nothing does:
    503 until the server is restarted)."""
    value = os.environ.get(FALLBACK_ENV, "") or THREAD
    if value not in (THREAD, NONE):
        raise PtuneError(
            f"{FALLBACK_ENV}={value!r}: {THREAD} (a thread decodes once the scheduler's process has ended) or "
            f"{NONE} (the server then answers 503, for a supervisor to restart it)"
        )
    return value

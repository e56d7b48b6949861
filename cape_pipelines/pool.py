"""Ordered work over forked processes: ``cape apply --workers N``, ``apply_policy(df, workers=N)``.

The core's per-value work (keyed hashes, encryptions) holds the GIL, so using
every core takes processes. :func:`ordered_map` forks ``workers`` processes
that inherit the function to run (and so the plan and its keys) once, at
start: nothing key-related is pickled, put on a command line or logged, and
the parent never ships the plan again. Items go to the workers round robin
and their results come back in item order, so the output is exactly what one
process gives, in the same order. At most ``window`` items are out at once
(twice the workers by default), which bounds memory by the workers times the
item size, whatever the input's length.

Large results (Arrow batches, arrays) do not go through the pipe: a worker
pickles them with their buffers out of band (protocol 5), copies the buffers
once into an anonymous in-memory file (``memfd_create``) and passes its
descriptor over a Unix socket; the parent maps it and unpickles onto the
mapping, without copying. The file has no name, so nothing is left behind
whatever happens to either process (where ``memfd_create`` is missing,
results are pickled through the pipe as before).

Stopping is clean: the workers ignore Ctrl-C (the terminal sends it to the
whole process group) and only the parent handles it or SIGTERM, then stops
them; an error in a worker is raised again in the parent, and a worker that
dies (killed, out of memory) is an error naming it rather than a hang. Where
``fork`` is not available (Windows, where a spawned worker would need the
plan, keys included, pickled to it) the work runs in this process.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.reduction import recvfds, sendfds
from typing import Any, TypeVar

from .errors import CapeError

T = TypeVar("T")
R = TypeVar("R")

# Ctrl-C, and what orchestrators send to stop a job.
_STOP_SIGNALS = [
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
]
# How long the parent waits for one result before checking that its worker still runs.
_POLL_SECONDS = 0.5
# How long a worker asked to stop may take before it is terminated.
_STOP_SECONDS = 2.0
# Results whose buffers add up to less go through the pipe as they are (a memfd,
# its mapping and the descriptor passing cost more than copying a little).
_SHARED_MIN_BYTES = 1 << 20
# Out-of-band buffers start at multiples of this in the shared file (Arrow's alignment).
_ALIGN = 64


def default_workers() -> int:
    """The processes ``--workers`` defaults to: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    """Whether worker processes can be forked here (POSIX; not Windows)."""
    return "fork" in mp.get_all_start_methods()


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, window: int | None = None
) -> Iterator[R]:
    """``fn(item)`` for each of ``items``, in order, computed by ``workers`` forked processes.

    ``fn`` is inherited by the workers when they are forked (never pickled);
    items and results are pickled. With ``workers`` 1, or when only one item
    comes, or where fork is unavailable, everything runs in this process.
    Closing the iterator early (an error, Ctrl-C) stops the workers.
    """
    if workers < 1:
        raise CapeError(f"workers must be at least 1, not {workers}")
    it = iter(items)
    if workers == 1 or not can_fork():
        yield from map(fn, it)
        return
    first = next(it, _END)
    if first is _END:
        return
    try:
        second = next(it, _END)
    except Exception:
        yield fn(first)
        raise
    if second is _END:
        # One item: a pool would only add its start-up.
        yield fn(first)
        return
    pool = _Pool(fn, workers)
    limit = window or 2 * workers
    out: deque[int] = deque()
    try:
        items = _chain(first, second, it)
        sent = 0
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except Exception:
                # One process would have handed back (written, counted) the items read
                # before the one that could not be read; so does the pool, then the error.
                while out:
                    yield pool.receive(out.popleft())
                raise
            w = sent % workers
            pool.send(w, item)
            out.append(w)
            sent += 1
            if len(out) >= limit:
                yield pool.receive(out.popleft())
        while out:
            yield pool.receive(out.popleft())
        pool.stop()
    finally:
        pool.kill()


_END: Any = object()


def _chain(first: Any, second: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield second
    yield from rest


class _Pool:
    """``workers`` forked processes, each with its own task and result queue (so order is free)."""

    def __init__(self, fn: Callable[[Any], Any], workers: int):
        ctx = mp.get_context("fork")
        self.tasks = [ctx.Queue() for _ in range(workers)]
        self.results = [ctx.Queue() for _ in range(workers)]
        # (parent's end, worker's end) of the socket each worker passes shared results on.
        self.channels = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if _HAVE_MEMFD else None
            for _ in range(workers)
        ]
        self.procs = [
            ctx.Process(
                target=_work,
                args=(fn, self.tasks[i], self.results[i], _end(self.channels[i], 1)),
                name=f"cape-worker-{i + 1}",
                daemon=True,
            )
            for i in range(workers)
        ]
        # The workers' garbage collections must not walk (and so copy, page by page)
        # every object they share with this process: freeze those for the forks only.
        gc.freeze()
        try:
            with _stop_signals_deferred():
                for p in self.procs:
                    p.start()
        except BaseException:
            self.kill()
            raise
        finally:
            gc.unfreeze()

    def send(self, w: int, item: Any) -> None:
        # Queue.put holds the queue's lock for a moment; a Ctrl-C raised between taking
        # and releasing it would leave it taken, and close() at the end would wait for
        # it for good. Stop signals are acted on just after instead.
        with _stop_signals_deferred():
            self.tasks[w].put(item)

    def receive(self, w: int) -> Any:
        while True:
            try:
                status, value = self.results[w].get(timeout=_POLL_SECONDS)
            except queue.Empty:
                proc = self.procs[w]
                if not proc.is_alive():
                    raise CapeError(
                        f"worker process {w + 1} of {len(self.procs)} stopped unexpectedly "
                        f"(exit code {proc.exitcode}); rerun with --workers 1 to see why"
                    ) from None
                continue
            if status == "error":
                raise value
            if status == "shared":
                return _unpack_shared(value, _end(self.channels[w], 0))
            return value

    def stop(self) -> None:
        """Ask every worker to finish (all results were received) and wait for them."""
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(_STOP_SECONDS)

    def kill(self) -> None:
        """Stop every worker now (after :meth:`stop`, a no-op for those that ended)."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            if p.pid is not None:  # started
                p.join(_STOP_SECONDS)
                if p.is_alive():
                    # SIGTERM can land before a just-forked worker has put its own
                    # handlers in place (it then still has the parent's): SIGKILL.
                    p.kill()
                    p.join(_STOP_SECONDS)
        for q in (*self.tasks, *self.results):
            # Items still buffered for a stopped worker are dropped, not waited for.
            q.cancel_join_thread()
            q.close()
        for pair in self.channels:
            # Closing drops any descriptor still in flight, and so its memory.
            for sock in pair or ():
                sock.close()


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP only noted while forking, then acted on as usual.

    Python ignores an exception raised in its at-fork handlers (logging has
    one), so a Ctrl-C landing there would be lost and the run would go on. The
    signals' handlers are swapped for ones that only note them; afterwards the
    first one noted is raised again, with the usual handlers back. (Signals
    can only be handled in the main thread; elsewhere nothing changes.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous: dict[int, Any] = {}
    for sig in _STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python, cannot be put back
            previous[sig] = signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if noted:
            signal.raise_signal(noted[0])


_HAVE_MEMFD = hasattr(os, "memfd_create") and hasattr(socket, "AF_UNIX")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _end(pair: tuple[socket.socket, socket.socket] | None, i: int) -> socket.socket | None:
    return None if pair is None else pair[i]


def _pack(result: Any, channel: socket.socket | None) -> tuple[str, Any]:
    """What a worker puts on its result queue for ``result``.

    Large results are pickled with their buffers out of band; the buffers go
    into a memfd whose descriptor is sent on ``channel`` *before* the message
    naming it is queued, so the parent, having the message, never waits for it.
    """
    if channel is None:
        return ("ok", result)
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
        views = [b.raw() for b in buffers]
    except (BufferError, pickle.PicklingError, TypeError):
        return ("ok", result)
    layout = []
    size = 0
    for v in views:
        layout.append((size, v.nbytes))
        size += -(-v.nbytes // _ALIGN) * _ALIGN
    if size < _SHARED_MIN_BYTES:
        return ("ok", result)
    fd = os.memfd_create("cape-result", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        for (offset, _), v in zip(layout, views, strict=True):
            done = 0
            while done < v.nbytes:
                done += os.pwrite(fd, v[done:], offset + done)
        sendfds(channel, [fd])
    finally:
        os.close(fd)
    return ("shared", (head, size, layout))


def _unpack_shared(value: tuple[bytes, int, list[tuple[int, int]]], channel: Any) -> Any:
    """In the parent: the result a worker packed, its buffers read in place from the memfd."""
    head, size, layout = value
    fd = recvfds(channel, 1)[0]
    try:
        # Populated at once: one call maps every page, rather than a fault per page as
        # the writer first reads it.
        shared = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    # The mapping lives as long as the buffers unpickled onto it (the views hold it).
    view = memoryview(shared)
    # Our own worker's result, made by the plan it inherited: nothing untrusted is unpickled.
    return pickle.loads(head, buffers=[view[o : o + n] for o, n in layout])  # noqa: S301


def _work(
    fn: Callable[[Any], Any], tasks: Any, results: Any, channel: socket.socket | None
) -> None:
    """A worker's loop: items in, results (or the error) out, until told to stop."""
    # Ctrl-C reaches the whole process group; only the parent acts on it. SIGTERM
    # (from the parent's kill) ends the worker at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    parent = os.getppid()
    # The parent died without stopping us (SIGKILL): its queues never close for us (the
    # workers hold their other ends too), and a batch it was half-way through writing
    # leaves a reader blocked in the pipe for good, where no timeout reaches. A watchdog
    # thread ends the process then; it holds nothing the parent's stop would have saved.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    while True:
        try:
            item = tasks.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue
        if item is None:
            return
        try:
            results.put(_pack(fn(item), channel))
        except Exception as exc:
            results.put(("error", _picklable(exc)))


def _exit_with_parent(parent: int) -> None:
    """In a worker: end the process at once when its parent has gone."""
    while os.getppid() == parent:
        time.sleep(_POLL_SECONDS)
    os._exit(1)


def _picklable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a :class:`CapeError` with its message."""
    try:
        # Our own exception, just made in this process: nothing untrusted is unpickled.
        pickle.loads(pickle.dumps(exc))  # noqa: S301
    except Exception:
        return CapeError(f"{type(exc).__name__}: {exc}")
    return exc


__all__ = ["can_fork", "default_workers", "ordered_map"]

"""Worker processes that the parent can account for: data.py's decoding pool.

Each worker has its own pair of pipes, so the parent knows which chunks of work each one holds: when one
dies (SIGKILL, the OOM killer, a crash in an image decoder) exactly its chunks are lost, and a new process
takes its place (`Pool.replace`). concurrent.futures' pool cannot say which tasks a dead worker held, and
breaks as a whole. Each worker also ends when its parent does, however the parent dies: no orphans.

    pool = Pool(n, init, work, config)     # each process calls init(config) once, then work(chunk, slot)
    pool.workers[i].tasks.send((slot, chunk)); pool.workers[i].results.recv()

`init` and `work` must be module-level functions: the processes are spawned, never forked (JAX's threads
may be running in the parent), so they are sent by name.
"""
import multiprocessing
import os
import queue
import threading
from typing import Callable, NamedTuple


def _main(init: Callable, work: Callable, config, tasks, results):
    """A worker process: chunks in from `tasks`, results out to `results`, in order, until either pipe closes.

    A thread reads the tasks as they come, so the parent's sends never wait on a busy worker, and it
    sees the parent go: when the training process dies, however it dies (SIGKILL included), the kernel
    closes its end of the pipe, the read ends, and the thread ends the worker at once, even mid-chunk
    (never an orphan holding memory, nor keeping alive the resource tracker that waits for every worker).
    """
    init(config)
    inbox = queue.SimpleQueue()

    def read():
        try:
            while True:
                inbox.put(tasks.recv())
        except (EOFError, OSError):  # the pool closed, or its process died
            os._exit(0)
    threading.Thread(target=read, daemon=True).start()
    while True:
        slot, chunk = inbox.get()
        try:
            out = work(chunk, slot)
        except Exception as e:  # a bug, not bad data (that is data.BadSample): the parent raises it
            out = e
        try:
            results.send(out)
        except OSError:
            os._exit(0)


class Worker(NamedTuple):
    process: multiprocessing.Process
    tasks: object    # the parent's ends of the two pipes (multiprocessing.connection.Connection)
    results: object


class Pool:
    """N worker processes, each with its own pipes (see the module docstring)."""

    def __init__(self, n: int, init: Callable, work: Callable, config):
        self._args = (init, work, config)
        self._context = multiprocessing.get_context('spawn')  # never fork: jax's threads may be running
        self.workers = [self._start() for _ in range(n)]

    def _start(self) -> Worker:
        task_reader, task_writer = self._context.Pipe(duplex=False)
        result_reader, result_writer = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_main, args=(*self._args, task_reader, result_writer), daemon=True)
        process.start()
        task_reader.close()  # only the worker may hold these ends: their EOF is what each side waits for
        result_writer.close()
        return Worker(process, task_writer, result_reader)

    @property
    def _processes(self) -> dict:  # pid -> process, as concurrent.futures names it (bench.py reads it)
        return {w.process.pid: w.process for w in self.workers}

    def alive(self, i: int) -> bool:
        return self.workers[i].process.exitcode is None

    def replace(self, worker: Worker):
        """Start a new process in a dead one's place (once: later chunks of the dead one find it gone)."""
        worker.process.join()  # reap it
        worker.tasks.close()
        worker.results.close()
        if worker in self.workers:
            self.workers[self.workers.index(worker)] = self._start()

    def close(self):
        for w in self.workers:
            w.tasks.close()  # the worker's read ends: it exits
        for w in self.workers:
            w.process.join(timeout=5)
            if w.process.exitcode is None:  # stuck in a decode: it holds nothing we need
                w.process.kill()
                w.process.join()
            w.results.close()
        self.workers = []

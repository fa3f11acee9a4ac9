"""How serve.py turns concurrent requests into generation batches: one queue of texts and the one
thread that runs the model over them (Batcher), answering each request through a future.

Requests that arrive together are answered together: the thread takes what arrived within the
batch wait (up to the batch size) and runs one generation batch over it.
"""
import collections
import concurrent.futures
import sys
import threading
import time
import traceback

from config_utils import UserError


class Busy(Exception):
    """The queue is full or the server is stopping: the request is answered 503."""


class _Job:
    """One request's texts and where their results go."""

    def __init__(self, texts):
        self.texts = texts
        self.results = [None] * len(texts)
        self.left = len(texts)
        self.future = concurrent.futures.Future()

    def done(self):
        return self.future.done()

    def finish(self):
        self._settle(self.future.set_result, self.results)

    def fail(self, error):
        self._settle(self.future.set_exception, error)

    def _settle(self, setter, value):
        # The request may have been cancelled (its client went away) at any moment: nothing to answer then.
        try:
            setter(value)
        except concurrent.futures.InvalidStateError:
            pass


class Batcher:
    """A queue of texts and the one thread that runs the model over them.

    `run(texts)` -> one result per text (it owns the model: nothing else calls it). The thread
    takes the first waiting text, waits up to `max_wait` seconds for more while fewer than
    `batch_size` wait, and runs them as one batch; a request with more texts than a batch holds
    spans several. When a batch raises, each request in it is run again on its own, so only
    the request that fails gets the error.
    """

    def __init__(self, run, batch_size, max_wait, max_queue):
        self.run, self.batch_size, self.max_wait, self.max_queue = run, batch_size, max_wait, max_queue
        self.queue = collections.deque()  # (job, index of the text in the job)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = None
        self.counts = {"requests": 0, "texts": 0, "batches": 0, "largest_batch": 0, "failed_requests": 0,
                       "batches_retried_per_request": 0}
        self.batch_sizes = collections.Counter()  # texts per batch -> batches

    def start(self):
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()
        return self

    def submit(self, texts):
        """Queue a request's texts -> a concurrent.futures.Future of their results (in order)."""
        job = _Job(list(texts))
        with self.cond:
            if self.stopping:
                raise Busy("the server is stopping")
            if len(self.queue) + len(job.texts) > self.max_queue:
                raise Busy(f"{len(self.queue)} texts are waiting (at most {self.max_queue}); try again shortly")
            self.queue.extend((job, i) for i in range(len(job.texts)))
            self.counts["requests"] += 1
            self.counts["texts"] += len(job.texts)
            self.cond.notify()
        return job.future

    def stats(self):
        with self.cond:
            return {**self.counts, "queued": len(self.queue),
                    "texts_per_batch": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    def stop(self, timeout=None):
        """Finish the batch in hand; requests still waiting are failed (the server no longer answers)."""
        with self.cond:
            self.stopping = True
            left, self.queue = list(self.queue), collections.deque()
            self.cond.notify_all()
        for job, _ in left:
            job.fail(Busy("the server stopped before this request was answered"))
        if self.thread is not None:
            self.thread.join(timeout)

    def _take(self):
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self.queue) < self.batch_size and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch = []
            while self.queue and len(batch) < self.batch_size:
                job, i = self.queue.popleft()
                if not job.done():  # a request that failed already or whose client went away
                    batch.append((job, i))
            return batch

    def _loop(self):
        while not self.stopping:
            batch = self._take()
            if batch:
                self._answer(batch)

    def _answer(self, batch):
        with self.cond:
            self.counts["batches"] += 1
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(batch))
            self.batch_sizes[len(batch)] += 1
        by_job = collections.defaultdict(list)
        for job, i in batch:
            by_job[job].append((job, i))
        try:
            self._deliver(batch, self.run([job.texts[i] for job, i in batch]))
            return
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others: retried apart below
            if len(by_job) == 1:
                self._fail(batch[0][0], e)
                return
        with self.cond:
            self.counts["batches_retried_per_request"] += 1
        for job, items in by_job.items():
            try:
                self._deliver(items, self.run([job.texts[i] for _, i in items]))
            except Exception as e:  # noqa: BLE001 - this request's own failure, reported to it alone
                self._fail(job, e)

    def _deliver(self, items, results):
        for (job, i), result in zip(items, results, strict=True):
            job.results[i] = result
            job.left -= 1
            if job.left == 0:
                job.finish()

    def _fail(self, job, error):
        if not isinstance(error, UserError):
            traceback.print_exception(error, file=sys.stderr)
        with self.cond:
            self.counts["failed_requests"] += 1
        job.fail(error)

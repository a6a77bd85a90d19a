"""Server-side batching: concurrent calls of one signature merged into one model call.

Follows TF Serving's BatchingParameters (session_bundle_config.proto:149-203, the text proto of
`--batching_parameters_file`, the same serving/config/batching.config the TF Serving image
reads) and the batching session's rules (tensorflow_serving/batching/batching_session.cc):

- one queue per (model version, signature); a task is one call, its size the rows it carries;
- a batch closes when it holds `max_batch_size` rows or its oldest task has waited
  `batch_timeout_micros`; `num_batch_threads` batches run at once;
- a task larger than `max_batch_size` is refused ("Task size %d is larger than maximum input
  batch size %d", INVALID_ARGUMENT); with `max_enqueued_batches` full batches waiting, a new task
  is refused with UNAVAILABLE (HTTP 503), so a backlog never grows without bound;
- `allowed_batch_sizes`: a batch is padded up to the next allowed size (with copies of its
  first row) and the padding is cut from the outputs;
- tasks whose inputs differ in any dimension but the first are not merged together (TF Serving
  refuses them with padding off; here they simply run in separate batches).

Each row's answer is the one an unbatched call gives (tested): the model is row-independent and
outputs are split back by the row counts that went in.
"""

import asyncio
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from serving import metrics
from serving.wire import ServingError, invalid


class Parameters:
    """BatchingParameters with TF Serving's defaults for unset fields (notes: QueueOptions)."""

    def __init__(self, max_batch_size: int = 1000, batch_timeout_micros: int = 0, max_enqueued_batches: int = 10,
                 num_batch_threads: int = 4, allowed_batch_sizes: Tuple[int, ...] = ()):
        if max_batch_size < 1 or num_batch_threads < 1 or max_enqueued_batches < 1 or batch_timeout_micros < 0:
            raise ValueError("batching parameters: max_batch_size, num_batch_threads and max_enqueued_batches must be "
                             "positive and batch_timeout_micros not negative")
        sizes = tuple(allowed_batch_sizes)
        if sizes:
            if list(sizes) != sorted(set(sizes)):
                raise ValueError(f"allowed_batch_sizes must be increasing: {list(sizes)}")
            if sizes[-1] != max_batch_size:
                raise ValueError(f"Last entry in allowed_batch_sizes must match max_batch_size; last entry was "
                                 f"{sizes[-1]}; expected {max_batch_size}")
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout_micros / 1e6
        self.max_enqueued_batches, self.num_batch_threads = max_enqueued_batches, num_batch_threads
        self.allowed_batch_sizes = sizes


def read_parameters(path: str) -> Parameters:
    from google.protobuf import text_format

    from serving.upstream_protos import message_class

    proto = message_class("BatchingParameters")()
    try:
        with open(path) as f:
            text_format.Parse(f.read(), proto)
    except (OSError, text_format.ParseError) as e:
        raise SystemExit(f"{path}: not a readable BatchingParameters text proto: {e}") from None
    kwargs = {}
    for field in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if proto.HasField(field):
            kwargs[field] = getattr(proto, field).value
    kwargs["allowed_batch_sizes"] = tuple(proto.allowed_batch_sizes)
    try:
        return Parameters(**kwargs)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None


class _Task:
    """One call waiting in a batch: a blocked thread waits on `done`, a coroutine on `future`
    (resolved on its event loop `loop`)."""
    __slots__ = ("inputs", "size", "key", "done", "outputs", "error", "loop", "future")

    def __init__(self, inputs: Dict[str, np.ndarray], size: int, key, loop=None):
        self.inputs, self.size, self.key = inputs, size, key
        self.loop = loop
        self.future = loop.create_future() if loop is not None else None
        self.done = threading.Event() if loop is None else None
        self.outputs: Optional[Dict[str, np.ndarray]] = None
        self.error: Optional[BaseException] = None


def _resolve(tasks: List[_Task]) -> None:
    """On the tasks' event loop: hands each awaiting coroutine its outputs or error (a request
    that timed out meanwhile has a cancelled future: nothing to hand)."""
    for task in tasks:
        if task.future.done():
            continue
        if task.error is not None:
            task.future.set_exception(task.error)
        else:
            task.future.set_result(task.outputs)


class _Queue:
    """Tasks of one (version, signature), grouped into batches as they arrive."""

    def __init__(self, loaded, signature: str, call: Callable):
        self.loaded, self.signature, self.call = loaded, signature, call
        self.batches: Deque[List[_Task]] = deque()  # open batch last
        self.opened: Deque[float] = deque()
        self.rows: Deque[int] = deque()


class Batcher:
    def __init__(self, parameters: Optional[Parameters] = None):
        self.p = parameters or Parameters()
        self._queues: Dict[tuple, _Queue] = {}
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"batch-{i}")
                         for i in range(self.p.num_batch_threads)]
        for t in self._threads:
            t.start()

    def run(self, loaded, signature: str, inputs: Dict[str, np.ndarray], call: Callable) -> Dict[str, np.ndarray]:
        """The outputs of `call(loaded, signature, inputs)`, run within a batch; blocks the thread."""
        task = self._enqueue(loaded, signature, inputs, call, None)
        if task is None:
            return call(loaded, signature, inputs)  # not batchable: run alone, the model says what is wrong
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    async def run_async(self, loaded, signature: str, inputs: Dict[str, np.ndarray],
                        call: Callable) -> Dict[str, np.ndarray]:
        """As run(), awaited on an event loop: no thread waits while the task is in its batch. The
        batch thread hands the outputs back with one loop.call_soon_threadsafe per batch."""
        loop = asyncio.get_running_loop()
        task = self._enqueue(loaded, signature, inputs, call, loop)
        if task is None:  # not batchable: run alone, off the event loop
            return await loop.run_in_executor(None, call, loaded, signature, inputs)
        return await task.future

    def _enqueue(self, loaded, signature: str, inputs: Dict[str, np.ndarray], call: Callable, loop) -> Optional[_Task]:
        """The task queued in its batch, or None when the inputs cannot be batched."""
        size, shapes = None, []
        for name, value in inputs.items():  # one pass: the rows every input must share, and the merge key
            shape = value.shape
            if not shape or (size is not None and shape[0] != size):
                return None
            size = shape[0]
            shapes.append((name, value.dtype.str, shape[1:]))
        if size is None:
            return None
        if size > self.p.max_batch_size:
            raise invalid(f"Task size {size} is larger than maximum input batch size {self.p.max_batch_size}")
        shapes.sort()
        task = _Task(inputs, size, (id(loaded), signature, tuple(shapes)), loop)
        with self._cv:
            queue = self._queues.get(task.key)
            if queue is None:  # the key holds id(loaded): one queue per loaded version and signature
                queue = self._queues[task.key] = _Queue(loaded, signature, call)
            if queue.batches and queue.rows[-1] + size <= self.p.max_batch_size:
                queue.batches[-1].append(task)
                queue.rows[-1] += size
                # The open batch's arrival already woke a batch thread (or all are busy); wake
                # another only once the batch is full, which makes it ready before its timeout.
                # A wake-up per joining task made idle threads race for the GIL and the batch.
                ready = queue.rows[-1] >= self.p.max_batch_size
            else:
                if len(queue.batches) >= self.p.max_enqueued_batches:
                    raise ServingError("UNAVAILABLE", f"The batch scheduling queue to which this task was submitted is "
                                                      f"full; currently {len(queue.batches)} batches enqueued and "
                                                      f"max_enqueued_batches is {self.p.max_enqueued_batches}")
                queue.batches.append([task])
                queue.opened.append(time.monotonic())
                queue.rows.append(size)
                ready = True
            if ready:
                self._cv.notify()
        return task

    def _ready(self) -> Tuple[Optional[_Queue], float]:
        """A queue whose first batch may run now, or how long until one may."""
        now, wait = time.monotonic(), 3600.0
        for queue in self._queues.values():
            if not queue.batches:
                continue
            full = queue.rows[0] >= self.p.max_batch_size or len(queue.batches) > 1
            due = queue.opened[0] + self.p.batch_timeout
            if full or due <= now:
                return queue, 0.0
            wait = min(wait, due - now)
        return None, wait

    def _work(self) -> None:
        while True:  # no local keeps a batch or its version alive while the thread waits
            self._execute(*self._next())

    def _next(self) -> Tuple[List[_Task], object, str, Callable]:
        """The next batch to run, with its version, signature and call; waits for one."""
        with self._cv:
            queue, wait = self._ready()
            while queue is None:
                self._cv.wait(wait)
                queue, wait = self._ready()
            batch = queue.batches.popleft()
            queue.opened.popleft()
            queue.rows.popleft()
            if not queue.batches:  # made again by the next call: no queue keeps an unloaded version alive
                del self._queues[batch[0].key]
            return batch, queue.loaded, queue.signature, queue.call

    def _execute(self, batch: List[_Task], loaded, signature: str, call: Callable) -> None:
        rows = sum(t.size for t in batch)
        target = next((s for s in self.p.allowed_batch_sizes if s >= rows), rows)
        try:
            merged = {}
            for name in batch[0].inputs:
                parts = [t.inputs[name] for t in batch]
                if target > rows:
                    parts.append(np.repeat(parts[0][:1], target - rows, axis=0))
                merged[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            metrics.BATCH_SIZE.labels(signature).observe(target)
            outputs = call(loaded, signature, merged)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != target:
                    raise ServingError("FAILED_PRECONDITION", "Batched output tensor's 0th dimension does not equal "
                                                              "the sum of the 0th dimension sizes of the input tensors")
            start = 0
            for task in batch:
                task.outputs = {k: v[start:start + task.size] for k, v in outputs.items()}
                start += task.size
        except BaseException as e:  # every task of the batch gets the error
            if len(batch) > 1 and isinstance(e, ServingError) and e.code == "INVALID_ARGUMENT":
                # One bad request must not fail the others merged with it: run each alone.
                for task in batch:
                    try:
                        task.outputs = call(loaded, signature, task.inputs)
                    except BaseException as alone:
                        task.error = alone
            else:
                for task in batch:
                    task.error = e
        finally:
            loops: Dict[asyncio.AbstractEventLoop, List[_Task]] = {}
            for task in batch:
                if task.loop is None:
                    task.done.set()
                else:
                    loops.setdefault(task.loop, []).append(task)
            for loop, tasks in loops.items():
                try:
                    loop.call_soon_threadsafe(_resolve, tasks)
                except RuntimeError:  # the loop was closed (server stopped): nobody awaits these
                    pass

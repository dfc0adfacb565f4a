"""LoraWorker: a thread that runs the compiled CPU LoRA kernel while the step thread runs the base GEMM.

Why: with many adapters in a decode step the LoRA op streams every adapter's A and B from memory (64 adapters of
r16 on SmolLM2: 1.25 GB a step, ~40% of the step), while the base GEMM of the same layer is compute-bound; they
are independent (y = W x + delta), so on two cores they overlap. The server leaves one core to the HTTP side
(--threads 0); during a step that core is mostly idle, and the kernel releases the GIL. A handoff costs tens of
microseconds, so the mapping asks for it only when a layer's LoRA work is large (mapping.AdapterMapping.overlap).
The step thread, once its GEMM is done, takes the rest of the layer's runs itself (NumbaLora._overlapped in
lora_backend.py): for the narrow k/v projections the LoRA work outweighs the GEMM, and waiting would idle its core.
"""
from __future__ import annotations

import queue
import threading


class LoraWorker:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lora-worker", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> None:
        self._jobs.put((fn, args))

    def finished(self) -> bool:
        """Whether the submitted job is already done (then ``wait`` returns at once)."""
        return not self._done.empty()

    def wait(self) -> None:
        """Block until the submitted job is done; re-raise its exception here."""
        error = self._done.get()
        if error is not None:
            raise error

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
                self._done.put(None)
            except BaseException as e:  # handed to the step thread, which raises it
                self._done.put(e)

"""AdminLog: hands each admin request to every engine replica and collects their answers (one Ray Serve replica).

A handle call reaches one replica of Ray's choice (DeploymentHandle.broadcast, new in recent Ray, reaches the
replicas running now but keeps no record for later ones), so the replicas pull instead: each runs a loop `poll(replica, after)` -> [(seq, op)] -> run op through its own app -> `ack(replica, seq,
reply)`. The ingress calls `publish(op, record)`, which returns {replica: reply} once every live replica has
answered (or after `timeout`, the missing ones as 504).

Recorded ops (the changes: POST, PUT, PATCH, DELETE) stay in the log and a replica that joins later (scale-up,
a restart) replays them in order before anything newer, so every replica ends with the same adapters. Reads
(GET) are forgotten once answered. The log holds no keys: the ingress checks the admin key, and a replica runs
an op with its own admin credentials. The log lives in this deployment's memory: if its replica restarts, the
replay history starts again empty (the engine replicas keep what they loaded).

A replica is live while it polls: each poll returns within `poll_s` (empty when nothing came), so one not seen
for `live_s` has gone (or is busy with one long op) and is no longer waited for.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

POLL_S = 5.0
LIVE_S = 30.0
BROADCAST_TIMEOUT_S = 600.0  # a Hub download or a large merge can be slow


@dataclass
class _Op:
    seq: int
    op: dict
    record: bool
    replies: dict = field(default_factory=dict)  # replica -> reply
    done: asyncio.Event = field(default_factory=asyncio.Event)


class AdminLog:
    def __init__(self, poll_s: float = POLL_S, live_s: float = LIVE_S, clock=time.monotonic) -> None:
        self.poll_s, self.live_s, self.clock = poll_s, live_s, clock
        self.ops: list[_Op] = []
        self.seq = 0
        self.seen: dict[str, float] = {}  # replica -> last poll or ack
        self._changed = asyncio.Condition()

    async def poll(self, replica: str, after: int) -> list[tuple[int, dict]]:
        """Ops newer than ``after`` for ``replica`` (replayed changes first for a new one); waits up to poll_s."""
        self.seen[replica] = self.clock()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._pending(after)), self.poll_s)
            except asyncio.TimeoutError:
                pass
        self.seen[replica] = self.clock()
        return [(o.seq, o.op) for o in self._pending(after)]

    def _pending(self, after: int) -> list[_Op]:
        return [o for o in self.ops if o.seq > after]

    async def ack(self, replica: str, seq: int, reply: dict) -> None:
        self.seen[replica] = self.clock()
        op = next((o for o in self.ops if o.seq == seq), None)
        if op is not None:
            op.replies[replica] = reply
            async with self._changed:
                self._changed.notify_all()

    def leave(self, replica: str) -> None:
        """A replica shutting down: no longer waited for."""
        self.seen.pop(replica, None)

    def live(self) -> list[str]:
        now = self.clock()
        return sorted(r for r, t in self.seen.items() if now - t <= self.live_s)

    async def publish(self, op: dict, record: bool, timeout: float = BROADCAST_TIMEOUT_S) -> dict[str, dict]:
        """Hand ``op`` to every live replica; {replica: reply}, a replica that did not answer as a 504 reply."""
        self.seq += 1
        entry = _Op(self.seq, op, record)
        self.ops.append(entry)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._changed:
            self._changed.notify_all()
            while True:
                waiting = [r for r in self.live() if r not in entry.replies]
                if not waiting or loop.time() >= deadline:
                    break
                try:  # wake at least every second to notice replicas that stopped polling
                    await asyncio.wait_for(self._changed.wait(), min(1.0, max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    pass
        if not record:
            self.ops.remove(entry)
        replies = dict(entry.replies)
        for replica in waiting:
            replies[replica] = {"status": 504, "headers": [(b"content-type", b"application/json")],
                                "body": b'{"error": {"message": "the replica did not answer in time", '
                                        b'"type": "timeout", "param": null, "code": 504}}'}
        return dict(sorted(replies.items()))

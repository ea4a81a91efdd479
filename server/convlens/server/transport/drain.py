"""The calls in flight, so a shutdown can wait for them and, when the grace runs out, end them cleanly.

The interceptor registers every call it lets through (`enter`/`leave`). On SIGTERM the server sets
`draining` (calls that still slip in get UNAVAILABLE, which a balancing client retries elsewhere), waits
until no call is in flight, and shortly before the grace ends `cut()`s the rest: each is cancelled and
answers UNAVAILABLE saying how far it got, instead of the bare CANCELLED grpc would send at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

log = logging.getLogger("convlens.server")


@dataclass(eq=False)
class InFlight:
    """One call being served. Streams count their responses and remember the last progress step."""

    task: asyncio.Task[object] | None
    responses: int = 0
    step: int = 0
    total_steps: int = 0
    cut: bool = False
    in_body: bool = False  # awaiting the servicer (cancellable), not grpc sending a response

    def progress_text(self) -> str:
        if self.total_steps:
            return f"after step {self.step} of {self.total_steps} ({self.responses} responses sent)"
        return f"after {self.responses} responses"


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.grace_seconds = 0.0
        self._calls: set[InFlight] = set()
        self._watchers: set[asyncio.Task[object]] = set()  # health Watch streams: as long as their callers
        self._idle: asyncio.Event | None = None
        self._last_seen = 0.0  # time.monotonic() of the last call that ended or was refused while draining

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def enter(self) -> InFlight:
        call = InFlight(asyncio.current_task())
        self._calls.add(call)
        return call

    def watch(self) -> None:
        """The current task serves a health Watch stream: ended once the real calls are done."""
        task = asyncio.current_task()
        if task is not None:
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    def leave(self, call: InFlight) -> None:
        """The handler is done with `call`. It stays in flight until grpc's task for it ends, after the last
        response bytes are handed to the socket, not merely until the handler returned: connections close
        only after that, so a slow reader still gets the whole answer. A stream cancelled while grpc was
        writing is closed later, by the loop's finaliser, when that task has long ended: it leaves at once."""
        if call.task is None or call.task.done():
            self._gone(call)
        else:
            call.task.add_done_callback(lambda _task: self._gone(call))

    def _gone(self, call: InFlight) -> None:
        self._calls.discard(call)
        self._last_seen = time.monotonic()
        if not self._calls and self._idle is not None:
            self._idle.set()

    def refused(self) -> None:
        """A call arrived while draining and is answered UNAVAILABLE: its caller is still active."""
        self._last_seen = time.monotonic()

    def start(self, grace_seconds: float) -> None:
        self.draining = True
        self.grace_seconds = grace_seconds

    async def wait_idle(self, timeout: float) -> bool:
        """True when no call is in flight (at once, or within `timeout` seconds)."""
        if not self._calls:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout, 0.0))
        except TimeoutError:
            return not self._calls
        return True

    def cut(self) -> int:
        """Cancel every call still in flight; each answers UNAVAILABLE with its progress. Returns how many."""
        calls = [c for c in self._calls if c.task is not None and not c.task.done()]
        for c in calls:
            c.cut = True
            if c.in_body:  # otherwise the call notices `cut` as soon as grpc has sent its response
                assert c.task is not None
                c.task.cancel()
        return len(calls)

    async def shut_down(self, server: grpc.aio.Server, grace: float) -> None:
        """Stop `server` within `grace` seconds, losing no call that was accepted before the end.

        Calls still arriving are refused with UNAVAILABLE (balancing clients, which watch health and see
        NOT_SERVING already, retry them on another replica); calls in flight go on until their last byte
        is handed to the socket. Those still running shortly before the grace ends are cut (UNAVAILABLE with
        their progress) rather than left to grpc's bare CANCELLED. Only then does grpc's own stop send its
        GOAWAY and close the connections.

        That order matters: once grpc has sent its final GOAWAY it closes a connection the moment the last
        stream on it is written, and a peer still reading a large answer (its window updates then hit a
        closed socket) gets a reset that discards the unsent rest. A stop started after the answers are
        written sends its GOAWAY and PING behind them, so by the time the peer acknowledges, it has read them.
        """
        started = time.monotonic()
        end = started + grace
        self.start(grace)
        margin = min(max(1.0, grace / 10), grace / 2)  # for answering the cut calls and stopping
        if not await self.wait_idle(end - margin - time.monotonic()):
            log.warning("drain: the grace of %g s ran out; ending %d calls with UNAVAILABLE", grace, self.cut())
            await self.wait_idle(end - time.monotonic())
        # Then wait for the callers to go quiet: grpc kills calls that reach a stopping server unmatched with a
        # bare CANCELLED, which no client retries, and the caller of a call that just ended often sends its
        # next one at once (answered UNAVAILABLE here, so it goes elsewhere). Stop once nothing has ended or
        # been refused for a moment — at least that moment after the signal, for balancing clients to see
        # NOT_SERVING — or when the grace is nearly spent.
        quiet = min(0.25, grace / 8)
        latest = end - min(0.5, grace / 10)
        while (wait := max(self._last_seen, started) + quiet - time.monotonic()) > 0 and time.monotonic() < latest:
            await asyncio.sleep(min(wait, max(latest - time.monotonic(), 0.0)))
        for task in list(self._watchers):  # health Watch streams last as long as their callers: end them
            task.cancel()
        stopping = asyncio.create_task(server.stop(max(end - time.monotonic(), 0.0)))
        try:
            await asyncio.wait_for(asyncio.shield(stopping), max(end - time.monotonic(), 0.5))
        except TimeoutError:
            await server.stop(0)
            await stopping

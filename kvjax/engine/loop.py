"""The engine's drivers (split out of engine.py, no behaviour change): `generate` on the calling
thread, the background loop (`start` / `stop`), and `follow`, which processes other than 0 of a
multi-process run call to execute every step process 0 sends."""

from __future__ import annotations

import logging
import threading

import jax

from kvjax.engine.request import Request
from kvjax.engine.step import execute

log = logging.getLogger("kvjax.engine")


class LoopMixin:
    """Methods of `Engine` (kvjax/engine/engine.py) that drive its `step`."""

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run these requests to completion on the calling thread (no background loop)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is running; use add_request")
        for req in requests:
            self.add_request(req)
        while any(not r.finished for r in requests):
            self.step()
        return requests

    def start(self) -> None:
        """Run `step` on a background thread whenever there is work."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="kvjax-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; in a multi-process run this also releases the followers."""
        self._stop = True
        self._wake.set()
        if self._warmup_thread is not None:  # let an in-flight compile finish before exit
            self._warmup_thread.join(timeout=120)
            self._warmup_thread = None
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        else:
            self.channel.stop()

    def _loop(self) -> None:
        try:
            while not self._stop:
                if not self.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as e:  # never let one bad step kill the server
                    log.exception("engine step failed; failing the running requests")
                    for pool in self.pools.values():
                        self._recover(pool, list(pool.running), e)
        finally:
            self.channel.stop()  # on this thread: it orders after this thread's last send

    def follow(self) -> None:
        """Processes other than 0 of a multi-process run: run every step process 0 sends, on
        this process's shards, until process 0 stops."""
        runners = [p.runner for p in self.pools.values()]
        while (step := self.channel.recv()) is not None:
            try:
                for slot in step.slots[step.fresh.astype(bool)]:  # as process 0's _slot did
                    runners[step.pool].untag_slot(int(slot))
                if step.mass:  # process 0 admitted an H2O request: the same program here
                    runners[step.pool].track_attention_mass()
                out = execute(runners[step.pool], step)
                if out is not None:
                    jax.block_until_ready(out)
            except Exception:  # process 0 saw the same failure and failed those requests
                log.exception("follower step failed")
                runner = runners[step.pool]
                if any(x.is_deleted() for x in jax.tree.leaves(runner.cache)):
                    runner.reset_cache()

"""Keep a batch's job leases alive while the worker processes it.

A worker claims jobs with a lease of ``lease_s`` seconds; a batch that runs longer (a slow
device, a large radiograph) would otherwise expire and be claimed by another worker, which
processes the same images again. :class:`LeaseRenewer` renews every job of the batch still
in hand each ``lease_s / 3`` seconds from a small thread, stopped when the batch ends. A job
whose lease was lost anyway (the renewal came too late, an operator requeued it) is dropped
from the renewals; the worker discards its result when ``complete_job`` raises ``LeaseLost``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from types import TracebackType

from spine_node.store import JobStore, LeaseLost

logger = logging.getLogger(__name__)


class LeaseRenewer:
    """Renews the leases of one batch's jobs until stopped (a context manager).

    Parameters
    ----------
    store : JobStore
        The queue (its methods are safe to call from another thread).
    owner : str
        The worker that holds the leases.
    job_ids : iterable of int
        The batch's jobs.
    lease_s : float
        Lease length in seconds; renewed every ``lease_s / 3`` seconds.

    Raises
    ------
    ValueError
        When ``lease_s`` is not positive.
    """

    def __init__(self, store: JobStore, owner: str, job_ids: Iterable[int], lease_s: float) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s!r}")
        self.store = store
        self.owner = owner
        self.lease_s = float(lease_s)
        self._held = set(job_ids)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{owner}", daemon=True)

    def __enter__(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing and wait for the thread (an in-flight renewal finishes first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def release(self, job_id: int) -> None:
        """Stop renewing one job (it is finished, failed or handed back)."""
        with self._lock:
            self._held.discard(job_id)

    def held(self) -> frozenset[int]:
        """The jobs still renewed."""
        with self._lock:
            return frozenset(self._held)

    def renew_once(self) -> None:
        """Renew every held job's lease once; a lost lease drops that job."""
        for job_id in sorted(self.held()):
            if self._stop.is_set():
                return
            try:
                self.store.renew_lease(job_id, self.owner, self.lease_s)
            except LeaseLost as exc:  # finished meanwhile, or claimed by another worker
                logger.info("job %d: lease not renewed: %s", job_id, exc)
                self.release(job_id)
            except Exception as exc:  # a busy database: try again at the next renewal
                logger.warning("job %d: lease not renewed this time: %s", job_id, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.renew_once()

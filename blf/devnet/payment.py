"""A local payment service speaking the public one's REST shape (protocol.md section 7),
for tests and devnets: jobs and their BLIND rewards, kept in memory per node address.

``DevnetPayment().add_job(address, job_id, role="leader", status="completed",
amount=Decimal("1.5"))`` records a job; ``fail_with = 503`` makes every answer that status.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from blf.devnet.server import DevnetError, LocalServer, install_error_handler

__all__ = ["DevnetPayment"]


class DevnetPayment(LocalServer):
    name = "devnet payment service"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._jobs: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.fail_with: int | None = None
        super().__init__(self._build_app(), host=host, port=port)

    def add_job(
        self,
        address: str,
        job_id: str,
        *,
        role: str = "leader",
        status: str = "completed",
        amount: Decimal | None = None,
    ) -> None:
        record = {
            "job_id": job_id,
            "role": role,
            "status": status,
            # A JSON number, as the public service sends it.
            "amount_blind_earned": None if amount is None else float(amount),
        }
        with self._lock:
            self._jobs.setdefault(address.lower(), []).insert(0, record)  # newest first

    def _records(self, address: str) -> list[dict[str, Any]]:
        if self.fail_with is not None:
            raise DevnetError(self.fail_with, "payment service failing on purpose")
        with self._lock:
            return list(self._jobs.get(address.lower(), []))

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="blf devnet payment service")
        install_error_handler(app)

        @app.get("/v1/nodes/{address}/jobs")
        def jobs(address: str, limit: int = Query(20, ge=1, le=1000)) -> JSONResponse:
            return JSONResponse({"jobs": self._records(address)[:limit]})

        @app.get("/v1/nodes/{address}/earnings")
        def earnings(address: str) -> JSONResponse:
            records = self._records(address)
            paid = [r["amount_blind_earned"] for r in records if r["amount_blind_earned"]]
            # Summed in decimal: 0.1 + 0.2 BLIND is 0.3, as the service's books would say.
            total = float(sum((Decimal(str(a)) for a in paid), Decimal(0)))
            return JSONResponse({"total_blind_earned": total, "jobs_count": len(records)})

        return app

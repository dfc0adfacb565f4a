"""RequestLog: one log line per finished request (--enable-log-requests, vLLM's flag), naming what it read: the
base model, an adapter, or a mixture with its scales (``a*0.7+b*-0.3``). An engine observer, so it runs on the
step thread: it only formats and hands the line to logging."""
from __future__ import annotations

import logging

log = logging.getLogger("swapserve.requests")


class RequestLog:
    def __init__(self, model_name: str, tenant_of=None) -> None:
        self.model_name = model_name
        self.tenant_of = tenant_of or (lambda request_id: None)  # the tenant's name, never its key

    def on_request_finished(self, req) -> None:
        end = req.finished_time or req.last_token_time or req.arrival_time
        ttft = "-" if req.first_token_time is None else f"{req.first_token_time - req.arrival_time:.3f}s"
        tenant = self.tenant_of(req.request_id)
        log.info("request %s finished: %sadapters=%s prompt_tokens=%d cached_tokens=%d generated_tokens=%d "
                 "finish_reason=%s ttft=%s e2e=%.3fs%s", req.request_id, f"tenant={tenant} " if tenant else "",
                 req.adapter or self.model_name,
                 len(req.prompt_token_ids), req.num_cached_tokens, len(req.output_token_ids),
                 "error" if req.error else req.finish_reason or "abort", ttft, max(0.0, end - req.arrival_time),
                 f" error={req.error!r}" if req.error else "")

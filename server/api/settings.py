"""ServerConfig: the HTTP layer's settings (the engine's live in server.config.EngineConfig)."""
from __future__ import annotations

from dataclasses import dataclass

MAX_N = 8  # choices per prompt (vLLM's uncapped `n` was a DoS vector)
MAX_PROMPTS_HARD = 4096  # prompts in one /v1/completions request, whatever --max-prompts says
MAX_ADAPTERS_HARD = 256  # entries of `adapters` a body may hold; --max-adapters-per-request is the real limit


@dataclass
class ServerConfig:
    """Settings of the HTTP server; validated in __post_init__.

    api_key:   when set, inference routes (/v1/completions, /v1/chat/completions, /v1/models, /generate*)
               require `Authorization: Bearer <api_key>`.
    api_keys_file: a JSON or YAML list of tenant keys, each scoped to adapter-name globs with its own limits
               (server.api.tenant_keys); reloaded when it changes. With api_key as well, api_key stays one
               unrestricted key.
    admin_key: when set, admin routes require `Authorization: Bearer <admin_key>`; when unset they answer
               loopback clients only (and still require api_key when that is set).
    shutdown_timeout: seconds SIGTERM waits for in-flight requests before aborting them.
    max_body_bytes: larger request bodies are refused with 413.
    max_prompts: most generations one request may start (prompts x n of /v1/completions; lm-eval sends its
               batch as one request). vLLM has no cap; each still counts against --max-waiting.
    enable_log_requests: log one line per finished request (its adapter or mixture, tokens, latency).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_key: str | None = None
    api_keys_file: str | None = None
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 4 << 20
    max_prompts: int = 256
    log_level: str = "info"
    enable_log_requests: bool = False

    def __post_init__(self) -> None:
        self.api_key = self.api_key or None
        self.admin_key = self.admin_key or None
        self.api_keys_file = self.api_keys_file or None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if not 0 <= self.shutdown_timeout <= 86400:  # inf and nan too: the drain needs a deadline
            raise ValueError(f"--shutdown-timeout must be seconds in 0..86400, got {self.shutdown_timeout}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if not 1 <= self.max_prompts <= MAX_PROMPTS_HARD:
            raise ValueError(f"--max-prompts must be in 1..{MAX_PROMPTS_HARD}, got {self.max_prompts}")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level.lower() not in levels:
            raise ValueError(f"--log-level must be one of {', '.join(levels)}; got {self.log_level!r}")
        self.log_level = self.log_level.lower()

    @property
    def admin_loopback_only(self) -> bool:
        return self.admin_key is None

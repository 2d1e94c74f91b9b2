"""The options and limits of one `ecgplat serve` process, fixed at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """What `ecgplat.cli.serve.app.create_app` serves and the bounds it enforces."""

    store: Path | str  # a store folder, or the URL of a published one (s3://...)
    index: Path | None = None  # a gallery index (.faiss) of `store`: /query, /embed
    checkpoint: Path | None = None  # a fine-tuned checkpoint: /predict (and /embed without index)
    tokens: Path | None = None  # bearer tokens file (mode 0600); None = no tokens (loopback only)
    max_upload_bytes: int = 32 * 2**20  # a request body larger than this is refused (413)
    max_unpacked_bytes: int = 128 * 2**20  # what a zip upload may expand to
    max_zip_members: int = 64
    max_record_seconds: float = 600.0  # an uploaded record longer than this is refused
    request_timeout: float = 30.0  # seconds a request may take, body included (408 / 504)
    rate: float = 20.0  # requests per second per token (a token bucket)
    burst: int = 40  # the bucket's size: requests a token may send at once
    max_k: int = 100
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are given
    reload_interval: float = 1.0  # seconds between checks of the index and store for changes
    threads: int = 2  # concurrent model and search runs
    precision: str = "fp32"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_unpacked_bytes", "max_zip_members", "burst", "max_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_record_seconds", "request_timeout", "rate", "reload_interval"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

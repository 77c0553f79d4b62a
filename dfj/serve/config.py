"""What `dfj serve` runs with, checked before anything loads: a bad setting stops the start, with why."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from dfj.judge import PAIRWISE_METHODS, PairwiseMethod

DEFAULT_PORT = 8731


class ServeError(ValueError):
    """The service cannot start as configured."""


@dataclass(frozen=True)
class ServeConfig:
    artifact: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key_file: Path | None = None
    max_queue: int = 16  # requests waiting for the judge; one more is answered 503 with Retry-After
    max_body_mb: float = 20.0  # a body over this is answered 413 before it is read
    timeout_s: float = 120.0  # a request not answered by then is answered 504 (and dropped if still queued)
    image_root: Path | None = None  # `image_path` fields resolve inside it; None: images only inline
    max_batch: int = 64  # items in one batch request
    runtime: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    pairwise: PairwiseMethod = "answer"
    verify: bool = True  # checksum every artifact file before serving
    public_key: Path | None = None  # refuse to serve unless the artifact's dfj.json.sig verifies with it

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port must be 0-65535, not {self.port}")
        if self.max_queue < 1:
            raise ServeError(f"--max-queue must be at least 1, not {self.max_queue}")
        if not 0 < self.max_body_mb <= 1024:
            raise ServeError(f"--max-body-mb must be over 0 and at most 1024, not {self.max_body_mb:g}")
        if not self.timeout_s > 0:
            raise ServeError(f"--timeout must be over 0 seconds, not {self.timeout_s:g}")
        if self.max_batch < 1:
            raise ServeError(f"--max-batch must be at least 1, not {self.max_batch}")
        if self.pairwise not in PAIRWISE_METHODS:
            raise ServeError(f"--pairwise must be one of {', '.join(PAIRWISE_METHODS)}, not {self.pairwise!r}")
        if not is_loopback(self.host) and self.api_key_file is None:
            raise ServeError(
                f"refusing to listen on {self.host}: it is reachable from other machines, and anyone who can "
                "reach it could use the judge. Give --api-key-file FILE (clients send 'Authorization: Bearer "
                "KEY'), or keep the default --host 127.0.0.1"
            )
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise ServeError(f"--image-root {self.image_root} is not a folder")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def max_active(self) -> int:
        """Requests held at once (reading their body, queued or being judged); more are answered 503 at
        once, so memory stays within about max_active × max_body."""
        return 2 * self.max_queue + 8

    def api_key(self) -> bytes | None:
        """The key clients must send, from --api-key-file (its first line, surrounding space removed)."""
        if self.api_key_file is None:
            return None
        path = Path(self.api_key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"--api-key-file {path}: cannot read it ({exc})") from None
        lines = text.strip().splitlines()
        key = lines[0].strip() if lines else ""
        if len(key) < 16:
            raise ServeError(f"--api-key-file {path}: the key must be at least 16 characters (it has {len(key)})")
        if os.name == "posix" and path.stat().st_mode & 0o077:
            # Not an error (a container may mount it so), but a key others can read is no secret.
            import warnings

            warnings.warn(f"--api-key-file {path} is readable by other users (chmod 600 it)", stacklevel=2)
        return key.encode("utf-8")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything

"""`dfj serve`: one loaded judge behind a local HTTP API (FastAPI on uvicorn, the `serve` extra).

`ServeConfig` holds the settings, checked before anything loads; `serve(config)` runs the service until
it is stopped (SIGINT/SIGTERM) and returns the process's exit status; `Service` (dfj.serve.app) is the
ASGI application, for embedding in another server.
"""

from __future__ import annotations

from dfj.serve.config import DEFAULT_PORT, ServeConfig, ServeError, is_loopback

__all__ = ["DEFAULT_PORT", "ServeConfig", "ServeError", "is_loopback", "serve"]

INSTALL_HINT = "dfj serve needs the serve extra: pip install 'dfj[serve]'"


def serve(config: ServeConfig, log_level: str = "info") -> int:
    """Run the service in this process until it is stopped; 1 if the judge failed to load, else 0."""
    try:
        import uvicorn

        from dfj.serve.app import Service
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    import dfj
    from dfj.sources import resolve

    try:  # what the artifact is, checked before the port opens (its checksums are checked while it loads)
        resolve(config.artifact, verify_files=False)
        if config.public_key is not None:  # a signature that fails stops the start
            from dfj.signing import verify_signature

            verify_signature(config.artifact, config.public_key)
    except (ValueError, OSError) as exc:
        raise ServeError(str(exc)) from None
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def load():
        return dfj.load_judge(config.artifact, runtime=config.runtime, device=config.device, dtype=config.dtype,
                              pairwise=config.pairwise, verify=config.verify, public_key=config.public_key)

    def on_load_failed(message: str) -> None:
        failed.append(message)
        print(f"dfj serve: the judge did not load: {message}", flush=True)
        if server is not None:
            server.should_exit = True

    service = Service(config, load, on_load_failed)
    # Behind a proxy the proxy's headers are not trusted (no X-Forwarded-For rewriting of the client).
    server = uvicorn.Server(uvicorn.Config(service.asgi, host=config.host, port=config.port, log_level=log_level,
                                           proxy_headers=False, server_header=False, timeout_keep_alive=5,
                                           timeout_graceful_shutdown=10, lifespan="on"))
    server.run()
    return 1 if failed else 0

"""dfj's version, in one place: the package exports it and every manifest records it; and the
installed version of a library dfj runs on, as manifests and runtimes report it."""

__version__ = "0.1.0"


def package_version(package: str) -> str:
    """The installed version of `package`, or "unknown" where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"

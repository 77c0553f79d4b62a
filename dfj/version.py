"""dfj's version, in one place: the package exports it and every manifest records it."""

__version__ = "0.1.0"

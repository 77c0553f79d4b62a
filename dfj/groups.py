"""The one grouping rule: which records one runtime call judges.

Consecutive records of one image and label, at most `GROUP_SIZE` of them, run as one group: the image
is encoded once and the prompt head they share (the chat up to the first response) runs once. DFJ's
test splits hold 5 responses or 10 pairs per image, so a group is one image's records. The Judge's
batches, the batch reader's units, the bench's workers, the service's scheduler and the llama.cpp
runtime's KV sequences all cut by this rule (importable without torch).
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, TypeVar

T = TypeVar("T")

# Records of one image and label judged in one runtime call (DFJ: 5 responses or 10 pairs per image).
GROUP_SIZE = 10


def group_key(image: object, label: str) -> tuple[str, str]:
    """What records must share to run as one group: the image (its path, or a digest of its pixels)
    and the label as the prompt carries it."""
    return str(image), label.strip().lower()


def chunk_groups(items: Iterable[T], key: Callable[[T], Hashable | None], size: int = GROUP_SIZE,
                 limit: int | None = None) -> Iterator[list[T]]:
    """`items` cut into the chunks one runtime call judges, lazily (a chunk is yielded as soon as the
    next item shows it is complete): consecutive items of one key, at most `size` of them. An item whose
    key is None (an input line that is no record) stays in its place in the current chunk without
    counting toward `size`; `limit` bounds a chunk's length, such items included."""
    chunk: list[T] = []
    current: Hashable | None = None
    counted = 0
    for item in items:
        item_key = key(item)
        if item_key is not None:
            if chunk and (item_key != current or counted >= size):
                yield chunk
                chunk, counted = [], 0
            current = item_key
            counted += 1
        chunk.append(item)
        if limit is not None and len(chunk) >= limit:
            yield chunk
            chunk, counted = [], 0
    if chunk:
        yield chunk

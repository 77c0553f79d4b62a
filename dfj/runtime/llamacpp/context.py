"""The text model's llama.cpp context, through the low-level API (no `Llama` object, whose per-position
score buffer would cost n_ctx x vocab floats): KV sequences and batched decoding.

Sequence 0 holds the head a group of prompts shares; sequences 1..n the group's prompts, each starting
as a copy of sequence 0 (llama.cpp shares the cells, nothing is recomputed). One unified KV cache, so
every sequence may use the whole context.
"""

from __future__ import annotations

import numpy as np

BATCH = 512  # tokens per llama_decode call
GGML_TYPE_F32 = 0


class NoRoom(RuntimeError):
    """The KV cache has no room for a whole group (the caller then runs one prompt at a time)."""


Entry = tuple[int, int, int, bool]  # (token, position, sequence, wants logits)


class TextContext:
    def __init__(self, llama_cpp, model, context_length: int, threads: int, sequences: int, exact: bool) -> None:
        self.llama_cpp = llama_cpp
        self.context_length = context_length
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context_length
        params.n_batch = params.n_ubatch = BATCH
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        params.n_seq_max = sequences + 1  # sequence 0: the shared head
        params.kv_unified = True
        if exact:  # an all-f32 model keeps f32 attention (flash attention on CPU rounds K/V to f16)
            params.type_k = params.type_v = GGML_TYPE_F32
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {context_length} tokens")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)

    def decode(self, entries: list[Entry]) -> dict[tuple[int, int], np.ndarray]:
        """Decode the entries in batches; the logits asked for, by (sequence, position)."""
        rows: dict[tuple[int, int], np.ndarray] = {}
        batch = self.batch
        for offset in range(0, len(entries), BATCH):
            part = entries[offset:offset + BATCH]
            batch.n_tokens = len(part)
            for i, (token, position, seq, wanted) in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = wanted
            status = self.llama_cpp.llama_decode(self.ctx, batch)
            if status == 1:
                raise NoRoom(f"no room in the KV cache of {self.context_length} positions for this group")
            if status != 0:
                raise RuntimeError(f"llama.cpp decode failed (status {status}; context {self.context_length} tokens)")
            for i, (_, position, seq, wanted) in enumerate(part):
                if wanted:
                    pointer = self.llama_cpp.llama_get_logits_ith(self.ctx, i)
                    rows[(seq, position)] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()
        return rows

    def clear(self) -> None:
        self.llama_cpp.llama_memory_clear(self.memory, True)

    def truncate(self, seq: int, position: int) -> None:
        """Drop what sequence `seq` holds from `position` on (-1 with position -1: all of it)."""
        self.llama_cpp.llama_memory_seq_rm(self.memory, seq, position, -1)

    def fork(self, seq: int) -> None:
        """Sequence `seq` becomes a copy of sequence 0 (the shared head)."""
        self.truncate(seq, -1)
        self.llama_cpp.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)

    def release(self, count: int) -> None:
        """Free sequences 1..count (a group's prompts); sequence 0 stays."""
        for seq in range(1, count + 1):
            self.truncate(seq, -1)

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = None

"""Writing an ONNX graph as an artifact file: inline, or with its weights beside it when protobuf's
2 GB message limit would be passed (the export and the quantizer write graphs the same way)."""

from __future__ import annotations

from pathlib import Path

# Protobuf cannot serialise more than 2 GB: bigger graphs (the real 3B/7B decoders) keep their
# weights in one `<graph>.onnx.data` file beside the graph.
EXTERNAL_DATA_BYTES = 1_800_000_000


def save_graph(model, path: Path, external: bool | None) -> None:
    import onnx

    if external is None:
        external = model.ByteSize() > EXTERNAL_DATA_BYTES if _fits(model) else True
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def _fits(model) -> bool:
    try:
        return model.ByteSize() < 2**31
    except Exception:  # protobuf refuses to size a message over 2 GB
        return False

"""Resolve what `load_judge` / `dfj export` are given: a local folder or a Hugging Face id.

A source is one of: a dfj artifact (has `dfj.json`; checksums verified), a merged Qwen2.5-VL model
folder, or a LoRA adapter folder naming its base. The judge's mode comes from the manifest, else the
caller's `mode=`, else the DFJ checkpoint name (`...-Pointwise-DFJ`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dfj import prompts
from dfj.hf import ADAPTER_CONFIG, read_adapter_config
from dfj.images import PixelLimits
from dfj.manifest import MANIFEST_NAME, ArtifactError, Manifest, read_manifest, sha256_file, verify

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODE_IN_NAME = re.compile(r"(pointwise|pairwise)-dfj", re.IGNORECASE)


@dataclass
class Source:
    kind: str  # "model" | "adapter"
    path: Path  # the model folder, or the adapter folder
    mode: str
    name: str  # what the user gave (folder or hub id), for messages and manifests
    base: Path | None = None  # an adapter's base model folder
    manifest: Manifest | None = None

    @property
    def limits(self) -> PixelLimits:
        """The judge's image pixel limits: as recorded in its manifest, else the DFJ training limits."""
        pixels = self.manifest.pixels if self.manifest else {}
        return PixelLimits(**pixels) if pixels else PixelLimits()


def resolve(source: str | os.PathLike, mode: str | None = None, verify_files: bool = True) -> Source:
    name = str(source)
    folder = _locate(name)
    manifest = read_manifest(folder)
    if manifest is not None and verify_files:
        verify(folder, manifest)
    if (folder / ADAPTER_CONFIG).is_file():
        config = read_adapter_config(folder)
        base_ref = config.get("base_model_name_or_path")
        if not base_ref:
            raise ArtifactError(f"{folder}: adapter_config.json names no base_model_name_or_path")
        base = _locate_base(str(base_ref), folder)
        base_manifest = read_manifest(base)
        if base_manifest is not None and verify_files:
            verify(base, base_manifest)
        kind = "adapter"
        hints = [name, str(folder), str(base_ref)]
    elif (folder / "config.json").is_file() or manifest is not None:  # a dfj artifact may carry no HF config (GGUF)
        base = None
        kind = "model"
        hints = [name, str(folder)]
    else:
        raise ArtifactError(f"{folder}: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json)")
    return Source(kind=kind, path=folder, mode=_mode(manifest, mode, hints, name), name=name, base=base, manifest=manifest)


def export_manifest(resolved: Source, fmt: str, source_fields: dict, **fields) -> Manifest:
    """The manifest of an export of `resolved`. Exported from a dfj model artifact (a merge, say), it
    records that artifact's manifest hash and continues its chain of stages, as `dfj quant` does."""
    source = {"name": resolved.name, "kind": resolved.kind, **source_fields}
    chained = resolved.kind == "model" and resolved.manifest is not None
    if chained:
        source["manifest_sha256"] = sha256_file(resolved.path / MANIFEST_NAME)
    manifest = Manifest.for_judge(resolved.mode, fmt, source, **fields)
    if chained and resolved.manifest.chain:
        manifest.chain = [*resolved.manifest.chain, manifest.stage("export")]
    return manifest


def mode_from_name(*names: str) -> str | None:
    for text in names:
        match = _MODE_IN_NAME.search(text)
        if match:
            return match.group(1).lower()
    return None


def _mode(manifest: Manifest | None, requested: str | None, hints: list[str], name: str) -> str:
    if requested is not None:
        prompts.check_mode(requested)
    if manifest is not None:
        if requested is not None and requested != manifest.mode:
            raise ValueError(f"{name} is a {manifest.mode} judge (dfj.json), but mode={requested!r} was asked for")
        return manifest.mode
    if requested is not None:
        return requested
    from_name = mode_from_name(*hints)
    if from_name:
        return from_name
    raise ValueError(
        f"cannot tell whether {name} is a pointwise or a pairwise judge: it has no dfj.json and its name "
        "does not end in -Pointwise-DFJ / -Pairwise-DFJ; pass mode='pointwise' or mode='pairwise'"
    )


def _locate(name: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"{path}: a judge source must be a folder")
        return path.resolve()
    if _HF_ID.match(name) and not name.startswith((".", "/")):
        return _hub_snapshot(name)
    raise ArtifactError(f"judge source not found: {name} (no such folder, and not a Hugging Face id)")


def _locate_base(ref: str, adapter_folder: Path) -> Path:
    path = Path(ref).expanduser()
    if path.is_absolute() and path.is_dir():
        return path
    relative = (adapter_folder / ref).resolve()
    if not path.is_absolute() and relative.is_dir():
        return relative
    if _HF_ID.match(ref):
        return _hub_snapshot(ref)
    raise ArtifactError(f"{adapter_folder}: the adapter's base model {ref!r} was not found")


def _hub_snapshot(repo_id: str) -> Path:
    """Fetch (or, offline, find in the cache) a hub model snapshot; only safetensors are taken."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"],
        )
    except Exception as exc:  # offline and not cached, gated, unknown id, ...
        raise ArtifactError(f"{repo_id}: not a local folder and not available from the Hugging Face cache ({type(exc).__name__}: {exc})") from None
    return Path(folder)

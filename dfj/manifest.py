"""The dfj manifest (`dfj.json`): what an artifact folder is, where it came from, and file checksums.

Every artifact dfj writes carries one; the next step (load, bench, further export) reads it. Loading
verifies the checksums so that a tampered or truncated file is refused with its name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "dfj.json"
# A detached signature of the manifest (`dfj sign`): it vouches for dfj.json, which pins every other file.
SIGNATURE_NAME = "dfj.json.sig"
UNHASHED = (MANIFEST_NAME, SIGNATURE_NAME)  # the two files dfj.json cannot list
SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """An artifact folder is incomplete, tampered with, or not what it claims to be."""


@dataclass
class Manifest:
    mode: str
    format: str  # "safetensors" (HF model folder), "adapter" (peft LoRA); later formats add names
    quant: str = "none"
    source: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    prompt_templates: dict[str, str] = field(default_factory=dict)  # mode -> sha256
    prompt_tokenization: str = ""  # how its judge calls are tokenized (`prompts.PROMPT_TOKENIZATION`)
    pixels: dict[str, int] = field(default_factory=dict)  # min_pixels / max_pixels
    parity: dict[str, Any] = field(default_factory=dict)  # measured against the source, if checked
    extra: dict[str, Any] = field(default_factory=dict)
    # The stages that made it, oldest first (export, then any quantization), each with its parity.
    chain: list[dict[str, Any]] = field(default_factory=list)
    dfj_version: str = ""
    created: str = ""
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        from dfj.version import __version__
        from dfj.prompts import check_mode

        check_mode(self.mode)
        self.dfj_version = self.dfj_version or __version__
        self.created = self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @classmethod
    def for_judge(cls, mode: str, format: str, source: dict[str, Any], limits=None, **fields: Any) -> "Manifest":
        """A manifest for a judge artifact: records this dfj's prompt-template hashes and the pixel limits."""
        from dfj.images import PixelLimits
        from dfj.prompts import MODES, PROMPT_TOKENIZATION, template_sha256

        limits = limits or PixelLimits()
        return cls(mode=mode, format=format, source=source,
                   prompt_templates={m: template_sha256(m) for m in MODES}, prompt_tokenization=PROMPT_TOKENIZATION,
                   pixels={"min_pixels": limits.min_pixels, "max_pixels": limits.max_pixels}, **fields)

    def stage(self, stage: str) -> dict[str, Any]:
        """This artifact as one link of a chain: what it is, what it came from, how close it stayed."""
        return {"stage": stage, "format": self.format, "quant": self.quant, "source": self.source.get("name"),
                "parity": self.parity, "created": self.created}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every regular file below `folder` except the manifest and its signature, by POSIX
    relative path."""
    folder = Path(folder)
    hashes: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise ArtifactError(f"{path}: symbolic links are not allowed in an artifact")
        if path.is_file() and path.name not in UNHASHED:
            hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Hash the folder's files into the manifest and write it (last, so a partial folder has none)."""
    manifest.files = hash_folder(folder)
    if not manifest.chain:  # an export: the chain starts here (a quantization passes its input's on)
        manifest.chain = [manifest.stage("export")]
    target = Path(folder) / MANIFEST_NAME
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, target)
    return manifest


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The folder's manifest, or None if it has none. A manifest that does not parse is an error."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable dfj manifest ({exc})") from None


def verify(folder: str | os.PathLike, manifest: Manifest | None = None) -> Manifest:
    """Check every file the manifest lists is present and unchanged; raise ArtifactError naming it."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder}: no {MANIFEST_NAME}; not a dfj artifact")
    if not manifest.files:
        raise ArtifactError(f"{folder}: {MANIFEST_NAME} lists no files")
    for name, expected in sorted(manifest.files.items()):
        path = folder / name
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ArtifactError(f"{folder}: manifest names a file outside the artifact: {name}")
        if not path.is_file():
            raise ArtifactError(f"{folder}: missing file {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{folder}: file {name} does not match its checksum (tampered or corrupt)")
    # A file added after export (a planted weight shard or module) is tampering too.
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if (path.is_file() or path.is_symlink()) and name not in UNHASHED and name not in manifest.files:
            raise ArtifactError(f"{folder}: file {name} is not listed in {MANIFEST_NAME} (added after export)")
    return manifest


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())

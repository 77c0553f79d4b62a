"""Provenance: which judge gave a verdict, from which input, with which software and settings.

A verdict's provenance has two parts. The *run* is what every verdict of one loaded judge shares: the
artifact's identity (the sha256 of its `dfj.json`, which pins every file by its own sha256), its mode,
format and quant, what the runtime says of itself (name, device, dtype, library versions, and for
llama.cpp the CPU level it runs), the pairwise method and decoding limit, the prompt template's hash
and dfj's version. Its `run_id` is the sha256 of the run's canonical JSON. The *record* part is the
sha256 of the image bytes as read, of each response text, and the options the verdict was asked with.

The Python API, `dfj judge` and the service put both on every verdict (`provenance`). A results file
(`dfj judge --out`) puts the record part and the run id on each line and the run once in a sidecar,
`OUT.provenance.json`, so that each line stays one input line's verdict (docs/provenance.md says why).
The folder an artifact lies in and the input file's path are recorded in the sidecar, outside the
run id: moving a folder does not change which judge it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from dfj import prompts
from dfj.version import __version__

SCHEMA = "dfj-provenance/1"
SIDECAR_SUFFIX = ".provenance.json"


def canonical(value: Any) -> bytes:
    """The one byte string a JSON value hashes as: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def text_sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def artifact_identity(source: Any) -> dict[str, Any]:
    """What pins a judge's files: the sha256 of its `dfj.json` (which holds every file's sha256), or, for
    a folder without one, the sha256 of its files' hashes; an adapter's base counts too (`base`)."""
    from dfj.manifest import MANIFEST_NAME, hash_folder, sha256_file

    identity: dict[str, Any] = {}
    for role, folder in (("judge", source.path), ("base", getattr(source, "base", None))):
        if folder is None:
            continue
        manifest = Path(folder) / MANIFEST_NAME
        if manifest.is_file():
            identity[role] = {"pinned_by": MANIFEST_NAME, "sha256": sha256_file(manifest)}
        else:
            identity[role] = {"pinned_by": "files", "sha256": hashlib.sha256(canonical(hash_folder(Path(folder)))).hexdigest()}
    return identity


def artifact_fingerprint(artifact: str | os.PathLike, mode: str | None = None) -> str:
    """One sha256 for the artifact's identity (the judge and any base): what a Ray worker checks it sees."""
    from dfj.sources import resolve

    return hashlib.sha256(canonical(artifact_identity(resolve(artifact, mode=mode, verify_files=False)))).hexdigest()


def run_provenance(judge: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """The run part of a judge's verdicts (see the module docstring)."""
    manifest = judge.manifest
    return {
        "schema": SCHEMA,
        "artifact": {"identity": identity, "mode": judge.mode,
                     "format": manifest.format if manifest else judge.info.get("kind", "source"),
                     "quant": manifest.quant if manifest else "none"},
        "runtime": judge.runtime.describe(),
        "pairwise": judge.pairwise if judge.mode == "pairwise" else None,
        "max_new_tokens": judge.new_token_limit,
        "prompt_template_sha256": prompts.template_sha256(judge.mode),
        "dfj": __version__,
    }


def run_id(run: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical(run)).hexdigest()


def record_provenance(image_sha256: str, responses: Sequence[str], options: dict[str, bool]) -> dict[str, Any]:
    return {"image_sha256": image_sha256, "responses_sha256": [text_sha256(r) for r in responses], "options": options}


def sidecar_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + SIDECAR_SUFFIX)


def file_provenance(verdict_provenance: dict[str, Any] | None, unit: int) -> dict[str, Any] | None:
    """A verdict's provenance as a results file's line carries it: the run by its id (the sidecar holds
    it), and `unit`, the line its group of one runtime call starts at."""
    if verdict_provenance is None:
        return None
    return {**{k: v for k, v in verdict_provenance.items() if k != "run"}, "unit": unit}


def record_run(out: str | os.PathLike, run: dict[str, Any], artifact: str, source: str | os.PathLike, *,
               continuing: bool, image_root: str | os.PathLike | None = None) -> Path:
    """Make `out`'s sidecar hold `run` before a line of it is written. A new file starts a new sidecar;
    a file being continued (`continuing`: --resume with lines already done) keeps its runs and adds this
    one, unless it names another artifact: its earlier lines were judged by another judge."""
    path = sidecar_path(out)
    body: dict[str, Any] = {"schema": SCHEMA, "artifact_path": str(artifact), "input": str(Path(source).resolve()),
                            "image_root": str(Path(image_root).resolve()) if image_root else None, "runs": {}}
    if continuing:
        body = read_sidecar(out)
        identities = {canonical(r["artifact"]["identity"]) for r in body["runs"].values()}
        if identities and canonical(run["artifact"]["identity"]) not in identities:
            raise ValueError(f"{out} was judged by another artifact than {artifact} (its {path.name} names "
                             f"{next(iter(body['runs'].values()))['artifact']['identity']}); not continuing it")
    rid = run_id(run)
    if body["runs"].get(rid) == run and path.is_file():
        return path
    body["runs"][rid] = run
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_sidecar(out: str | os.PathLike) -> dict[str, Any]:
    """A results file's sidecar, each run checked to hash to its id; a ValueError says what is wrong."""
    path = sidecar_path(out)
    if not path.is_file():
        raise ValueError(f"{path}: not found: the runs {Path(out).name}'s lines name are written there")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA or not isinstance(body.get("runs"), dict):
        raise ValueError(f"{path}: not a {SCHEMA} sidecar")
    for rid, run in body["runs"].items():
        if not isinstance(run, dict) or run_id(run) != rid:
            raise ValueError(f"{path}: run {rid} does not hash to its id: the sidecar was edited")
    return body

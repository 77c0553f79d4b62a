"""What re-judges bit for bit: judge held-out records with an artifact, then `dfj verify-verdicts` the
results file under changed conditions (a benchmark, not a test: minutes on 2 cores).

    python -m benchmarks.reproducibility --out /tmp/dfj-repro [--json docs/results/reproducibility.json]

For the trained tiny judges' merged fp32 (torch), ONNX fp32 and GGUF Q8_0 artifacts, in each mode: one
`dfj judge --jsonl --out` run with this machine's defaults, then a verification of that file in a
fresh process under each condition: the same settings; torch on one thread; torch's
kernels capped at AVX2 (ATen and oneDNN: what an AVX2-only CPU runs); llama.cpp's AVX2 CPU level
(`DFJ_LLAMA_CPU=haswell`). A condition that does not reach a runtime is skipped for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RECORDS = {"pairwise": 30, "pointwise": 15}
CONDITIONS = {
    "same settings": {},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "torch kernels capped at AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "llama.cpp AVX2 level": {"DFJ_LLAMA_CPU": "haswell"},
}
APPLIES = {"1 thread": ("torch",), "torch kernels capped at AVX2": ("torch",), "llama.cpp AVX2 level": ("llamacpp",)}
ARTIFACTS = {"merged fp32 (torch)": ("torch", "none"), "ONNX fp32": ("onnx", "onnx-fp32"), "GGUF Q8_0": ("llamacpp", "gguf-q8_0")}


def _dfj(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfj.cli", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=3600)


def _input(mode: str, folder: Path) -> Path:
    from dfj.data import read_split
    from dfj.tiny import trained_tiny_split

    split = trained_tiny_split(mode)
    lines = []
    for record in read_split(split).records[: RECORDS[mode]]:
        fields = {"response": record.response} if mode == "pointwise" else {"response_a": record.response_a,
                                                                             "response_b": record.response_b}
        lines.append(json.dumps({"image": record.image, "label": record.label, **fields}))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Work folder (artifacts, results files).")
    parser.add_argument("--json", type=Path, help="Write the table's numbers here.")
    args = parser.parse_args()
    from dfj.pipeline import build
    from dfj.tiny import trained_tiny_judge

    rows = []
    for mode in ("pairwise", "pointwise"):
        data = _input(mode, args.out / f"input-{mode}")
        for name, (runtime, quant) in ARTIFACTS.items():
            artifact = args.out / f"{mode}-{quant}"
            if not (artifact / "dfj.json").is_file():
                build(trained_tiny_judge(mode), artifact, quant, overwrite=True)
            out = args.out / f"{mode}-{quant}.jsonl"
            options = ["--expected-score"] if mode == "pointwise" else ["--swap-check"]
            started = time.perf_counter()
            made = _dfj("judge", str(artifact), "--jsonl", str(data), "--out", str(out), "--force", "--image-root", "/",
                        *options)
            if made.returncode:
                raise SystemExit(made.stderr[-3000:])
            print(f"{mode} {name}: judged in {time.perf_counter() - started:.0f} s", flush=True)
            for condition, env in CONDITIONS.items():
                if condition in APPLIES and runtime not in APPLIES[condition]:
                    continue
                report = args.out / f"{mode}-{quant}-{condition.replace(' ', '_')}.json"
                checked = _dfj("verify-verdicts", str(out), "--artifact", str(artifact), "--report", str(report), env=env)
                if checked.returncode not in (0, 1):
                    raise SystemExit(checked.stdout[-2000:] + checked.stderr[-3000:])
                body = json.loads(report.read_text())
                deltas = [abs(c["recorded"][k] - c["rejudged"][k]) for c in body["checked"] if c["outcome"] == "different"
                          for k in ("p_a", "expected_score") if isinstance(c["recorded"].get(k), float)
                          and isinstance(c["rejudged"].get(k), float)]
                changed = [c for c in body["checked"] if c["outcome"] == "different"
                           and any(c["recorded"].get(k) != c["rejudged"].get(k) for k in ("choice", "score", "text"))]
                rows.append({"mode": mode, "artifact": name, "condition": condition, **body["counts"],
                             "verdicts_changed": len(changed), "max_float_delta": max(deltas, default=0.0),
                             "run_differences": sum(body["runs"].values(), [])})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| mode | artifact | condition | identical | different | verdict changed | max Δ p_a / expected score |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['artifact']} | {row['condition']} | {row['identical']} | {row['different']} | "
              f"{row['verdicts_changed']} | {row['max_float_delta']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

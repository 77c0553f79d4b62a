"""Measure how far the trained tiny judges' quality moves between builds (issue 23).

Each build is the whole recipe (`dfj.tiny.training.build_trained_judges`: base, both LoRA judges, the
evaluation with and without the image) in a fresh process, under one seed and one setting of the CPU
kernels. Forcing PyTorch, oneDNN and MKL onto narrower instruction sets on this machine stands in for
other processors: the accumulation order and rounding of the matrix products change, and training
amplifies the difference. A benchmark, not a test: each build takes 15-30 minutes on 2 cores.

    .venv/bin/python benchmarks/trained_spread.py --out /tmp/spread build seed0-native seed1-native ...
    .venv/bin/python benchmarks/trained_spread.py --out /tmp/spread table   # markdown, every gated metric

A build's folder is `OUT/NAME/trained-v*-seed*` (the layout of `$DFJ_CACHE`), so the trained-judge
tests run against it with `DFJ_CACHE=OUT/NAME`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The kernel settings: environment variables read when torch, oneDNN and MKL load.
KERNELS = {
    # This machine's own choice (here AVX-512 with AMX for bf16).
    "native": {},
    # AVX-512 without AMX: bf16 products on AVX512_BF16 (as on AMD EPYC Zen 4 machines).
    "avx512-noamx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    # An AVX2 machine: ATen's vector kernels, oneDNN and MKL all limited to AVX2 (no native bf16, so
    # the judge phase's head runs in fp32: `dfj.tiny.training.head_dtype`).
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    # ATen's scalar kernels (and the compiled loss without vector code); the matrix products unchanged.
    "default": {"ATEN_CPU_CAPABILITY": "default"},
}

BUILD = """
import sys, time
from dfj.tiny import trained_tiny_root
started = time.perf_counter()
root = trained_tiny_root(seed=int(sys.argv[1]))
print(f"built {root} in {time.perf_counter() - started:.0f} s")
"""


def parse_name(name: str) -> tuple[int, str]:
    """'seed1-avx2' -> (1, 'avx2')."""
    seed, _, kernels = name.partition("-")
    if not seed.startswith("seed") or not seed[4:].isdigit() or kernels not in KERNELS:
        raise SystemExit(f"build names are seedN-KERNELS with KERNELS one of {sorted(KERNELS)}, not {name!r}")
    return int(seed[4:]), kernels


def build(out: Path, name: str, threads: int | None) -> None:
    seed, kernels = parse_name(name)
    cache = out / name
    env = {**os.environ, **KERNELS[kernels], "DFJ_CACHE": str(cache)}
    if threads:  # two builds side by side on 2 cores: one thread each (thread count is one more machine difference)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "build.json").write_text(json.dumps({"seed": seed, "kernels": KERNELS[kernels], "threads": threads or os.cpu_count()}))
    started = time.perf_counter()
    with open(cache / "build.log", "w") as log:
        done = subprocess.run([sys.executable, "-c", BUILD, str(seed)], env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: exit {done.returncode} after {time.perf_counter() - started:.0f} s (log: {cache / 'build.log'})")
    if done.returncode:
        raise SystemExit(done.returncode)


def text_decided(root: Path, mode: str, metrics: dict) -> float:
    """Share of right verdicts (with the image) on the records whose gold the words decide."""
    lines = (root / "splits" / mode / "test" / "data.jsonl").read_text().splitlines()
    golds = [json.loads(line)["messages"][-1]["content"] for line in lines]
    needs = [json.loads(line)["meta"]["needs_image"] for line in lines]
    got = metrics[mode]["verdicts"]["with_image"]
    gold = [int(g.split("<score>")[1][0]) if mode == "pointwise" else g.split("<answer>")[1][0] for g in golds]
    picked = [i for i, need in enumerate(needs) if not need]
    return sum(got[i] == gold[i] for i in picked) / len(picked)


def row(name: str, root: Path) -> list[str]:
    metrics = json.loads((root / "metrics.json").read_text())
    threads = json.loads((root.parent / "build.json").read_text())["threads"]
    head = metrics.get("machine", {}).get("head_dtype", "bfloat16")  # builds before it was recorded: bf16
    point, pair = metrics["pointwise"], metrics["pairwise"]
    seen, blank = point["with_image"], point["blank_image"]
    need_seen, need_blank = point["needs_image"]["with_image"], point["needs_image"]["blank_image"]
    t = metrics["timings"]
    return [
        f"{name} ({threads} thread{'s' if threads > 1 else ''}, {head} head)",
        f"{seen['rmse']:.3f} / {seen['pearson']:.3f}",
        f"{blank['rmse']:.3f} / {blank['pearson']:.3f}",
        f"{need_seen['rmse']:.3f} / {need_blank['rmse']:.3f}",
        f"{need_seen['exact']:.3f} / {need_blank['exact']:.3f}",
        f"{seen['parse_failure_rate']:.3f}",
        f"{text_decided(root, 'pointwise', metrics):.3f} / {text_decided(root, 'pairwise', metrics):.3f}",
        f"{pair['with_image']['accuracy']:.3f} / {pair['blank_image']['accuracy']:.3f}",
        f"{pair['needs_image']['with_image']['accuracy']:.3f} / {pair['needs_image']['blank_image']['accuracy']:.3f}",
        f"{t['train_total_s']:.0f} + {t['pointwise_eval_s'] + t['pairwise_eval_s']:.0f}",
    ]


HEADER = ["build", "pointwise RMSE / Pearson", "blanked RMSE / Pearson", "needs-image RMSE seen / blanked",
          "needs-image exact seen / blanked", "pointwise parse failures",
          "text-decided right, pointwise / pairwise", "pairwise acc. / blanked",
          "pairwise needs-image / blanked", "train + eval s"]


def table(out: Path) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for path in sorted(out.glob("*/trained-v*-seed*/metrics.json")):
        lines.append("| " + " | ".join(row(path.parent.parent.name, path.parent)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    builds = sub.add_parser("build")
    builds.add_argument("names", nargs="+", help="seedN-KERNELS, KERNELS one of: " + ", ".join(KERNELS))
    builds.add_argument("--threads", type=int, help="torch threads per build (default: torch's own choice)")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "build":
        for name in args.names:
            parse_name(name)
        for name in args.names:
            build(args.out, name, args.threads)
    print(table(args.out))


if __name__ == "__main__":
    main()

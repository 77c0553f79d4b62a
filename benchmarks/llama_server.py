"""dfj's llama.cpp runtime against llama.cpp's own `llama-server` on the same GGUF artifact, the same
records and the same cores: seconds per verdict, and how far the server's verdicts are from dfj's. A
benchmark, not a test (`tests/test_llama_tools.py` holds the verdicts to dfj's on the trained judges).

    python -m benchmarks.llama_server --mode pairwise [--quant gguf-q4_k_m] [--images 1]
                                      [--text-layers 4] [--vision-layers 4 | --full-depth 3B]
                                      [--vision mtmd torch torch-bf16] [--out FILE.json]

The judge is `benchmarks.speed`'s (the released 3B's widths, fewer layers, random weights) and so is the
split (images near the training pixel cap, 10 pairs or 5 responses on each). dfj runs the records as
`dfj judge --data` does (grouped by image: the image encoded once, the shared head's KV reused, a pair's
verdict in one forward). The server runs as a deployment would (`scripts/build-llama-tools.sh`; one slot,
its prompt cache on, dfj's CPU level), each record one request with its image, as a client sends them, by
the recipes of docs/embedding.md: pairwise `/completion` reading P(A) after `<answer`, pointwise chat
completions. Random weights never close `</score>`, so pointwise both decode `--new-tokens` tokens
(dfj's cap; the server with `ignore_eos`); the rows say how many each wrote. `--vision` runs dfj once per
image encoder (`dfj judge --vision`), all against the one server run.

The request helpers here are the documented recipes; the tests use them too.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import json
import math
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.report import emit

ROOT = Path(__file__).resolve().parents[1]
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"  # mtmd writes these around an image itself
START_S = 300  # a server loads a judge well within this on any machine


def tools_bin() -> Path | None:
    """The folder of llama.cpp's programs built by scripts/build-llama-tools.sh, or None if not built."""
    found = subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-tools.sh"), "--where"], capture_output=True,
                           text=True)
    return Path(found.stdout.strip()) / "bin" if found.returncode == 0 else None


def tool_environment(artifact: Path) -> dict[str, str]:
    """The CPU level dfj's runtime chose, for the tools' ggml (built without a CPU backend of its own)."""
    from dfj.layout import GGUF_TEXT_FILE
    from dfj.runtime.llamacpp.library import cpu_backend

    backend = cpu_backend(artifact / GGUF_TEXT_FILE).path
    if not backend:
        raise RuntimeError("dfj's llama.cpp carries no CPU level libraries to give llama.cpp's tools")
    return {**os.environ, "GGML_BACKEND_PATH": backend}


def tool_options(artifact: Path, threads: int | None = None) -> list[str]:
    """Model, projector, threads, and the judge's pixel limits as mtmd's image token limits (an image
    fitted by dfj is then taken as it is): the same for the server and the CLI."""
    from dfj.layout import GGUF_MMPROJ_FILE, GGUF_TEXT_FILE
    from dfj.manifest import read_manifest

    pixels = read_manifest(artifact).pixels
    return ["-m", str(artifact / GGUF_TEXT_FILE), "--mmproj", str(artifact / GGUF_MMPROJ_FILE),
            "-t", str(threads or os.cpu_count() or 1), "-c", "8192",
            "--image-min-tokens", str(pixels["min_pixels"] // 28**2),
            "--image-max-tokens", str(pixels["max_pixels"] // 28**2)]


@functools.lru_cache(maxsize=64)
def fitted_png(artifact: Path, image) -> bytes:
    """The record's image at its model size, as dfj fits it (`dfj.images.fit_to_grid`), as PNG bytes;
    kept per image, so the benchmark encodes each image before its clock starts, as a client holding
    the files would."""
    from dfj.images import PixelLimits, fit_to_grid, load_image
    from dfj.manifest import read_manifest

    buffer = io.BytesIO()
    fit_to_grid(load_image(image), PixelLimits(**read_manifest(artifact).pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


class LlamaServer:
    """`llama-server` on a loopback port, started here and stopped by `stop` (or the `with` block)."""

    def __init__(self, tools: Path, artifact: Path, log: Path, threads: int | None = None) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [str(tools / "llama-server"), *tool_options(artifact, threads), "--host", "127.0.0.1",
                   "--port", str(self.port), "-np", "1", "--jinja", "--no-webui"]
        started = time.perf_counter()
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=log.parent,
                                            env=tool_environment(artifact))
        deadline = time.monotonic() + START_S
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"llama-server exited: {log.read_text(errors='replace')[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server not ready in {START_S} s: {log.read_text(errors='replace')[-3000:]}")
                with contextlib.suppress(OSError, urllib.error.HTTPError, json.JSONDecodeError):
                    if self.get("/health").get("status") == "ok":
                        break
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        self.load_s = time.perf_counter() - started
        # Where an image goes in a raw prompt: random per start, so no prompt text can forge one.
        self.marker: str = self.get("/props")["media_marker"]

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{route}", timeout=60) as answer:
            return json.loads(answer.read())

    def post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"llama-server {route}: {error.code} {error.read()[:2000]!r}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def server_chat(marker: str, mode: str, label: str, *responses: str) -> str:
    """The raw prompt: dfj's chat text with its image block replaced by the server's media marker."""
    from dfj.prompts import render, render_chat

    chat = render_chat(render(mode, label, *responses))
    if chat.count(IMAGE_BLOCK) != 1:
        raise ValueError("the chat must hold exactly one image block")
    return chat.replace(IMAGE_BLOCK, marker)


def answer_branches(judge) -> tuple[str, int, int]:
    """The text that ends a pairwise prompt and the ids of A and B after it, as dfj's one-forward verdict
    reads them (`Judge.answer_plan`; in Qwen2.5's vocabulary `<`, `answer`, then `>A` or `>B`, so the
    prompt ends in `<answer`)."""
    plan = judge.answer_plan()
    if len(plan.tokens) != 2:
        raise ValueError(f"expected two answer branches, got {len(plan.tokens)}")
    return judge.runtime.decode(list(plan.forced[: plan.at])), plan.tokens[0], plan.tokens[1]


def pairwise_p_a(server: LlamaServer, artifact: Path, record, branches: tuple[str, int, int],
                 **options) -> tuple[float, dict]:
    """P(A) renormalised over A and B from `/completion` with `n_probs` (log-probabilities of the raw
    distribution), and the server's answer."""
    forced, letter_a, letter_b = branches
    body = {"prompt": {"prompt_string": server_chat(server.marker, "pairwise", record.label, record.response_a,
                                                    record.response_b) + forced,
                       "multimodal_data": [base64.b64encode(fitted_png(artifact, record.image)).decode()]},
            "n_predict": 1, "n_probs": 20, "temperature": 0, **options}
    answer = server.post("/completion", body)
    top = {row["id"]: row["logprob"] for row in answer["completion_probabilities"][0]["top_logprobs"]}
    if letter_a not in top or letter_b not in top:
        return math.nan, answer  # neither letter among the 20 likeliest: no P(A) to read
    p_a, p_b = math.exp(top[letter_a]), math.exp(top[letter_b])
    return p_a / (p_a + p_b), answer


def pointwise_messages(artifact: Path, record) -> list[dict]:
    """Chat-completions messages for a pointwise record: the image (as dfj fits it), then the DFJ prompt."""
    from dfj.prompts import render

    image = "data:image/png;base64," + base64.b64encode(fitted_png(artifact, record.image)).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": render("pointwise", record.label, record.response)}]}]


def pointwise_text(server: LlamaServer, artifact: Path, record, max_tokens: int, **options) -> tuple[str, dict]:
    answer = server.post("/v1/chat/completions", {"messages": pointwise_messages(artifact, record), "temperature": 0,
                                                   "top_k": 1, "max_tokens": max_tokens, **options})
    return answer["choices"][0]["message"]["content"], answer


def full_depth_artifact(folder: Path, size: str, mode: str, quant: str) -> Path:
    """The released `size`'s every layer, random weights (`dfj.tiny.full_depth`, bf16, one tensor at a
    time), exported to `quant` from base + adapter; kept in `folder` and reused."""
    from dfj.manifest import read_manifest
    from dfj.pipeline import build
    from dfj.tiny.full_depth import build_random_judge, real_shapes

    out = folder / f"full-{size}-{mode}-{quant}"
    if out.is_dir() and read_manifest(out) is not None:
        return out
    adapter = folder / f"full-{size}-{mode}" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        started = time.perf_counter()
        adapter = build_random_judge(folder / f"full-{size}-{mode}", *real_shapes(size), mode=mode)
        print(f"built the random full-depth {size} judge in {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    build(str(adapter), out, quant, overwrite=True)
    print(f"exported {quant} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def run(mode: str, quant: str, folder: Path, text_layers: int, vision_layers: int, images: int,
        new_tokens: int, full_depth: str | None = None, visions: tuple[str, ...] = ("mtmd",)) -> dict[str, Any]:
    from benchmarks.speed import _command, _exported, bench_split, build_bench_judge
    from dfj.data import read_split

    tools = tools_bin()
    if tools is None:
        raise SystemExit("llama.cpp's tools are not built: run scripts/build-llama-tools.sh")
    split = bench_split(folder / f"split-{mode}-{images}", mode, images)
    if full_depth:
        from dfj.tiny.full_depth import real_shapes

        text, vision = real_shapes(full_depth)
        text_layers, vision_layers = text["num_hidden_layers"], vision["depth"]
        artifact = full_depth_artifact(folder, full_depth, mode, quant)
    else:
        judge_dir = build_bench_judge(folder / f"bench-judge-t{text_layers}-v{vision_layers}", text_layers, vision_layers)
        artifact = _exported(judge_dir, mode, quant)
    records = read_split(split, mode=mode).records
    if mode == "pairwise":
        new_tokens = 8  # unused by the one-forward verdict
    runs = {vision: _command(str(artifact), split, folder / f"out-{mode}-{quant}-{vision}-llama-server.jsonl", mode,
                             new_tokens, vision=vision) for vision in visions}
    ours = runs[visions[0]]
    import dfj

    # dfj's judge only tokenizes here, and is closed before the server loads the same files.
    judge = dfj.load_judge(str(artifact), mode=mode)
    try:
        branches = answer_branches(judge) if mode == "pairwise" else None
        dfj_tokens = [len(judge.runtime.tokenize(mine["text"], True)) for mine in ours["rows"]] if mode == "pointwise" else []
    finally:
        judge.runtime.close()
    for record in records:
        fitted_png(artifact, record.image)
    rows: list[dict[str, Any]] = []
    log = folder / f"llama-server-{mode}-{quant}.log"
    with LlamaServer(tools, artifact, log) as server:
        load_s = server.load_s
        started = time.perf_counter()
        if branches is not None:
            for record, mine in zip(records, ours["rows"], strict=True):
                t0 = time.perf_counter()
                p_a, answer = pairwise_p_a(server, artifact, record, branches)
                rows.append({"seconds": time.perf_counter() - t0, "p_a": None if math.isnan(p_a) else p_a,
                             "dfj_p_a": mine["p_a"], "prompt_tokens_run": answer["timings"]["prompt_n"]})
            total = time.perf_counter() - started
            # Random weights seldom put A and B among the 20 likeliest: read them from the whole
            # distribution, untimed (a client of a trained judge needs only the 20).
            for record, row in zip(records, rows):
                if row["p_a"] is None:
                    row["p_a"], _ = pairwise_p_a(server, artifact, record, branches, n_probs=1 << 20)
                    row["p_a_from"] = "whole distribution"
        else:
            for record, mine, tokens in zip(records, ours["rows"], dfj_tokens, strict=True):
                t0 = time.perf_counter()
                text, answer = pointwise_text(server, artifact, record, new_tokens, ignore_eos=True)
                rows.append({"seconds": time.perf_counter() - t0, "same_text": text == mine["text"],
                             "tokens": answer["usage"]["completion_tokens"], "dfj_tokens": tokens,
                             "prompt_tokens_run": answer["timings"]["prompt_n"]})
            total = time.perf_counter() - started
    per_image = len(records) // images
    firsts = [row["seconds"] for index, row in enumerate(rows) if index % per_image == 0]
    rest = [row["seconds"] for index, row in enumerate(rows) if index % per_image != 0]
    result: dict[str, Any] = {
        "mode": mode, "artifact": quant, "judge": f"full-depth {full_depth}" if full_depth else "3B widths",
        "records": len(records), "images": images, "text_layers": text_layers,
        "vision_layers": vision_layers, "threads": os.cpu_count(),
        "dfj": {"command": f"dfj judge {quant} --data SPLIT --out OUT --vision {visions[0]}", "vision": visions[0],
                "kernels": ours["kernels"], "load_s": ours["load_s"], "per_verdict_s": ours["per_verdict_s"],
                "split_s": ours["split_s"]},
        "llama_server": {"load_s": load_s, "per_verdict_s": total / len(records),
                         "first_of_image_s": sum(firsts) / len(firsts) if firsts else None,
                         "rest_of_image_s": sum(rest) / len(rest) if rest else None},
        "speedup_dfj_over_server": (total / len(records)) / ours["per_verdict_s"],
        "rows": rows,
    }
    for vision, other in list(runs.items())[1:]:  # the same records through another image encoder
        entry = {"vision": vision, "load_s": other["load_s"], "per_verdict_s": other["per_verdict_s"],
                 "split_s": other["split_s"], "speedup_over_server": (total / len(records)) / other["per_verdict_s"]}
        if mode == "pairwise":
            pairs = list(zip(other["rows"], ours["rows"]))
            entry["same_choice_as_first"] = sum((a["p_a"] >= 0.5) == (b["p_a"] >= 0.5) for a, b in pairs) / len(pairs)
            entry["max_abs_delta_p_a_from_first"] = max(abs(a["p_a"] - b["p_a"]) for a, b in pairs)
        else:
            entry["same_text_as_first"] = sum(a["text"] == b["text"] for a, b in zip(other["rows"], ours["rows"])) / len(records)
        result.setdefault("dfj_other_vision", []).append(entry)
    if mode == "pairwise":
        read = [row for row in rows if row["p_a"] is not None]
        result["p_a_read"] = len(read)
        result["same_choice"] = sum((r["p_a"] >= 0.5) == (r["dfj_p_a"] >= 0.5) for r in read) / max(1, len(read))
        result["max_abs_delta_p_a"] = max((abs(r["p_a"] - r["dfj_p_a"]) for r in read), default=None)
    else:
        result["same_text"] = sum(row["same_text"] for row in rows) / len(rows)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pointwise", "pairwise"), required=True)
    parser.add_argument("--quant", default="gguf-q4_k_m", help="the GGUF format both run (gguf-q8_0, gguf-q4_k_m, …)")
    parser.add_argument("--images", type=int, default=1, help="images in the split (10 pairs / 5 responses each)")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96, help="pointwise tokens decoded by both")
    parser.add_argument("--full-depth", choices=("3B", "7B"), default=None,
                        help="the released size's every layer instead of --text-layers / --vision-layers")
    parser.add_argument("--vision", nargs="+", default=["mtmd"], choices=("mtmd", "torch", "torch-bf16"),
                        help="dfj's image encoders to run, the first one compared with the server in full")
    parser.add_argument("--work", type=Path, default=None, help="where the bench judge is built (default: dfj cache)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from dfj.tiny import default_cache

    emit(run(args.mode, args.quant, args.work or default_cache() / "speed", args.text_layers, args.vision_layers,
             args.images, args.new_tokens, args.full_depth, tuple(args.vision)), args.out)


if __name__ == "__main__":
    main()

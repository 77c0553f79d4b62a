"""The `dfj` command. Thin: it parses arguments and calls the library; heavy imports happen inside
each command so `dfj --help` stays instant."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from dfj.tolerances import bench_defaults

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Export, run and verify DeepfakeJudge (Qwen2.5-VL) judges.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags show as flags, and logs and pipes read it as it is
)

COMMANDS = ("judge", "export", "quant", "bench", "info", "serve", "probe", "verify-verdicts", "sign", "keygen", "demo")


def flag(*names: str, help: str) -> Any:  # noqa: A002 - typer's own keyword
    """A boolean option that is a flag (present or not): its help shows no value to give."""
    return typer.Option(False, *names, help=help, metavar="")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# What the library raises for bad input or a missing extra: reported as `error: …`, exit 2.
LIBRARY_ERRORS = (ValueError, FileExistsError, FileNotFoundError, ImportError, RuntimeError)


@contextlib.contextmanager
def _reported(errors: tuple[type[BaseException], ...] = LIBRARY_ERRORS) -> Iterator[None]:
    """Library errors inside become one `error:` line and exit 2. A failure already reported passes
    through: click's Exit is a RuntimeError, and catching it again printed `error: 2`."""
    try:
        yield
    except typer.Exit:
        raise
    except errors as exc:
        _fail(str(exc))


@app.command()
def judge(
    artifact: str = typer.Argument(..., help="Judge folder, adapter folder, dfj artifact or Hugging Face id."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image file (one verdict)."),
    label: Optional[str] = typer.Option(None, "--label", help="Ground-truth label: real, fake or edited."),
    response: Optional[str] = typer.Option(None, "--response", help="Detector response (response A for a pairwise judge)."),
    response_b: Optional[str] = typer.Option(None, "--response-b", help="Response B (pairwise judges)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Judge a whole DFJ split folder (its data.jsonl)."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="Judge a JSONL file (images relative to it)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results JSONL for --data/--jsonl: one line per input line."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="--data/--jsonl: accept absolute image paths (as ms-swift files carry them) inside this folder only."),
    resume: bool = flag("--resume", help="Continue an interrupted --out file."),
    force: bool = flag("--force", help="Replace an existing --out file."),
    as_json: bool = flag("--json", help="Print the verdict as JSON."),
    pairwise: str = typer.Option("answer", "--pairwise", help="Pairwise method: answer (one forward pass, P(A) vs P(B) after <answer>, adds p_a) or generate (greedy text, as the DFJ reference)."),
    swap_check: bool = flag("--swap-check", help="Pairwise: also judge B-vs-A and report whether the orders agree."),
    expected: bool = flag("--expected-score", help="Pointwise: add the probability-weighted score."),
    runtime: Optional[str] = typer.Option(None, help="Runtime: torch, onnx or llamacpp (default: what the artifact's format needs)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)."),
    mode: Optional[str] = typer.Option(None, help="pointwise or pairwise, when the source does not say."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Override the reference limit (512 pointwise, 128 pairwise)."),
    bf16: Optional[str] = typer.Option(None, "--bf16", help="torch on CPU: run these parts of a float32 judge in bfloat16 (vision, head; comma-separated): faster where the CPU has AMX or AVX512_BF16, lossy (docs/formats.md)."),
    vision: Optional[str] = typer.Option(None, "--vision", help="llamacpp: the image encoder, mtmd (default), torch (the mmproj's weights in transformers' tower: faster on images, needs torch) or torch-bf16 (lossy; AMX or AVX512_BF16)."),
    engine: str = typer.Option("local", "--engine", help="--data/--jsonl: local (this process) or ray (a Ray Data actor pool; the ray extra)."),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: the cluster to join (default: start a local Ray instance)."),
    actors: int = typer.Option(1, "--actors", help="--engine ray: judges loaded at once (each loads the artifact once)."),
    cpus_per_actor: float = typer.Option(1.0, "--cpus-per-actor", help="--engine ray: CPUs each actor reserves."),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", help="--engine ray: GPUs each actor reserves (with --device cuda)."),
    require_signature: Optional[Path] = typer.Option(None, "--require-signature", help="Refuse the artifact unless its dfj.json.sig verifies with this Ed25519 public key (PEM)."),
) -> None:
    """Judge one image and response (or pair), or a whole JSONL file with --data/--jsonl and --out."""
    import dfj
    from dfj.judge import PAIRWISE_METHODS

    batch_input = data or jsonl
    if data and jsonl:
        _fail("give --data or --jsonl, not both")
    if batch_input is not None and out is None:
        _fail("--data/--jsonl need --out FILE for the results")
    if image_root is not None and (batch_input is None or not image_root.is_dir()):
        _fail("--image-root is a folder, for --data/--jsonl" if batch_input is not None else "--image-root is for --data/--jsonl")
    if batch_input is None and (image is None or label is None or response is None):
        _fail("give --image, --label and --response (one verdict), or --data/--jsonl with --out (a batch)")
    if pairwise not in PAIRWISE_METHODS:
        _fail(f"--pairwise must be one of {', '.join(PAIRWISE_METHODS)}, not {pairwise!r}")
    if engine not in ("local", "ray"):
        _fail(f"--engine must be local or ray, not {engine!r}")
    if engine == "ray":
        if bf16 or vision:
            _fail("--bf16 and --vision are for --engine local")
        if batch_input is None:
            _fail("--engine ray judges files: give --data or --jsonl with --out")
        _judge_on_ray(artifact, batch_input, out, resume, force, expected, swap_check, image_root, address=address, actors=actors,
                      cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, runtime=runtime, device=device,
                      dtype=dtype, mode=mode, max_new_tokens=max_new_tokens, pairwise=pairwise,
                      public_key=str(require_signature) if require_signature else None)
        return
    options: dict[str, Any] = {"bf16": tuple(part.strip() for part in bf16.split(",") if part.strip())} if bf16 else {}
    if vision:
        options["vision"] = vision
    with _reported():
        j = dfj.load_judge(artifact, runtime=runtime, device=device, dtype=dtype, mode=mode, max_new_tokens=max_new_tokens,
                           pairwise=pairwise, public_key=require_signature, **options)
        if (swap_check and j.mode != "pairwise") or (expected and j.mode != "pointwise"):
            _fail("--swap-check is for pairwise judges, --expected-score for pointwise judges; "
                  f"this is a {j.mode} judge")
        if batch_input is not None:
            _judge_batch(j, batch_input, out, resume, force, expected_score=expected, swap_check=swap_check, image_root=image_root)
            return
        if j.mode == "pointwise":
            if response_b is not None:
                _fail("--response-b is for pairwise judges; this is a pointwise judge")
            verdict = j.score(image, label, response, expected_score=expected)
        else:
            if response_b is None:
                _fail("a pairwise judge needs --response-b")
            verdict = j.compare(image, label, response, response_b, swap_check=swap_check)
    if as_json:
        typer.echo(json.dumps({"mode": j.mode, **verdict.to_dict()}, ensure_ascii=False))
        return
    from dfj.console import print_verdict

    print_verdict(j.mode, verdict)
    if verdict.error:
        raise typer.Exit(1)


def _judge_batch(j, source: Path, out: Path, resume: bool, force: bool, **options: Any) -> None:
    from dfj.batch import judge_jsonl
    from dfj.console import progress_bar

    with progress_bar(f"judging ({j.mode})") as progress:
        summary = judge_jsonl(j, source, out, resume=resume, overwrite=force, progress=progress, **options)
    _print_summary(summary)


def _judge_on_ray(artifact: str, source: Path, out: Path, resume: bool, force: bool, expected: bool, swap_check: bool,
                  image_root: Path | None, *, address, actors, cpus_per_actor, gpus_per_actor, **load) -> None:
    from dfj.console import progress_bar
    from dfj.distributed import JudgeLoad, RaySpec, judge as judge_distributed
    from dfj.sources import resolve

    with _reported():
        judge_mode = resolve(artifact, mode=load["mode"], verify_files=False).mode
        if (swap_check and judge_mode != "pairwise") or (expected and judge_mode != "pointwise"):
            _fail("--swap-check is for pairwise judges, --expected-score for pointwise judges; "
                  f"this is a {judge_mode} judge")
        spec = RaySpec(address=address, actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
        with progress_bar(f"judging ({judge_mode}, ray, {actors} actor{'s' if actors > 1 else ''})") as progress:
            summary = judge_distributed(JudgeLoad(artifact, **load), source, out, engine=spec, resume=resume,
                                        overwrite=force, progress=progress, expected_score=expected, swap_check=swap_check,
                                        image_root=image_root)
    _print_summary(summary)


def _print_summary(summary) -> None:
    earlier = f", {summary.resumed} done by an earlier run" if summary.resumed else ""
    typer.echo(f"{summary.out}: {summary.lines} lines{earlier}; this run: {summary.judged} verdicts, "
               f"{summary.unparsed} outputs without a verdict, {summary.errors} input errors")


@app.command()
def export(
    source: str = typer.Argument(..., help="Model folder, adapter folder, dfj artifact or Hugging Face id."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically)."),
    quant: str = typer.Option("none", "--quant", help="Lossless: none (merged safetensors), onnx-fp32, gguf-f32, gguf-f16. Any `dfj quant` method (gguf-q4_k_m, onnx-int8, gptq-4bit, ...) exports then quantizes."),
    mode: Optional[str] = typer.Option(None, help="pointwise or pairwise, when the source does not say."),
    dtype: Optional[str] = typer.Option(None, help="--quant none: saved dtype, auto (the checkpoint's), float32, bfloat16, float16."),
    force: bool = flag("--force", help="Replace an existing output folder."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="gptq-*: DFJ split folder whose images, prompts and gold outputs calibrate the quantization."),
    samples: Optional[int] = typer.Option(None, "--samples", help="gptq-*: calibration records (default 128)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="gptq-*: quantization group size (default 128)."),
    mmproj: Optional[str] = typer.Option(None, "--mmproj", help="gguf-f32/f16: vision GGUF precision, f16 (default) or f32 (default for gguf-f32)."),
) -> None:
    """Export a judge: merge its LoRA and write a standalone artifact with a dfj manifest."""
    from dfj.pipeline import all_formats, build

    if quant not in all_formats():
        _fail(f"unknown --quant {quant!r}; available: {', '.join(all_formats())}")
    given = {"dtype": dtype, "calibration": calibration, "samples": samples, "group_size": group_size, "mmproj_dtype": mmproj}
    with _reported():
        path = build(source, out, quant, mode=mode, overwrite=force, **{k: v for k, v in given.items() if v is not None})
    _print_artifact(path)


@app.command()
def quant(
    artifact: Path = typer.Argument(..., help="A dfj artifact in the lossless format the method reads (see --method)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically)."),
    method: str = typer.Option(..., "--method", help="gguf-q8_0, gguf-q6_k, gguf-q5_k_m, gguf-q4_k_m (from gguf-f32/f16); onnx-int8, onnx-int4 (from onnx-fp32); gptq-4bit, gptq-8bit (from the merge, needs --calibration)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="gptq-*: DFJ split folder (images, prompts, gold outputs)."),
    samples: int = typer.Option(128, "--samples", help="gptq-*: calibration records."),
    group_size: int = typer.Option(128, "--group-size", help="gptq-*: quantization group size."),
    force: bool = flag("--force", help="Replace an existing output folder."),
) -> None:
    """Quantize a dfj artifact; its parity against the input and the chain of stages go to dfj.json."""
    from dfj.quant import quantize

    with _reported():
        path = quantize(artifact, out, method, calibration=calibration, samples=samples, group_size=group_size, overwrite=force)
    _print_artifact(path)


def _print_artifact(path: Path) -> None:
    from dfj.manifest import read_manifest
    from dfj.console import print_manifest

    print_manifest(path, read_manifest(path))


@app.command()
def bench(
    artifacts: list[str] = typer.Argument(..., help="Exported judges to measure."),
    reference: str = typer.Option(..., "--reference", help="The reference judge (base+LoRA or the bf16 merge)."),
    data: Path = typer.Option(..., "--data", help="DFJ split folder (or JSONL file) with gold labels."),
    limit: Optional[int] = typer.Option(None, help="Use the first N records."),
    mode: Optional[str] = typer.Option(None, help="pointwise or pairwise (default: from the reference)."),
    runtime: Optional[str] = typer.Option(None, help="Runtime for the artifacts (default: what each format needs)."),
    device: str = typer.Option("cpu", help="cpu or cuda, for every judge."),
    dtype: Optional[str] = typer.Option(None, help="Artifacts' compute dtype (default: fp32 on CPU, bf16 on CUDA)."),
    reference_dtype: Optional[str] = typer.Option(None, help="Reference compute dtype (default: as --dtype)."),
    tolerance: Optional[str] = typer.Option(None, help="Gate over the defaults (dfj.tolerances): " + ", ".join(
        f"{k}={v:g}" for k, v in bench_defaults().items()) + "."),
    report: Path = typer.Option(Path("bench-report"), "--report", help="Report folder (JSON, markdown, PNG, resumable cache)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Override the reference decoding limit."),
    require_signature: Optional[Path] = typer.Option(None, "--require-signature", help="Refuse any artifact (not the reference) unless its dfj.json.sig verifies with this Ed25519 public key (PEM)."),
) -> None:
    """Quality, parity and cost of exported judges against a reference; exit 1 if any is out of tolerance."""
    from dfj.bench.report import print_report
    from dfj.bench.run import BenchError, BenchJudge, default_runtime, parse_tolerance, run_bench
    from dfj.console import bench_progress

    with _reported((BenchError, ValueError, FileNotFoundError, ImportError)):
        gate = parse_tolerance(tolerance)
        if require_signature is not None:  # before anything runs: a gate is never run on an unsigned artifact
            from dfj.signing import verify_signature

            for artifact in artifacts:
                verify_signature(artifact, require_signature)
        ref = BenchJudge(reference, "torch", device, reference_dtype or dtype, label="reference")
        judges = [BenchJudge(a, runtime or default_runtime(a), device, dtype) for a in artifacts]
        with bench_progress() as progress:
            result = run_bench(ref, judges, data, report, mode=mode, limit=limit, max_new_tokens=max_new_tokens,
                               tolerance=gate, progress=progress)
    print_report(result.to_dict())
    typer.echo(f"report: {report / 'report.json'}, {report / 'report.md'}, {report / 'report.png'}")
    if not result.passed:
        for entry in result.artifacts:
            for failure in entry.failures:
                typer.secho(f"out of tolerance: {entry.name}: {failure}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
def info(
    artifact: Path = typer.Argument(..., help="A dfj artifact folder."),
    verify: bool = flag("--verify", help="Check every file against its recorded sha256."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="With --verify: also check dfj.json's signature (dfj.json.sig) with this Ed25519 public key (PEM)."),
    as_json: bool = flag("--json", help="Print the manifest as JSON."),
) -> None:
    """Show an artifact's manifest; with --verify, check its files (and, with --public-key, its signature)."""
    from dfj.manifest import ArtifactError, read_manifest, verify as verify_files
    from dfj.console import print_manifest

    if public_key is not None and not verify:
        _fail("--public-key checks a signature: give it with --verify")
    with _reported((ArtifactError, ImportError)):
        manifest = read_manifest(artifact)
        if manifest is None:
            _fail(f"{artifact}: no dfj.json; not a dfj artifact")
        if verify:
            verify_files(artifact, manifest)
        signed = None
        if public_key is not None:
            from dfj.signing import verify_signature

            signed = verify_signature(artifact, public_key)
    if as_json:
        typer.echo(manifest.to_json())
    else:
        print_manifest(artifact, manifest)
    if verify:
        typer.secho(f"verified: {len(manifest.files)} files match dfj.json", fg=typer.colors.GREEN)
    if manifest.format == "gguf" and not as_json:
        _print_llama_level(artifact)
    if signed is not None:
        typer.secho(f"verified: dfj.json is signed by {signed['key_id']} ({public_key})", fg=typer.colors.GREEN)


def _print_llama_level(artifact: Path) -> None:
    """Which of llama.cpp's CPU levels runs this GGUF artifact on this machine (docs/formats.md)."""
    try:
        from dfj.layout import GGUF_TEXT_FILE
        from dfj.runtime.llamacpp.library import cpu_backend, quiet_llama

        quiet_llama(Path(artifact) / GGUF_TEXT_FILE)
        described = cpu_backend().describe()
    except (ImportError, RuntimeError) as exc:
        typer.echo(f"llama.cpp on this machine: not available ({exc})")
        return
    typer.echo(f"llama.cpp on this machine: CPU level {described['llama_cpu_level']} ({described['llama_cpu_chosen_by']}); "
               f"uses {', '.join(described['llama_cpu_features'])}")


@app.command()
def keygen(
    key: Path = typer.Argument(..., help="Private key file to write (PEM, readable by you only); the public key goes to KEY.pub."),
    force: bool = flag("--force", help="Replace existing key files."),
) -> None:
    """Make an Ed25519 key pair for signing artifacts (openssl genpkey -algorithm ed25519 works too)."""
    from dfj.signing import generate_key

    with _reported((FileExistsError, ImportError, OSError)):
        private, public = generate_key(key, overwrite=force)
    typer.echo(f"private key: {private} (keep it secret)\npublic key: {public} (give it to whoever verifies)")


@app.command()
def sign(
    artifact: Path = typer.Argument(..., help="A dfj artifact folder (its files are verified first)."),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (PEM)."),
) -> None:
    """Sign an artifact: a detached Ed25519 signature of its dfj.json (which pins every file) in dfj.json.sig."""
    from dfj.manifest import ArtifactError
    from dfj.signing import sign as sign_artifact

    with _reported((ArtifactError, ImportError, OSError)):
        path = sign_artifact(artifact, key)
    typer.echo(f"signed: {path}")


@app.command("verify-verdicts")
def verify_verdicts(
    results: Path = typer.Argument(..., help="A results file of dfj judge --out (its .provenance.json beside it)."),
    artifact: str = typer.Option(..., "--artifact", help="The artifact the verdicts say judged them."),
    sample: Optional[int] = typer.Option(None, "--sample", help="Re-judge a random sample of N lines (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the per-line outcome as JSON."),
    require_signature: Optional[Path] = typer.Option(None, "--require-signature", help="Refuse the artifact unless its dfj.json.sig verifies with this public key."),
) -> None:
    """Judge a results file's lines again with the artifact and settings their provenance names; exit 1
    if any verdict differs or a line cannot be re-judged as it was (changed image, edited line, other artifact)."""
    from dfj.manifest import ArtifactError
    from dfj.verify import verify_verdicts as run_verify

    if sample is not None and sample < 1:
        _fail(f"--sample must be at least 1, not {sample}")
    with _reported((ArtifactError, ValueError, FileNotFoundError, ImportError, RuntimeError)):
        result = run_verify(results, artifact, sample=sample, seed=seed, public_key=require_signature)
    for run, differences in result.runs.items():
        if differences:
            typer.secho(f"re-judged under another run than {run[:19]}…: " + "; ".join(differences), fg=typer.colors.YELLOW, err=True)
    for check in result.checked:
        if check.outcome != "identical":
            typer.echo(f"line {check.line}: {check.outcome}" + (f": {check.reason}" if check.reason else ""))
            if check.outcome == "different":
                typer.echo(f"  recorded: {json.dumps(check.recorded, ensure_ascii=False)}\n  now:      {json.dumps(check.rejudged, ensure_ascii=False)}")
    counts = ", ".join(f"{result.count(o)} {o}" for o in ("identical", "different", "refused", "skipped"))
    typer.echo(f"{results}: {result.lines} lines; {counts}")
    if report is not None:
        report.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def serve(
    artifact: str = typer.Argument(..., help="The judge to serve: judge folder, adapter folder or dfj artifact."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Other than loopback needs --api-key-file."),
    port: int = typer.Option(8731, "--port", help="TCP port."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="File whose first line is the key clients send as 'Authorization: Bearer KEY' (at least 16 characters)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting for the judge; more are answered 503 with Retry-After."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="Largest request body; larger is answered 413 unread."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds a request may wait for its verdict; later it is answered 504 (and dropped if still queued)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Allow 'image_path' fields, resolved inside this folder (default: images only inline)."),
    max_batch: int = typer.Option(64, "--max-batch", help="Most items in one batch request."),
    runtime: Optional[str] = typer.Option(None, help="Runtime: torch, onnx or llamacpp (default: what the artifact's format needs)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)."),
    pairwise: str = typer.Option("answer", "--pairwise", help="Pairwise method: answer or generate (see dfj judge)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
    require_signature: Optional[Path] = typer.Option(None, "--require-signature", help="Refuse the artifact unless its dfj.json.sig verifies with this Ed25519 public key (PEM)."),
) -> None:
    """Serve one judge over HTTP: /health, /v1/info, /v1/score, /v1/compare (and /batch forms),
    /v1/chat/completions, /metrics. Loopback only unless given an API key."""
    from dfj.serve import ServeConfig, ServeError, serve as run_service

    with _reported((ServeError, ImportError)):
        config = ServeConfig(artifact, host=host, port=port, api_key_file=api_key_file, max_queue=max_queue,
                             max_body_mb=max_body_mb, timeout_s=timeout, image_root=image_root, max_batch=max_batch,
                             runtime=runtime, device=device, dtype=dtype, pairwise=pairwise,  # type: ignore[arg-type]
                             public_key=require_signature)
        config.api_key()  # an unreadable or short key stops the start, before the model loads
        status = run_service(config, log_level=log_level)
    if status:
        raise typer.Exit(status)


probe_app = typer.Typer(no_args_is_help=True, help="Probe how a judge behaves under hostile responses.", rich_markup_mode=None)
app.add_typer(probe_app, name="probe")


@probe_app.command("injection")
def probe_injection(
    artifacts: list[str] = typer.Argument(..., help="Judges to probe side by side (same records, same templates)."),
    data: Path = typer.Option(..., "--data", help="DFJ split folder (or JSONL file) whose records are attacked."),
    report: Path = typer.Option(Path("probe-report"), "--report", help="Report folder (JSON, markdown, PNG)."),
    template_ids: Optional[str] = typer.Option(None, "--templates", help="Comma-separated template ids (default: the whole corpus of the mode)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N records."),
    max_asr: Optional[float] = typer.Option(None, "--max-asr", help="Gate: exit 1 if an attack template's success rate (pairwise: flip rate) is over this."),
    runtime: Optional[str] = typer.Option(None, help="Runtime for every artifact (default: what each format needs)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, help="Compute dtype (default: fp32 on CPU, bf16 on CUDA)."),
) -> None:
    """Attack the weaker response of each record with the injection corpus and measure how far the
    verdicts move (Δscore, attack success, flips), per template and artifact, beside the controls."""
    from dfj.probe.injection import ProbeSpec, run_probe

    with _reported((ValueError, FileNotFoundError, ImportError, RuntimeError)):
        spec = ProbeSpec(tuple(artifacts), data, report, tuple(template_ids.split(",")) if template_ids else None,
                         limit, max_asr, runtime, device, dtype)
        result = run_probe(spec, progress=lambda message: typer.echo(message, err=True))
    typer.echo((report / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"report: {report / 'report.json'}, {report / 'report.md'}, {report / 'report.png'}")
    if not result["passed"]:
        raise typer.Exit(1)


@app.command()
def demo(
    cache: Optional[Path] = typer.Option(None, help="Work folder (default: $DFJ_CACHE or ~/.cache/dfj)."),
    records: int = typer.Option(40, help="Held-out test records judged per mode."),
) -> None:
    """Trained tiny DFJ judges (built offline once per machine): merge their LoRA, judge held-out
    records with base+LoRA and with the merged artifact, and compare."""
    from dfj.demo import run_demo

    ok = run_demo(cache, records=records)
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

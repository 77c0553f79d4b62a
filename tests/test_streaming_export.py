"""The LoRA merge streams tensor by tensor (same result as peft's merge, in shards, with refusals by
name), the parity probe runs with its layers on disk, and peak memory does not grow with depth."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfj import hf
from benchmarks.memory import measure
from dfj.export import merge
from dfj.artifact.checkpoint import Checkpoint
from dfj.tensor_names import canonical_key
from dfj.artifact.probe import bounded_probe_logits
from dfj.export.lora_merge import adapter_probe_logits, stream_merge
from dfj.manifest import ArtifactError, read_manifest

pytestmark = pytest.mark.slow


def test_streamed_merge_is_peft_merge_bit_for_bit(tiny, tmp_path):
    adapter = tiny("pointwise", adapter=True)
    base = adapter.parent / "base"
    stream_merge(base, adapter, tmp_path, "float32")
    with hf.quiet_transformers():
        reference = hf.apply_adapter(hf.load_model(base), adapter).merge_and_unload().state_dict()
    reference = {canonical_key(k): v for k, v in reference.items()}
    mine = load_file(tmp_path / "model.safetensors")
    assert len(mine) == len(reference)
    changed = 0
    for key, tensor in mine.items():
        assert torch.equal(tensor, reference[canonical_key(key)]), key
        changed += not torch.equal(tensor, load_file(base / "model.safetensors")[key])
    assert changed == 2 * 7  # every targeted linear of both layers, nothing else


def test_streamed_merge_writes_shards_that_transformers_loads(tiny, tmp_path):
    adapter = tiny("pointwise", adapter=True)
    base = adapter.parent / "base"
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    whole.mkdir(), sharded.mkdir()
    stream_merge(base, adapter, whole, "bfloat16")
    info = stream_merge(base, adapter, sharded, "bfloat16", max_shard_bytes=20_000_000)
    assert len(info["files"]) == 3 and (sharded / "model.safetensors.index.json").is_file()  # head, embedding, rest
    one, many = Checkpoint(whole), Checkpoint(sharded)
    assert one.keys() == many.keys()
    assert all(torch.equal(one.read(k), many.read(k)) and one.dtypes[k] == "BF16" for k in one.keys())
    shutil.copyfile(base / "config.json", sharded / "config.json")
    with hf.quiet_transformers():
        model = hf.load_model(sharded, dtype=torch.bfloat16)  # strict: every weight found in the shards
    assert torch.equal(model.lm_head.weight, one.read("lm_head.weight"))


def _adapter_copy(tiny, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(tiny("pointwise", adapter=True), target)
    (target / "dfj.json").unlink()
    return target


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "does not implement adapter_config use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 4}, "do not fit the base weight"),
])
def test_merge_refuses_adapters_it_cannot_reproduce(tiny, tmp_path, change, message):
    adapter = _adapter_copy(tiny, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ArtifactError, match=message):
        merge(adapter, tmp_path / "out", mode="pointwise")
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_lora_a_without_its_b_and_a_target_the_base_lacks(tiny, tmp_path):
    adapter = _adapter_copy(tiny, tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    lonely = next(k for k in weights if k.endswith("q_proj.lora_B.weight"))
    save_file({k: v for k, v in weights.items() if k != lonely}, adapter / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match="LoRA A without its partner"):
        merge(adapter, tmp_path / "out", mode="pointwise")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()}
    save_file(renamed, adapter / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match="layers.7.* which the base checkpoint lacks"):
        merge(adapter, tmp_path / "out", mode="pointwise")


def test_probe_with_layers_on_disk_equals_the_probe_in_memory(tiny, tmp_path):
    from transformers import AutoProcessor

    adapter = tiny("pairwise", adapter=True)
    base = adapter.parent / "base"
    processor = AutoProcessor.from_pretrained(base)
    for with_adapter in (None, adapter):
        in_memory = adapter_probe_logits(base, with_adapter, processor, "pairwise", "float32")
        streamed = adapter_probe_logits(base, with_adapter, processor, "pairwise", "float32", memory=0)
        assert torch.equal(in_memory, streamed)
    # The LoRA hooks are the adapter: with them the logits move, as peft's unmerged forward moves them.
    with hf.quiet_transformers():
        peft_model = hf.apply_adapter(hf.load_model(base), adapter)
    from dfj.artifact.probe import probe_logits

    with_peft = probe_logits(peft_model, processor, "pairwise")
    hooked = adapter_probe_logits(base, adapter, processor, "pairwise", "float32", memory=0)
    plain = bounded_probe_logits(base, processor, "pairwise", "float32", memory=0)
    assert float((with_peft - hooked).abs().max()) < 1e-4 < float((with_peft - plain).abs().max())


def test_a_merge_with_its_probe_on_disk_records_the_same_parity(tiny, merged, tmp_path):
    out = merge(tiny("pointwise", adapter=True), tmp_path / "streamed", probe_memory=0)
    assert read_manifest(out).parity == read_manifest(merged("pointwise")).parity
    assert read_manifest(out).extra["merge"] == {"streamed": True, "dtype": "float32", "files": ["model.safetensors"],
                                                  "merged_modules": 14}


# Peak private memory of a stage run in a fresh process (`benchmarks.memory.measure`), judges with 1024-wide
# text layers (61 MB each in fp32) so that six more layers are far above the measurement's noise.
WIDE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=True)
SMALL_VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, fullatt_block_indexes=[1, 3],
                    window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)


def test_peak_memory_of_merge_and_gguf_export_does_not_grow_with_depth(module_dir):
    from dfj.tiny.full_depth import build_random_judge

    root = module_dir("depth")
    peaks: dict[str, dict[int, int]] = {"merge": {}, "gguf": {}}
    layer_bytes = 0
    for layers in (2, 8):
        adapter = build_random_judge(root / f"judge{layers}", {**WIDE_TEXT, "num_hidden_layers": layers}, SMALL_VISION,
                                     dtype="float32")
        merged_dir, gguf_dir = root / f"merged{layers}", root / f"gguf{layers}"
        steps = {"merge": f"from dfj.export import export; export({str(adapter)!r}, {str(merged_dir)!r}, 'none', probe_memory=0)",
                 "gguf": f"from dfj.export import export; export({str(merged_dir)!r}, {str(gguf_dir)!r}, 'gguf-f32', probe_memory=0)"}
        for stage, code in steps.items():
            measured = measure(code)
            assert measured.exit_code == 0, measured.output_tail
            peaks[stage][layers] = measured.peak_anon
        checkpoint = Checkpoint(merged_dir)
        layer_bytes = sum(checkpoint.nbytes(k) for k in checkpoint.keys() if ".layers.1." in k and "visual" not in k)
        assert read_manifest(gguf_dir).parity["cosine"] > 0.9999  # the streamed probe still checks the export
    allowed = 0.25 * 6 * layer_bytes
    print(f"\npeak private memory (MB), 2 -> 8 layers: { {s: [round(v / 1e6) for v in p.values()] for s, p in peaks.items()} }; "
          f"six layers: {6 * layer_bytes / 1e6:.0f} MB, allowed growth {allowed / 1e6:.0f} MB")
    for stage, by_depth in peaks.items():
        assert by_depth[8] - by_depth[2] < allowed, (stage, by_depth)

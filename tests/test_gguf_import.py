"""GGUF import: tiny checkpoints written with the gguf package's own GGUFWriter (as llama.cpp's converter does,
query/key rows permuted for Llama) come back as HF directories that generate what HF does on the original;
what cannot be imported is refused with a ValueError naming the file and the reason."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from pagedserve.engine import LLM, SamplingParams  # noqa: E402
from pagedserve.engine.builtin_model import CHAT_TEMPLATE, _byte_to_unicode  # noqa: E402
from pagedserve.engine.gguf_import import MARKER, convert_gguf, import_gguf, inspect_gguf  # noqa: E402
from pagedserve.engine.model_source import resolve_model  # noqa: E402

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}
PROMPTS = [[72, 101, 108, 108, 111], [256, 84, 104, 101, 32, 115, 107, 121], list(range(40, 73))]
MAX_NEW = 10


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of Llama's q/k rows (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, out, family: str = "llama", qtype=gguf.GGMLQuantizationType.F32, arch_name: str | None = None,
               extra=None):
    """The HF checkpoint in ``hf_dir`` (conftest's write_tiny) as a GGUF file, byte tokenizer and chat template;
    ``extra(writer)`` adds what else the file should hold."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[family]
    writer = gguf.GGUFWriter(str(out), arch_name or gguf.MODEL_ARCH_NAMES[arch])
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    writer.add_block_count(n_layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta")))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    chars = _byte_to_unicode()
    tokens = [chars[b] for b in range(256)] + ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * 3)
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))  # an empty merge list is not stored; merges come from scores
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_pad_token_id(258)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(arch, n_layers)
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        base, suffix = name.rsplit(".", 1)
        w = t.float().numpy()
        if family == "llama" and base.endswith("q_proj"):
            w = _permute(w, n_head)
        elif family == "llama" and base.endswith("k_proj"):
            w = _permute(w, n_kv)
        kind = qtype if w.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay F32, as llama.cpp keeps them
        data = w if kind == gguf.GGMLQuantizationType.F32 else gguf.quantize(w, kind)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=kind)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    from conftest import write_tiny

    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for family in ("llama", "qwen3"):
        hf = write_tiny(root / f"{family}-hf", family, vocab_size=259)
        made[family] = (hf, write_gguf(hf, root / f"{family}.gguf", family))
    hf = made["llama"][0]
    made["q8"] = (hf, write_gguf(hf, root / "llama-q8_0.gguf", "llama", gguf.GGMLQuantizationType.Q8_0))
    return made


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _engine_greedy(model_dir) -> list[list[int]]:
    llm = LLM(model=str(model_dir), device="cpu", num_gpu_blocks=32, swap_space_gb=0.0)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_f32_gguf_round_trips_exactly(family, tiny_ggufs, cache, hf_greedy):
    hf_dir, gguf_file = tiny_ggufs[family]
    out = import_gguf(gguf_file)
    assert out.parent == cache / "gguf" and MARKER in {p.name for p in out.iterdir()}
    # F32 tensors: the conversion must give back the original weights bit for bit (q/k un-permuted).
    from safetensors.torch import load_file

    original, converted = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(converted) == set(original) - {"lm_head.weight"} or set(converted) == set(original)
    for name, t in converted.items():
        assert torch.equal(t, original[name]), name
    # HF on the original checkpoint is the reference for the engine on the converted one.
    got = _engine_greedy(out)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == hf_greedy(str(hf_dir), prompt, MAX_NEW)


def test_quantized_gguf_matches_hf_on_the_converted_dir(tiny_ggufs, cache, hf_greedy):
    _, gguf_file = tiny_ggufs["q8"]
    out = import_gguf(gguf_file)
    meta = json.loads((out / MARKER).read_text())
    assert meta["tensor_types"].get("Q8_0", 0) > 0 and meta["architecture"] == "llama"
    for prompt, tokens in zip(PROMPTS, _engine_greedy(out)):
        assert tokens == hf_greedy(str(out), prompt, MAX_NEW)


def test_conversion_is_cached_by_content(tiny_ggufs, cache, tmp_path):
    _, gguf_file = tiny_ggufs["llama"]
    first = Path(resolve_model(str(gguf_file)))
    written = (first / "model.safetensors").stat().st_mtime_ns
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(gguf_file, renamed)
    assert resolve_model(str(renamed)) == str(first)  # same content under another name: no second conversion
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    shutil.copy(tiny_ggufs["q8"][1], renamed)  # other content under the same name: its own conversion
    other = Path(resolve_model(str(renamed)))
    assert other != first and sorted(p.name for p in (cache / "gguf").iterdir()) == sorted([first.name, other.name])


def test_llm_takes_a_gguf_file_and_chats(tiny_ggufs, cache):
    _, gguf_file = tiny_ggufs["llama"]
    llm = LLM(model=str(gguf_file), device="cpu", num_gpu_blocks=32, swap_space_gb=0.0)
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert out.prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert out.prompt_token_ids == list(out.prompt.encode())  # the template's text, no BOS added again
    assert 1 <= len(out.outputs[0].token_ids) <= 3


def test_import_into_a_given_directory(tiny_ggufs, tmp_path):
    _, gguf_file = tiny_ggufs["llama"]
    out = import_gguf(gguf_file, tmp_path / "model")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 257
    with pytest.raises(ValueError, match="already holds a model"):
        import_gguf(gguf_file, out)


def test_refuses_a_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*'gpt2' model; only Llama-family"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_corrupt_files(tiny_ggufs, tmp_path):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF")
    with pytest.raises(ValueError, match=r"weights\.gguf.*is not a GGUF file"):
        inspect_gguf(not_gguf)
    _, good = tiny_ggufs["llama"]
    data = good.read_bytes()
    for cut in (24, len(data) // 3, len(data) - 100):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.gguf.*(corrupt or truncated|cannot be read)"):
            convert_gguf(truncated, tmp_path / f"out{cut}")
        assert not (tmp_path / f"out{cut}").exists()
    with pytest.raises(ValueError, match="does not exist"):
        inspect_gguf(tmp_path / "missing.gguf")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_or_header_damage_is_a_clear_error(tiny_ggufs, tmp_path, data):
    """Cut anywhere, or a header byte overwritten: inspect_gguf either accepts the file or raises ValueError naming
    it (never another exception, never a hang). A cut file is always refused: its last tensor is short."""
    _, good = tiny_ggufs["llama"]
    raw = bytearray(good.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
        must_fail = True
    else:
        at = data.draw(st.integers(0, 200), label="offset")
        raw[at] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]), label="byte")
        must_fail = False
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(raw))
    try:
        inspect_gguf(path)
    except ValueError as e:
        assert "damaged.gguf" in str(e)
    else:
        assert not must_fail


def test_refuses_a_tensor_type_it_cannot_dequantize(tmp_path):
    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    _, type_size = gguf.GGML_QUANT_SIZES[q8_1]
    writer.add_tensor("token_embd.weight", np.zeros((4, 2 * type_size), dtype=np.uint8), raw_dtype=q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"q8_1\.gguf.*token_embd\.weight.*Q8_1.*cannot dequantize"):
        inspect_gguf(path)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a model"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf checkpoint"):
        resolve_model(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("damage", ["offset", "type"])
def test_refuses_tensor_data_that_does_not_lie_where_the_header_says(tiny_ggufs, tmp_path, damage):
    """A tensor's offset moved by a byte, or its type changed so its size no longer matches the space it has:
    both imported "successfully" as a model that answered nothing. Each tensor must start where the ones before it
    end (padded to the alignment), as llama.cpp requires."""
    import shutil

    _, good = tiny_ggufs["llama"]
    path = tmp_path / f"{damage}.gguf"
    shutil.copy(good, path)
    reader = gguf.GGUFReader(str(path), "r+")
    tensor = reader.tensors[1]
    if damage == "offset":
        tensor.field.parts[-1][0] += 1
    else:
        tensor.field.parts[-2][0] = int(gguf.GGMLQuantizationType.F16)
    reader.data.flush()
    del reader
    with pytest.raises(ValueError, match=rf"{damage}\.gguf.* tensor '[^']+' has data offset \d+, expected"):
        inspect_gguf(path)


def test_a_header_that_claims_more_than_the_file_holds_is_refused_at_once(tiny_ggufs, tmp_path):
    """A 40-byte file whose array claims 2**40 elements made the gguf reader allocate without bound (gigabytes,
    minutes) before failing; a block_count of 10**8 on a 2-block model built a skeleton for minutes. Both are
    refused before anything is built from them."""
    import resource
    import shutil
    import struct

    bomb = tmp_path / "bomb.gguf"
    key = b"general.x"
    bomb.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<IIQ", 9, 5, 2**40))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"bomb\.gguf.*claims 1099511627776 elements, more than the 0 bytes left"):
        inspect_gguf(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB

    _, good = tiny_ggufs["llama"]
    blocks = tmp_path / "blocks.gguf"
    shutil.copy(good, blocks)
    reader = gguf.GGUFReader(str(blocks), "r+")
    reader.fields["llama.block_count"].parts[-1][0] = 10**8
    reader.data.flush()
    del reader
    with pytest.raises(ValueError, match=r"blocks\.gguf.*block_count 100000000.*2 blocks"):
        inspect_gguf(blocks)


def test_a_killed_conversions_leftovers_are_removed_by_the_next_one(tiny_ggufs, tmp_path):
    """A conversion SIGKILLed midway left its temporary directory (hundreds of MB for a real model) beside the
    target for good: its name carries the dead process's pid, which the next run never looked for. The next
    conversion removes a dead process's leftovers and leaves a live one's alone."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp{dead.pid}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.tmp{os.getppid()}"
    live.mkdir()
    _, good = tiny_ggufs["llama"]
    convert_gguf(good, tmp_path / "out")
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "config.json").is_file()


def _llama_freq_divisors(head_dim: int, base: float, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it for HF's llama3 rope scaling (float32 frequencies)."""
    import math

    out = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_a_scaled_rope_comes_through_or_is_refused(tmp_path, cache, hf_greedy):
    """transformers' GGUF reader maps neither the rope scaling metadata nor llama.cpp's rope_freqs.weight (every
    conversion of Llama 3.1 and later carries it): a scaled model was converted unscaled and answered otherwise
    than HF on the original, with no error. Linear and Llama 3 scaling come through; others are refused."""
    from conftest import write_tiny

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    hf3 = write_tiny(tmp_path / "llama3-hf", "llama", vocab_size=259, rope_scaling=llama3)
    divisors = _llama_freq_divisors(16, 10000.0, 8.0, 1.0, 4.0, 64)

    def llama3_file(writer):
        writer.add_rope_scaling_orig_ctx_len(64)
        writer.add_tensor("rope_freqs.weight", divisors)

    hf_linear = write_tiny(tmp_path / "linear-hf", "llama", vocab_size=259,
                           rope_scaling={"rope_type": "linear", "factor": 4.0})

    def linear_file(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    def logprobs(model_dir) -> list:
        llm = LLM(model=str(model_dir), device="cpu", num_gpu_blocks=32, swap_space_gb=0.0)
        out = llm.generate([list(range(40, 100))], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2))[0]
        return [sorted(step.values()) for step in out.outputs[0].logprobs]

    for hf_dir, extra in ((hf3, llama3_file), (hf_linear, linear_file)):
        source = write_gguf(hf_dir, tmp_path / f"{hf_dir.name}.gguf", extra=extra)
        out = import_gguf(source)
        # A conversion cached by an older converter (which dropped the scaling) is made again, not reused.
        meta = json.loads((out / MARKER).read_text())
        (out / MARKER).write_text(json.dumps({k: v for k, v in meta.items() if k != "converter"}))
        (out / "config.json").write_text("{}")
        assert import_gguf(source) == out and json.loads((out / MARKER).read_text())["converter"] == meta["converter"]
        for prompt, tokens in zip(PROMPTS, _engine_greedy(out)):
            assert tokens == hf_greedy(str(hf_dir), prompt, MAX_NEW), hf_dir.name
        # The greedy tokens of so small a model hardly move with the scaling; its logprobs do (by 1e-2 here).
        assert np.allclose(logprobs(out), logprobs(hf_dir), atol=1e-4, rtol=0), hf_dir.name

    def yarn_file(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)

    def endless_factor(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float("inf"))

    def odd_divisors(writer):
        writer.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, 8).astype(np.float32))

    for extra, said in ((yarn_file, r"llama.rope.scaling.type is 'yarn' \(factor 4.0\); the engine runs linear and "
                                    r"Llama 3 rope scaling only"),
                        (endless_factor, r"llama.rope.scaling.type is 'linear' \(factor inf\)"),
                        (odd_divisors, r"rope_freqs.weight \(per-frequency rotary divisors\) is not Llama 3's")):
        with pytest.raises(ValueError, match=said):
            inspect_gguf(write_gguf(hf_linear, tmp_path / f"{extra.__name__}.gguf", extra=extra))

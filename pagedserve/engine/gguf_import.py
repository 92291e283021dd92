"""GGUF import: a ``.gguf`` checkpoint becomes an ordinary HF model directory the loader reads like any other.

The work is done by transformers' own GGUF reader (which uses the ``gguf`` package to parse and dequantize):
its config mapping, its tokenizer conversion and its tensor renaming and un-permuting (llama.cpp stores the
query/key rows of Llama in another order). What this module adds is the gate in front and the cache behind:

- ``inspect_gguf`` refuses, with a ``ValueError`` naming the file and the reason, anything that is not a readable
  GGUF file, an architecture the engine does not run, a tensor type ``gguf`` cannot dequantize, or a file with
  no tokenizer, before any conversion work starts.
- ``import_gguf`` converts once into ``$PAGEDSERVE_CACHE_DIR/gguf/<name>-<sha256 prefix>/``, keyed by the file's
  content, so a renamed or moved copy reuses the conversion and a changed file gets a fresh one.

Invariant: a directory is visible under its final name only when complete (written under a temporary name,
then renamed), and it carries ``pagedserve-import.json`` (source hash, architecture, tensor types, dtype).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "pagedserve-import.json"
# The conversion's own version, in the marker: 2 reads the rope scaling (a cached conversion of 1 is still right for
# a file without any).
CONVERTER = 2
# GGUF architecture names (``general.architecture``) the engine runs. llama.cpp stores Mistral as "llama".
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
# PAGEDSERVE_DTYPE's short names, and vLLM's
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

Progress = Callable[[str], None]


@dataclass
class GGUFInfo:
    """What the header of a GGUF file says, read without dequantizing anything."""

    path: Path
    architecture: str
    name: str | None
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> number of tensors
    chat_template: str | None = None
    head_dim: int | None = None  # ``<arch>.attention.key_length``, where the file states it
    rope_scaling: dict | None = None  # HF's rope scaling parameters the file's metadata or rope_freqs imply


def cache_root() -> Path:
    """Where converted models live: ``$PAGEDSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pagedserve``."""
    from pagedserve.engine.builtin_model import cache_dir

    return cache_dir() / "gguf"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _field(reader, key: str):
    """A scalar metadata value (str or number), or None; from the field's raw parts, as transformers reads them."""
    import gguf

    f = reader.fields.get(key)
    if f is None or not f.data or not f.types or f.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    raw = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(raw).decode("utf-8", errors="replace")
    return raw[0].item()


def _check_magic(path: Path) -> None:
    """A readable file that starts like a GGUF file, or a ValueError that says what it is instead."""
    if not path.exists():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file (expected a .gguf checkpoint)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read {str(path)!r}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ValueError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")


# Bytes of each GGUF scalar value type (strings and arrays are read as they come).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _check_header_sizes(path: Path) -> None:
    """Walk the header's metadata and tensor infos, checking every length and count against the bytes left in the
    file before anything is built from it: the gguf reader trusts them (an array claiming 2**40 elements in a
    40-byte file allocates without bound before it fails). Versions other than 2 and 3 are left to the reader."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def take(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ValueError("the file ends inside its header")
            return data

        def number(fmt: str) -> int:
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def skip(n: int, what: str) -> None:
            left = size - f.tell()
            if n > left:
                raise ValueError(f"{what} claims {n} bytes, more than the {left} bytes left in the file")
            f.seek(n, 1)

        def value(vtype: int, what: str, depth: int = 0) -> None:
            if vtype in _SCALAR_BYTES:
                skip(_SCALAR_BYTES[vtype], what)
            elif vtype == _STRING:
                skip(number("<Q"), what)
            elif vtype == _ARRAY and depth < 2:
                etype, count = number("<I"), number("<Q")
                unit = _SCALAR_BYTES.get(etype, 8)  # a string or an array takes at least its 8-byte length
                if count * unit > size - f.tell():
                    raise ValueError(f"{what} claims {count} elements, more than the {size - f.tell()} bytes "
                                     f"left in the file")
                if etype in _SCALAR_BYTES:
                    skip(count * unit, what)
                else:
                    for _ in range(count):
                        value(etype, what, depth + 1)
            else:
                raise ValueError(f"{what} has an unknown value type {vtype}")

        take(4)
        if number("<I") not in (2, 3):
            return
        num_tensors, num_kv = number("<Q"), number("<Q")
        for what, count, least in (("tensor count", num_tensors, 24), ("metadata count", num_kv, 12)):
            if count * least > size - f.tell():
                raise ValueError(f"its {what} {count} is more than the file could hold")
        for i in range(num_kv):
            skip(number("<Q"), f"metadata key {i}")
            value(number("<I"), f"metadata value {i}")
        for i in range(num_tensors):
            skip(number("<Q"), f"tensor {i}'s name")
            num_dims = number("<I")
            if num_dims > 8:
                raise ValueError(f"tensor {i} claims {num_dims} dimensions")
            skip(8 * num_dims + 4 + 8, f"tensor {i}'s info")


def _check_layout(path: Path, reader, tensors: list) -> None:
    """Each tensor's data starts where the ones before it end, padded to the alignment, as llama.cpp requires:
    a moved offset or a changed type reads neighbouring bytes as weights, which converts into a model that
    answers nothing instead of failing."""
    align = reader.alignment
    expected = 0
    for t in tensors:  # (data past the end of the file the reader itself refuses)
        offset = t.data_offset - reader.data_offset
        if offset != expected:
            raise ValueError(f"{str(path)!r} is not a readable GGUF file: tensor {t.name!r} has data offset "
                             f"{offset}, expected {expected} from the size and type of the tensors before it")
        expected = -(-(offset + int(t.n_bytes)) // align) * align


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's header and check that it can be imported. Raises ``ValueError`` naming file and reason."""
    path = Path(path)
    _check_magic(path)
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the worker extra installs it
        raise ValueError(f"cannot read {str(path)!r}: the 'gguf' package is not installed "
                         f"(pip install 'pagedserve[worker]')") from e
    try:
        _check_header_sizes(path)
        reader = gguf.GGUFReader(str(path))
        architecture = _field(reader, "general.architecture")
        tensors = list(reader.tensors)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on damaged files
        raise ValueError(f"{str(path)!r} is not a readable GGUF file (corrupt or truncated: "
                         f"{type(e).__name__}: {e})") from None
    if not isinstance(architecture, str):
        raise ValueError(f"{str(path)!r} has no general.architecture field; cannot tell what model it holds")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{str(path)!r} holds a {architecture!r} model; only Llama-family architectures can be "
                         f"imported ({', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    if not tensors:
        raise ValueError(f"{str(path)!r} holds no tensors")
    _check_layout(path, reader, tensors)
    if _field(reader, "tokenizer.ggml.model") is None:
        raise ValueError(f"{str(path)!r} has no tokenizer (tokenizer.ggml.model is missing); the engine needs one")
    types: dict[str, int] = {}
    checked: set = set()
    for t in tensors:
        qtype = t.tensor_type
        types[qtype.name] = types.get(qtype.name, 0) + 1
        if qtype in checked:
            continue
        # Dequantize one row of each tensor type now: an unsupported type fails here, not minutes into a run.
        try:
            gguf.dequantize(t.data[:1], qtype)
        except NotImplementedError:
            raise ValueError(f"{str(path)!r}: tensor {t.name!r} is quantized as {qtype.name}, which the gguf "
                             f"package cannot dequantize") from None
        except Exception as e:
            raise ValueError(f"{str(path)!r} is not a readable GGUF file: tensor {t.name!r} ({qtype.name}) "
                             f"cannot be read ({type(e).__name__}: {e})") from None
        checked.add(qtype)
    block_count = _field(reader, f"{architecture}.block_count")
    blocks = 1 + max((int(t.name.split(".")[1]) for t in tensors
                      if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()), default=-1)
    if block_count != blocks:
        raise ValueError(f"{str(path)!r}: {architecture}.block_count {block_count} does not match its tensors, "
                         f"which hold {blocks} blocks")
    name = _field(reader, "general.name")
    template = _field(reader, "tokenizer.chat_template")
    head_dim = _field(reader, f"{architecture}.attention.key_length")
    return GGUFInfo(path, architecture, name if isinstance(name, str) else None, types,
                    template if isinstance(template, str) else None, int(head_dim) if head_dim else None,
                    _rope_scaling(path, reader, architecture, tensors))


# The frequency scaling of Llama 3.1 and later (low_freq_factor, high_freq_factor): llama.cpp stores only the
# per-frequency divisors it implies (``rope_freqs.weight``), and these are read back by recomputing them.
_LLAMA3_FREQ_FACTORS = ((1.0, 4.0),)


def _llama3_divisors(base: float, dim: int, factor: float, low: float, high: float, old_len: int) -> list[float]:
    """What llama.cpp's converter writes as ``rope_freqs.weight`` for HF's llama3 rope scaling."""
    import math

    divisors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return divisors


def _rope_scaling(path: Path, reader, architecture: str, tensors: list) -> dict | None:
    """HF's rope scaling parameters for what the file states (None: unscaled), or a ValueError for a scaling the
    engine does not run. transformers' GGUF reader maps neither the scaling metadata nor ``rope_freqs.weight``:
    a scaled model converted without them ran unscaled, its answers off, with no error."""
    import math

    import numpy as np

    kind = _field(reader, f"{architecture}.rope.scaling.type")
    factor = _field(reader, f"{architecture}.rope.scaling.factor")
    if kind is None and _field(reader, f"{architecture}.rope.scale_linear") not in (None, 1.0):
        kind, factor = "linear", _field(reader, f"{architecture}.rope.scale_linear")  # the older key
    freqs = next((t for t in tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if kind not in (None, "none"):
            raise ValueError(f"{str(path)!r} holds rope_freqs.weight and {architecture}.rope.scaling.type "
                             f"{kind!r}: the engine runs one scaling or the other, not both")
        divisors = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
        base = float(_field(reader, f"{architecture}.rope.freq_base") or 10000.0)
        dim = int(_field(reader, f"{architecture}.rope.dimension_count") or 2 * divisors.size)
        old_len = int(_field(reader, f"{architecture}.rope.scaling.original_context_length") or 8192)
        if divisors.size == dim // 2 and divisors.max() > 0:
            for low, high in _LLAMA3_FREQ_FACTORS:
                expected = _llama3_divisors(base, dim, float(divisors.max()), low, high, old_len)
                if np.allclose(divisors, expected, rtol=1e-5, atol=0):
                    return {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": old_len}
        raise ValueError(f"{str(path)!r}: its rope_freqs.weight (per-frequency rotary divisors) is not Llama 3's "
                         f"rope scaling, the only one stored that way that the engine runs")
    if kind in (None, "none"):
        return None
    if kind == "linear" and isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0:
        return None if factor == 1 else {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"{str(path)!r}: its {architecture}.rope.scaling.type is {kind!r} (factor {factor}); the "
                     f"engine runs linear and Llama 3 rope scaling only")


def convert_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32",
                 progress: Progress | None = None, sha256: str | None = None) -> Path:
    """Write the HF directory for the GGUF file ``path`` into ``out_dir`` (created; must not hold a model yet).

    Tensors are dequantized to ``dtype`` (float32 keeps every dequantized value exact). The directory is
    written under a temporary name and renamed when complete. ``sha256``: the file's hash, if already known.
    """
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    info = inspect_gguf(path)
    out_dir = Path(out_dir).resolve()  # "." has no name to build the temporary sibling from
    if (out_dir / "config.json").exists():
        raise ValueError(f"{str(out_dir)!r} already holds a model; choose an empty directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):  # refused before the conversion, not after it
        raise ValueError(f"{str(out_dir)!r} is not empty; choose an empty or new directory")
    if sha256 is None:
        say(f"hashing {info.path.name}")
    sha = sha256 or file_sha256(info.path)
    from pagedserve.engine.builtin_model import remove_stale_temporaries

    remove_stale_temporaries(out_dir.parent, f".{out_dir.name}.tmp")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from pagedserve.engine.builtin_model import hf_progress_bars_on_a_terminal_only

        with hf_progress_bars_on_a_terminal_only():
            _write_hf_dir(info, tmp, dtype, say)
        meta = {"source": info.path.name, "sha256": sha, "converter": CONVERTER, "architecture": info.architecture,
                "name": info.name, "tensor_types": info.tensor_types, "dtype": dtype,
                "conversion_s": round(time.perf_counter() - started, 1)}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # an empty directory given by the user (a non-empty one raises: nothing is lost)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_hf_dir(info: GGUFInfo, out: Path, dtype: str, say: Progress) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src_dir, src_name = str(info.path.parent), info.path.name
    say("reading the config")
    try:
        config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
    except Exception as e:
        raise ValueError(f"{str(info.path)!r}: transformers cannot read its config ({type(e).__name__}: {e})") from None
    if info.head_dim and getattr(config, "head_dim", None) != info.head_dim:
        # transformers maps the head width for Llama only (from the rotary width); Qwen3 states it here.
        config.head_dim = info.head_dim
    if info.rope_scaling is not None:
        if hasattr(config, "rope_parameters"):  # transformers 5: the scaling sits beside rope_theta
            config.rope_parameters = {**(config.rope_parameters or {}), **info.rope_scaling}
        else:  # pragma: no cover - transformers 4.x
            config.rope_scaling = info.rope_scaling
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    say(f"dequantizing {sum(info.tensor_types.values())} tensors "
        f"({', '.join(f'{n} {k}' for k, n in sorted(info.tensor_types.items()))}) to {dtype}")
    try:
        parsed = load_gguf_checkpoint(str(info.path), return_tensors=True, model_to_load=skeleton)
    except Exception as e:
        raise ValueError(f"{str(info.path)!r}: its tensors cannot be converted ({type(e).__name__}: {e})") from None
    tensors = {name: t.to(torch_dtype).contiguous() for name, t in parsed["tensors"].items()}
    expected = set(skeleton.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{str(info.path)!r} lacks tensors the model needs: {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    for name, t in tensors.items():
        want = tuple(skeleton.state_dict()[name].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{str(info.path)!r}: tensor {name} has shape {tuple(t.shape)}, the config implies {want}")
    say("writing model.safetensors")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it owner-only; the other files are 0644
    del tensors, parsed
    if hasattr(config, "dtype"):
        config.dtype = torch_dtype
    else:  # pragma: no cover - transformers 4.x
        config.torch_dtype = torch_dtype
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    say("converting the tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    except Exception as e:
        raise ValueError(f"{str(info.path)!r}: its tokenizer cannot be converted ({type(e).__name__}: {e})") from None
    if info.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = info.chat_template
    tokenizer.save_pretrained(out)


def import_gguf(path: str | Path, out_dir: str | Path | None = None, dtype: str = "float32",
                progress: Progress | None = None) -> Path:
    """The HF directory for a GGUF file: converted into ``out_dir``, or into the cache (once per file content).

    A cached conversion is reused when its marker names the same content hash and dtype.
    """
    dtype = DTYPE_ALIASES.get(dtype, dtype)  # the cache is keyed by the full name
    path = Path(path).expanduser()
    if out_dir is not None:
        return convert_gguf(path, Path(out_dir).expanduser(), dtype, progress)
    _check_magic(path)  # before hashing: a wrong file is refused at once
    say = progress or (lambda _msg: None)
    sha = file_sha256(path)
    stem = path.name[:-len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    suffix = f"-{sha[:16]}" + ("" if dtype == "float32" else f"-{dtype}")
    # Keyed by content: a copy of the file under another name finds the conversion made for the first one.
    for done in sorted(cache_root().glob(f"*{suffix}")):
        if _is_complete(done, sha, dtype, path):
            return done
    target = cache_root() / (stem + suffix)
    if target.exists():  # left by an older or interrupted run: convert again
        shutil.rmtree(target)
    say(f"converting {path.name} into {target} (once per file)")
    try:
        return convert_gguf(path, target, dtype, progress, sha256=sha)
    except FileExistsError:  # pragma: no cover - another process finished the same conversion first
        return target
    except OSError:
        if _is_complete(target, sha, dtype, path):  # another process won the rename race; its copy is identical
            return target
        raise


def _is_complete(target: Path, sha: str, dtype: str, source: Path) -> bool:
    try:
        meta = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not (meta.get("sha256") == sha and meta.get("dtype") == dtype and (target / "model.safetensors").is_file()):
        return False
    # An older conversion dropped the rope scaling: still right where the file has none (a scaling the engine
    # does not run is refused here, as a fresh conversion refuses it).
    return meta.get("converter", 1) >= CONVERTER or inspect_gguf(source).rope_scaling is None

"""Load a Llama-family HF checkpoint directory (config.json + *.safetensors) into ``LlamaForCausalLM``.

Under tensor parallelism each rank reads only its rows or columns of every sharded tensor: the layer that owns a
parameter says which (its ``weight_loader``, engine/parallel_layers.py), through a safetensors slice.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open

from pagedserve.engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM
from pagedserve.engine.parallel_layers import SINGLE, TensorParallelGroup, replicated_weight_loader
from pagedserve.kernels import KernelOps

# HF shard name -> (our fused parameter, part index); the part order fixes the fused layout.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


# Sizes the model is built from: a zero or negative one fails deep in torch, with nothing naming the field.
POSITIVE_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "num_hidden_layers", "vocab_size", "max_position_embeddings", "head_dim")


def _check_regular_files(path: Path) -> None:
    """Every file in the model directory is a regular file (or a link to one): opening a FIFO blocks the load for
    good, inside a library that retries on the interrupt a timeout would send."""
    for entry in path.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError:  # a dangling link: whoever reads it gets a clear OSError
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ValueError(f"model {str(path)!r}: {entry.name} is not a regular file")


@contextmanager
def _open_checkpoint(path: Path, file: Path):
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"model {str(path)!r}: {file.name} is not a readable safetensors file ({exc})") from None


INDEX = "model.safetensors.index.json"


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files that hold the model, chosen as transformers chooses them: ``model.safetensors`` when
    there is one, else the shards ``model.safetensors.index.json`` lists (each must be there), else every
    ``*.safetensors`` but a PEFT adapter's. Files the index does not list are left alone: shards of an older save
    copied into the folder (they were read too, and their tensors overwrote the listed ones: the old model's
    tokens, without a word), Mistral's ``consolidated.safetensors`` beside the HF shards."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            # As transformers joins them to the folder: "./x" and "sub/x" are the folder's; nothing outside it.
            names = sorted({os.path.normpath(n) for n in weight_map.values()})
            if not names or not all(isinstance(n, str) and not os.path.isabs(n) and n.split(os.sep)[0] != ".."
                                    for n in names):
                raise ValueError("its weight_map must name shard files inside the model's folder")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"model {str(path)!r}: {INDEX} cannot be read as a shard index ({e})") from None
        gone = [n for n in names if not (path / n).is_file()]
        if gone:
            raise ValueError(f"model {str(path)!r}: {INDEX} lists {gone[0]}, which is not in the folder (a "
                             "download that stopped early?)")
        return [path / n for n in names]
    return sorted(f for f in path.glob("*.safetensors") if f.name != "adapter_model.safetensors")


def _check_against_checkpoint(path: Path, files: list[Path], config) -> None:
    """The layer count and embedding shape the config gives agree with the checkpoint's tensors, read from the
    files' headers before anything is built: a config claiming 10**8 layers or a 2**31 vocabulary would build
    (or allocate) that first and fail minutes or gigabytes later."""
    layers: set[int] = set()
    embed = None
    for file in files:
        with _open_checkpoint(path, file) as f:
            for name in f.keys():
                if name.startswith("model.layers.") and name.split(".")[2].isdigit():
                    layers.add(int(name.split(".")[2]))
                elif name == "model.embed_tokens.weight":
                    embed = list(f.get_slice(name).get_shape())
    n = config.num_hidden_layers
    if layers and n != max(layers) + 1:
        raise ValueError(f"model {str(path)!r}: config.json num_hidden_layers {n} but the checkpoint holds layers "
                         f"0..{max(layers)}")
    if embed is not None and embed != [config.vocab_size, config.hidden_size]:
        raise ValueError(f"model {str(path)!r}: config.json vocab_size {config.vocab_size} and hidden_size "
                         f"{config.hidden_size} but the checkpoint's model.embed_tokens.weight is {embed}")


def load_config(model_dir: str | Path):
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"model {str(path)!r} is not a model directory (no config.json)")
    _check_regular_files(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model {str(path)!r}: config.json cannot be read ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"model {str(path)!r}: config.json is not a JSON object")
    for name in POSITIVE_SIZES:  # before transformers, whose own checks divide by some of them
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"model {str(path)!r}: config.json {name} must be a positive integer (got {value!r})")
    for name, kind, what in (("model_type", str, "a string"), ("architectures", list, "a list of class names")):
        if raw.get(name) is not None and not isinstance(raw[name], kind):
            raise ValueError(f"model {str(path)!r}: config.json {name} must be {what} (got {raw[name]!r})")
    theta = raw.get("rope_theta")
    if theta is not None and (not _of_kind(theta, _NUMBERS) or not theta > 0):  # a string failed deep in torch
        raise ValueError(f"model {str(path)!r}: config.json rope_theta must be a positive number (got {theta!r})")
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and raw.get("model_type") not in SUPPORTED_ARCHITECTURES.values():
        # Before transformers, whose message for a type it does not know advises upgrading it.
        raise ValueError(f"model {str(path)!r}: config.json model_type {raw.get('model_type')!r} (architectures "
                         f"{archs}) is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})")
    for name, allowed, why in _UNSUPPORTED:  # before the model is built: no weights read for a model it cannot run
        if name in raw and raw[name] not in allowed:
            raise ValueError(f"model {str(path)!r}: config.json {name} {json.dumps(raw[name])} is not supported ({why})")
    for name in ("rope_scaling", "rope_parameters"):  # transformers 4 writes the first, 5 the second
        scaling = raw.get(name)
        kind = (scaling.get("rope_type") or scaling.get("type") or "default") if isinstance(scaling, dict) else None
        if kind is not None and kind not in ROPE_TYPES:
            raise ValueError(f"model {str(path)!r}: config.json {name} rope_type {kind!r} is not supported (the "
                             f"engine runs {', '.join(ROPE_TYPES)})")
    config = _as_written(raw)
    if config is None:
        from transformers import AutoConfig  # here: most starts need not import it (_FIELDS_BY_TYPE)

        config = AutoConfig.from_pretrained(path)
    return config


# The rotary embeddings models/llama.py computes (rope_type).
ROPE_TYPES = ("default", "linear", "llama3")

# Switches of the four families that the model here does not build: (name, the values it runs, why not others).
_UNSUPPORTED = (
    ("mlp_bias", (False, None), "the MLP projections here carry no bias"),
    ("hidden_act", ("silu", "swish"), "the MLP here is SiLU-gated; only silu (swish, its other name)"),
)

# What the engine reads from a model's config, by model type. Where config.json states every one of them (with
# values of the expected kinds and the plain rotary embedding) the engine takes them as written; otherwise
# transformers' config class for the type fills in its defaults: importing it loads the library's whole model
# registry, seconds of every worker's start. The defaults differ by type (Qwen3's head_dim is 128, not
# hidden_size / heads; Mistral's and Qwen's sliding_window is 4096; Llama's eos_token_id is 2), hence the lists.
_NUMBERS = (int, float)
_COMMON_FIELDS = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
    "num_attention_heads": int, "num_key_value_heads": int, "max_position_embeddings": int, "rms_norm_eps": _NUMBERS,
    "hidden_act": str, "tie_word_embeddings": bool, "eos_token_id": (int, list, type(None)),
}
_WINDOW = {"sliding_window": (int, type(None))}
_FIELDS_BY_TYPE = {
    "llama": _COMMON_FIELDS,
    "mistral": {**_COMMON_FIELDS, **_WINDOW},
    "qwen2": {**_COMMON_FIELDS, **_WINDOW, "use_sliding_window": bool},
    "qwen3": {**_COMMON_FIELDS, **_WINDOW, "use_sliding_window": bool, "head_dim": int},
}


def _of_kind(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)  # a bool is an int, but not a size


class _ConfigAsWritten(SimpleNamespace):
    def to_dict(self) -> dict:
        return dict(vars(self))


def _as_written(raw: dict) -> _ConfigAsWritten | None:
    """config.json as attributes when it states everything the engine reads (see above), else None."""
    fields = _FIELDS_BY_TYPE.get(raw.get("model_type"))
    if fields is None or not all(name in raw and _of_kind(raw[name], kind) for name, kind in fields.items()):
        return None
    params = raw.get("rope_parameters")
    if params is None:
        theta = raw.get("rope_theta")
    elif isinstance(params, dict) and params.get("rope_type", "default") == "default" and raw.get("rope_theta") is None:
        theta = params.get("rope_theta")  # transformers 5 writes it here
    else:
        return None
    if raw.get("rope_scaling") is not None or not _of_kind(theta, _NUMBERS):
        return None
    return _ConfigAsWritten(**{**raw, "rope_theta": theta, "rope_parameters": None})


def load_model(model_dir: str | Path, config, dtype: torch.dtype, device: torch.device, max_positions: int,
               ops: KernelOps, tp: TensorParallelGroup = SINGLE) -> LlamaForCausalLM:
    """Build the model (rank ``tp.rank``'s shard of it) on ``device`` in ``dtype`` with the kernel set ``ops`` and
    fill every parameter from the checkpoint, reading only the rows or columns of each tensor that this rank
    holds (``safe_open(...).get_slice``). ``model.checkpoint_bytes_read`` is the number of checkpoint bytes read.

    Every parameter must be filled exactly once (tied ``lm_head`` excepted); a missing or unexpected tensor is
    an error rather than a silently random weight.
    """
    path = Path(model_dir)
    files = checkpoint_files(path)
    if not files:
        raise ValueError(f"model {str(path)!r} has no *.safetensors files")
    _check_against_checkpoint(path, files, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions, ops, tp)
    # The rotary tables come from the config, not the checkpoint, and were computed on the CPU even here: kept (in
    # fp32 whatever the model's dtype) through the allocation, which replaces every buffer. The allocation is
    # Module.to_empty's, with torch.empty: to_empty's empty_like on the meta device imports torch's symbolic
    # shapes machinery (most of a second of each start).
    rotary = model.layers[0].self_attn.rotary
    cos, sin = rotary.cos, rotary.sin
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.to(dtype)
    rotary.cos, rotary.sin = cos.to(device), sin.to(device)

    params = dict(model.named_parameters())
    filled: set[str] = set()
    bytes_read = 0
    sampled_rows: dict[str, torch.Tensor] = {}  # rows of the embedding and of an lm_head a tied model leaves unread
    for file in files:
        with _open_checkpoint(path, file) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name in ("lm_head.weight", "model.embed_tokens.weight") and model.tie_word_embeddings:
                    rows = f.get_slice(name)
                    n = rows.get_shape()[0]  # 16 rows at each end and in the middle: no whole-matrix read
                    sampled_rows[name] = torch.cat([rows[:16], rows[n // 2:n // 2 + 16], rows[max(0, n - 16):]])
                target, part = _target(model, name, params)
                if target is None:
                    if name == "lm_head.weight" and model.tie_word_embeddings:
                        continue
                    raise ValueError(f"model {str(path)!r}: unexpected tensor {name!r} in {file.name}")
                if name in filled:  # two files of one folder hold it: which one is the model's is anyone's guess
                    raise ValueError(f"model {str(path)!r}: tensor {name!r} is in more than one of "
                                     f"{', '.join(f.name for f in files)}; keep one checkpoint in the folder")
                module_name, _, _ = target.rpartition(".")
                loader = getattr(model.get_submodule(module_name), "weight_loader", replicated_weight_loader)
                try:
                    read = loader(params[target], f.get_slice(name), part)
                except ValueError as exc:
                    raise ValueError(f"model {str(path)!r}: tensor {name!r} in {file.name} {exc}, as config.json "
                                     "sizes it: the config and the weights do not match (an edited config.json, "
                                     "or weights of another model?)") from None
                # Damaged bytes (a partial copy, a bad disk) make NaN weights: every answer would be junk, every
                # request "done". No trained checkpoint holds NaN or infinity in a weight; either makes the sum
                # non-finite (one pass, no mask allocated: a tenth of isfinite().all()'s time).
                if read.is_floating_point() and not bool(torch.isfinite(read.sum(dtype=torch.float32))):
                    raise ValueError(f"model {str(path)!r}: tensor {name!r} in {file.name} holds NaN or infinite "
                                     "values: the file is damaged (a partial copy or download?); fetch the model again")
                bytes_read += read.numel() * read.element_size()
                filled.add(name)
    expected = _expected_names(model)
    missing = sorted(expected - filled)
    if missing:
        raise ValueError(f"model {str(path)!r}: the checkpoint is missing tensors: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if len(sampled_rows) == 2 and not torch.equal(*sampled_rows.values()):
        # vLLM ties them too; transformers 5 unties them and uses the file's lm_head, so its answers differ.
        logging.getLogger(__name__).warning(
            "model %r: config.json ties the word embeddings, and the checkpoint also holds an lm_head.weight that "
            "differs from them; the embeddings are used (as vLLM does), the lm_head.weight is not (set "
            "tie_word_embeddings false in config.json to use it)", str(path))
    model.checkpoint_bytes_read = bytes_read
    return model.eval()


def _target(model: LlamaForCausalLM, hf_name: str, params: dict) -> tuple[str | None, int | None]:
    """Our parameter name for an HF tensor name, and the part index for a fused shard."""
    name = hf_name.removeprefix("model.")
    parts = name.split(".")
    for shard, (fused, index) in _FUSED.items():
        if shard in parts:
            return name.replace(shard, fused), index
    if name == "lm_head.weight":
        return (name if not model.tie_word_embeddings else None), None
    return (name if name in params else None), None


def _expected_names(model: LlamaForCausalLM) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        for shard, (fused, _index) in _FUSED.items():
            if f".{fused}." in f".{name}":
                if name.endswith("bias") and fused == "gate_up_proj":
                    continue
                names.add("model." + name.replace(fused, shard))
        if ".qkv_proj." not in name and ".gate_up_proj." not in name:
            names.add(name if name.startswith("lm_head") else "model." + name)
    return names


def read_generation_eos(model_dir: str | Path) -> list[int] | None:
    """EOS ids from generation_config.json (which may list several); empty when the file names none, None when
    there is no such file (transformers takes config.json's then, and only then)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model {str(model_dir)!r}: generation_config.json cannot be read ({e})") from None
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if eos is None:
        return []
    ids = [eos] if isinstance(eos, int) else eos
    # A string here would never equal a sampled id: generation would silently never stop at EOS.
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"model {str(model_dir)!r}: generation_config.json eos_token_id must be a token id or a "
                         f"list of token ids (got {eos!r})")
    return ids

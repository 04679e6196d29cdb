"""Every compression option, declared once.

A field of these dataclasses is an option: its type and default are the field's; its metadata
(`option(...)`) holds the help text, the command-line flags, the allowed choices or range, and
whether the commands show it. Help texts name the allowed values as `{choices}` and `{range}`, filled
in from the same choices and range that `validate` checks, so what `--help` states is what is
accepted. The app layer turns these fields into typer parameters; nothing here imports typer or
torch (the CLI reads this module at startup).

From the compressors up:
  RunOptions       where calibration runs (every compressor)
  SlicingOptions   SliceGPT's settings
  SliceOptions     + SliceGPT's internals: what `slice_model` reads, with the library defaults
  ModegptOptions   what `modegpt_model` reads, with the library defaults
  CompressOptions  SliceGPT's settings, MoDeGPT's budget and the compress stage's own (source,
                   calibration text, streaming), with the command-line defaults: what `toolchain
                   slice` and the build's compress stage take; it derives the two compressors' options
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from toolchain.compress import METHODS
from toolchain.core.errors import InvalidOptionError

ROTATIONS = ("pca", "random", "identity")
TIE_MODES = ("slice", "project", "untie")  # "untie" is applied when mapping the HF model
TIE_BASES = ("joint", "first")
SHARE_MODES = ("none", "layer", "all")
BUDGETS = ("uniform", "variance", "global")
ROTATE_MODES = ("none", "random", "hadamard")
MAX_SPARSITY = 0.8  # MoDeGPT's default per-layer cap, which also bounds the overall compression


@dataclass(frozen=True)
class Interval:
    """Allowed numbers: low..high, each end open or closed; no `high` means no upper bound."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Interval(1)


@dataclass(frozen=True)
class Spec:
    """What an option is besides its type and default."""

    help: str  # may name `{choices}` and `{range}`
    flags: tuple[str, ...] = ()  # default: --name-with-dashes
    choices: tuple[str, ...] = ()
    # a fixed range, or one that depends on the other options (called with None for the stated range)
    interval: Interval | Callable[[Any], Interval] | None = None
    integer: bool = False
    example: str = ""  # how to fix a value out of range, appended to the error
    check: Callable[[Any], None] | None = None  # anything else about the value (raises InvalidOptionError)
    cli: bool = True  # shown by the commands
    cli_type: type | None = None  # command-line type when it differs from the default's
    parse: Callable[[Any], Any] | None = None  # command-line value -> field value


def option(default=MISSING, help: str = "", *, default_factory=MISSING, **spec) -> Any:
    return field(default=default, default_factory=default_factory, metadata={"option": Spec(help, **spec)})


def with_default(owner: type, name: str, default) -> Any:
    """The option `name` as `owner` declares it (help, range, checks), with another default."""
    return field(default=default, metadata=owner.__dataclass_fields__[name].metadata)


def spec_of(owner, name: str) -> Spec | None:
    return owner.__dataclass_fields__[name].metadata.get("option")


def flag_of(name: str, spec: Spec) -> str:
    """The flag errors name: the first one given, without its --no- half."""
    return spec.flags[0].split("/")[0] if spec.flags else "--" + name.replace("_", "-")


def stated_interval(spec: Spec) -> Interval | None:
    return spec.interval(None) if callable(spec.interval) else spec.interval


def help_text(spec: Spec) -> str:
    return spec.help.format(choices=" | ".join(spec.choices), range=stated_interval(spec))


def option_fields(owner) -> list:
    """The fields of `owner` that are options, in declaration order."""
    return [f for f in fields(owner) if "option" in f.metadata]


def check_option(options, name: str) -> None:
    """Refuse the value of option `name` of `options` if it is not one its help allows."""
    f = options.__dataclass_fields__[name]
    spec, value = f.metadata["option"], getattr(options, name)
    if value is None and f.default is None:  # an optional option left out
        return
    flag = flag_of(name, spec)
    if spec.choices and value not in spec.choices:
        raise InvalidOptionError(f"unknown {flag} {value!r}; choose one of {', '.join(spec.choices)}")
    interval = spec.interval(options) if callable(spec.interval) else spec.interval
    if spec.integer and (isinstance(value, bool) or not isinstance(value, int) or
                         (interval is not None and value not in interval)):
        what = "a positive integer" if interval == POSITIVE else f"an integer in {interval}"
        raise InvalidOptionError(f"{flag} must be {what}, got {value!r}")
    if interval is not None and value not in interval:
        hint = f"; {spec.example}" if spec.example else ""
        raise InvalidOptionError(f"{flag} must be in {interval}, got {value!r}{hint}")
    if spec.check is not None:
        spec.check(value)


def check_options(options) -> None:
    for f in option_fields(type(options)):
        check_option(options, f.name)


# --- values the schema parses or checks ---------------------------------------------------------


def parse_widths(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidOptionError(f"--widths must be comma-separated integers, got {text!r}") from None


def check_widths(widths) -> None:
    """Counts and bounds depend on the model: checked when the widths are resolved."""
    if not isinstance(widths, (list, tuple)) or not all(isinstance(w, int) and not isinstance(w, bool)
                                                        for w in widths):
        raise InvalidOptionError(f"--widths must be integers, got {widths!r}")


def check_device_name(name) -> None:
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or
                                         (name.startswith("cuda:") and name[5:].isdigit())):
        raise InvalidOptionError(f"unknown --device {name!r}; choose auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> str:
    """`auto` → `cuda` when torch sees a GPU, else `cpu`; other names are checked and returned."""
    import torch

    check_device_name(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidOptionError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    return name


def check_calibration_source(name) -> None:
    from toolchain.data.text import check_source_name  # loads torch: only when validating

    check_source_name(name)


def check_offload_dir(path) -> None:
    if not Path(path).is_dir():
        raise InvalidOptionError(f"--offload-activations {path}: no such directory; create it or pass an existing one")


def slice_interval(options) -> Interval:
    """(0, 1): --slice 0 removes nothing, so it is refused where it would be the whole compression.
    It is allowed where the rotation alone is wanted (random or identity baselines, or the library's
    rotate-only default), or where something else sets the widths."""
    if options is not None and (isinstance(options, SliceOptions) or options.rotation != "pca" or
                                options.widths is not None or options.target_params is not None or
                                options.target_ratio is not None or options.method in ("modegpt", "none")):
        return Interval(0.0, 1.0, high_open=True)
    return Interval(0.0, 1.0, low_open=True, high_open=True)


def compression_interval(options) -> Interval:
    return Interval(0.0, getattr(options, "max_sparsity", MAX_SPARSITY))


# --- the options ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunOptions:
    """Where calibration runs."""

    batch_size: int = option(8, "Calibration windows per forward pass", integer=True, interval=POSITIVE, cli=False)
    device: str = option("cpu", "Compute device for calibration/PCA: auto (CUDA when available) | cpu | cuda | cuda:N",
                         check=check_device_name)
    extra: dict = field(default_factory=dict)  # recorded as is in the compression record


@dataclass(kw_only=True)
class SlicingOptions(RunOptions):
    """SliceGPT's settings."""

    slice: float = option(0.0, "Fraction of the hidden width removed, in {range} (0 only with --rotation random "
                          "or identity, with --method modegpt, or when --widths or a target sets the widths)",
                          interval=slice_interval,
                          example="e.g. --slice 0.3 removes 30% of the width (0 removes nothing)")
    widths: list[int] | None = option(None, "Explicit residual widths, comma-separated (one per position, "
                                      "optionally one more for the head)", check=check_widths, cli_type=str,
                                      parse=parse_widths)
    rotation: str = option("pca", "{choices} (the last two are sanity baselines)", choices=ROTATIONS)
    slice_head: bool = option(False, "Also slice the final norm / LM head input", flags=("--slice-head",))
    tie: str = option("slice", "Tied embeddings: {choices} (slice the shared table | keep it and project it | "
                      "untie it)", choices=TIE_MODES)
    tie_basis: str = option("joint", "--tie slice: the shared table's rotation from the first residual stream and "
                            "the head input (joint) | the first stream only (first)", choices=TIE_BASES)
    share: str = option("none", "One rotation per group of positions, no shortcut inside a group: none | layer "
                        "(attention+MLP of a layer) | all", choices=SHARE_MODES)
    target_params: int | None = option(None, "Total parameters to keep (embeddings, head and shortcuts included); "
                                       "picks the widths, overrides --slice", integer=True, interval=POSITIVE,
                                       cli_type=int)
    budget: str = option("variance", "How a target is met: uniform (one width) | variance (one explained-variance "
                         "fraction for all positions) | global (greedy on the PCA spectra)", choices=BUDGETS)
    seed: int = option(0, "Calibration sampling seed (and --rotate's)")


@dataclass(kw_only=True)
class SliceOptions(SlicingOptions):
    """What `slice_model` reads."""

    round_to: int = option(8, "Widths are rounded down to a multiple of this", integer=True, interval=POSITIVE,
                           cli=False)
    damping: float = option(0.01, "Ridge added to each covariance, x the mean of its diagonal", cli=False)

    def validate(self) -> None:
        check_options(self)


@dataclass(kw_only=True)
class ModegptOptions(RunOptions):
    """What `modegpt_model` reads."""

    compression: float = option(0.0, "MoDeGPT: fraction of block parameters removed, in {range}",
                                interval=compression_interval,
                                example="e.g. --compression 0.3 removes 30% of the block parameters")
    temperature: float = option(0.1, "ε of the layer budget softmax; math.inf gives every layer the same sparsity",
                                cli=False)
    max_sparsity: float = option(MAX_SPARSITY, "Per-layer sparsity cap", cli=False)
    layer_sparsity: list[float] | None = option(None, "Explicit per-layer sparsity (skips block influence)",
                                                cli=False)
    damping: float = option(0.01, "Ridge of the least-squares solves, x the mean of the correlation diagonal",
                            cli=False)
    ridge: float = option(1.0, "λ of the ridge leverage scores, x the mean of the C_σ diagonal", cli=False)
    # GPU attention/GEMM kernels want multiples of 8, and ORT's GroupQueryAttention one head size
    multiple: int = option(8, "MoDeGPT: kept head dims and intermediate sizes are multiples of this, q/k and v "
                           "heads one size, the total corrected to --compression (1: nearest dim, no correction)",
                           flags=("--modegpt-multiple",), integer=True, interval=POSITIVE)

    def validate(self) -> None:
        check_options(self)


@dataclass(kw_only=True)
class CompressOptions(SlicingOptions):
    """The compress stage's input (`toolchain slice`, the build's compress stage)."""

    model: str = option(help="Hub id, short name (smollm2-135m, phi-2, ...), HF dir or .gguf", flags=("--model", "-m"))
    method: str = option("slicegpt", "{choices} (none: no compression, the model as is, e.g. for --rotate and "
                         "--quantize; --slice and --compression are then ignored)", choices=METHODS)
    slice: float = with_default(SlicingOptions, "slice", 0.3)
    compression: float = with_default(ModegptOptions, "compression", 0.25)
    modegpt_multiple: int = with_default(ModegptOptions, "multiple", 8)
    target_ratio: float | None = option(None, "Fraction of the input's total (tied) parameters to keep, in {range}, "
                                        "e.g. 0.8; overrides --slice (1 or more needs --allow-larger)",
                                        interval=Interval(0.0, 1.5, low_open=True), cli_type=float,
                                        example="e.g. --target-ratio 0.8 keeps 80%")
    allow_larger: bool = option(False, "Write the result even if it is not smaller than the input",
                                flags=("--allow-larger",))
    rotate: str = option("none", "After compressing, fold an orthogonal rotation of each residual stream into the "
                         "weights (exact, same logits; spreads outlier channels before --quantize int4): {choices} "
                         "(hadamard: randomised Hadamard, random orthogonal where no construction exists; loads the "
                         "whole model)", choices=ROTATE_MODES)
    rotate_heads: bool = option(False, "With --rotate: also rotate each attention head's values (v_proj outputs, "
                                "o_proj inputs; exact)", flags=("--rotate-heads",))
    calib: str = option("ptb", "Calibration text: ptb | wikitext2 | c4 | alpaca | a .txt/.jsonl/.parquet file",
                        check=check_calibration_source)
    nsamples: int = option(32, "Calibration windows", integer=True, interval=POSITIVE)
    seqlen: int = option(256, "Tokens per calibration window", integer=True, interval=POSITIVE)
    device: str = with_default(RunOptions, "device", "auto")
    stream: bool = option(True, "SliceGPT: read, slice and write one layer at a time (bounded memory; same bytes "
                          "as --no-stream)", flags=("--stream/--no-stream",))
    offload_activations: str | None = option(None, "Existing dir for the calibration activations (files) instead "
                                             "of memory", check=check_offload_dir, cli_type=Path, parse=str)

    def validate(self) -> None:
        """Every check that needs no model, before anything is loaded."""
        check_options(self)
        if self.target_params is not None and self.target_ratio is not None:
            raise InvalidOptionError("give --target-params or --target-ratio, not both")
        if self.rotate_heads and self.rotate == "none":
            raise InvalidOptionError("--rotate-heads needs --rotate random or --rotate hadamard")
        if self.method == "none":  # options that only choose how much to compress contradict "no compression"
            given = [flag for flag, value in (("--widths", self.widths), ("--target-ratio", self.target_ratio),
                                              ("--target-params", self.target_params)) if value is not None]
            if given:
                raise InvalidOptionError(f"--method none compresses nothing; drop {', '.join(given)} or pick "
                                         "--method slicegpt|modegpt|slicegpt+modegpt")
        resolve_device(self.device)

    def slice_options(self, device: str, target_params: int | None) -> SliceOptions:
        """SliceGPT's options: these settings, on the resolved device, with the target in parameters."""
        shared = {f.name: getattr(self, f.name) for f in fields(SlicingOptions)}
        return SliceOptions(**shared | {"device": device, "target_params": target_params,
                                        "extra": {"calibration": self.calib}})

    def modegpt_options(self) -> ModegptOptions:
        # MoDeGPT runs in memory on the CPU, its own defaults otherwise
        return ModegptOptions(compression=self.compression, multiple=self.modegpt_multiple, batch_size=self.batch_size)


# --- recovery after compression (toolchain/compress/recover) ----------------------------------------

RECOVER_METHODS = ("lora", "distill", "full-distill")
RECOVER_SCHEDULES = ("linear", "cosine", "constant")
RECOVER_TEACHER_PLACEMENTS = ("auto", "resident", "topk")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# besides the block projections, LoRA may also adapt these (never the token table: it is tied to the head)
LORA_EXTRA_TARGETS = ("attn_shortcut", "mlp_shortcut", "embed_proj", "head_proj")


def parse_targets(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def check_targets(targets) -> None:
    allowed = LORA_TARGETS + LORA_EXTRA_TARGETS
    unknown = [t for t in targets if t not in allowed]
    if unknown or not targets:
        raise InvalidOptionError(f"--recover-targets: unknown module name(s) {', '.join(unknown) or '(none)'}; "
                                 f"choose among {', '.join(allowed)}")


def check_recover_data(name) -> None:
    from toolchain.data.text import check_source_name  # loads torch: only when validating

    check_source_name(name)


@dataclass(kw_only=True)
class RecoverOptions:
    """Recovery after compression (`toolchain recover`, the build's recover stage). Options left at
    None take a device default: the SliceGPT paper's recipe on CUDA, a short budget on the CPU (see
    toolchain/compress/recover/defaults.py)."""

    recover: str | None = option(None, "Recover the compressed model: {choices} (LoRA on next-token loss | LoRA "
                                 "distilled from the dense model | every weight distilled)", choices=RECOVER_METHODS)
    recover_data: str = option("ptb", "Recovery training text (train split only): ptb | wikitext2 | alpaca | a "
                               ".txt/.jsonl/.parquet file", check=check_recover_data)
    recover_eval_data: str | None = option(None, "Held-out text for the periodic evaluation (default: the "
                                           "validation split of --recover-data; must not overlap the training "
                                           "text)", check=check_recover_data)
    recover_steps: int | None = option(None, "Optimizer steps (default: 200 on CUDA, 60 on the CPU)", integer=True,
                                       interval=POSITIVE, cli_type=int)
    recover_seqlen: int | None = option(None, "Tokens per training window (default: 1024 on CUDA, 256 on the CPU)",
                                        integer=True, interval=Interval(2), cli_type=int)
    recover_batch: int | None = option(None, "Windows per micro-batch (default: 4)", integer=True,
                                       interval=POSITIVE, cli_type=int)
    recover_grad_accum: int | None = option(None, "Micro-batches per optimizer step (default: 4 on CUDA, 1 on the "
                                            "CPU)", integer=True, interval=POSITIVE, cli_type=int)
    recover_lr: float | None = option(None, "Peak learning rate, in {range} (default: 2e-4 on CUDA; on the CPU "
                                      "1e-3 for LoRA, 1e-4 for full-distill)", interval=Interval(0.0, 1.0, low_open=True),
                                      cli_type=float)
    recover_schedule: str = option("linear", "Learning-rate schedule: {choices}", choices=RECOVER_SCHEDULES)
    recover_eval_every: int | None = option(None, "Evaluate (and checkpoint) every N steps, keeping the best "
                                            "(default: 16 on CUDA, 10 on the CPU)", integer=True, interval=POSITIVE,
                                            cli_type=int)
    recover_eval_windows: int | None = option(None, "Held-out windows per evaluation (default: 32 on CUDA, 4 on "
                                              "the CPU)", integer=True, interval=POSITIVE, cli_type=int)
    recover_rank: int = option(32, "LoRA rank", integer=True, interval=POSITIVE)
    recover_alpha: float = option(10.0, "LoRA alpha (scale alpha/rank)", interval=Interval(0.0, low_open=True))
    recover_dropout: float = option(0.05, "LoRA dropout, in {range}", interval=Interval(0.0, 1.0, high_open=True))
    recover_targets: list[str] | None = option(None, "LoRA targets, comma-separated (default: q_proj,k_proj,v_proj,"
                                               "o_proj,gate_proj,up_proj,down_proj, those the model has; may add "
                                               "attn_shortcut,mlp_shortcut,embed_proj,head_proj)",
                                               check=check_targets, cli_type=str, parse=parse_targets)
    recover_ce_weight: float = option(0.0, "distill/full-distill: weight of next-token cross-entropy mixed with "
                                      "the KL to the teacher, in {range}", interval=Interval(0.0, 1.0))
    recover_teacher: str = option("auto", "distill/full-distill: where the teacher lives: {choices} (resident: next "
                                  "to the student; topk: its top-k log-probs cached before training, then freed; "
                                  "auto: resident when both models fit in the device's free memory)",
                                  choices=RECOVER_TEACHER_PLACEMENTS)
    recover_topk: int = option(64, "Tokens per position kept in the teacher's top-k cache", integer=True,
                               interval=POSITIVE)
    recover_seed: int = option(0, "Seed of the training windows, LoRA init and dropout")
    recover_weight_decay: float = option(0.01, "AdamW weight decay", interval=Interval(0.0), cli=False)
    recover_clip: float = option(1.0, "Gradient-norm clip", interval=Interval(0.0, low_open=True), cli=False)

    def validate(self) -> None:
        check_options(self)

    def recover_options(self) -> "RecoverOptions":
        """Just the recovery options (of a build's options, say)."""
        return RecoverOptions(**{f.name: getattr(self, f.name) for f in fields(RecoverOptions)})

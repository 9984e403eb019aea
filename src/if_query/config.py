"""Every option of every command, declared once: its default, its help text and its checks.

Each command has one config dataclass. A field made with :func:`option` is a command-line option:
``--field-name`` (or the ``flags`` it names), with the field's default and ``help`` as its help text;
the class docstring is the command's help (``cli.py`` builds the Typer commands from these classes
and nothing else). Fields made with plain ``field`` are set by library callers only.

Checks run once, when a config is made (``__post_init__``): the per-field ``minimum`` and
``choices`` declared with the option, then the command's own cross-field checks. A failed check
raises :class:`~if_query.errors.InputError` naming the option in its message and in ``exc.option``
(the field), so the CLI prints one line and exits with 2, and a Python caller knows which argument
was refused. A library caller may give a path as a string or a ``Path`` (:func:`_as_declared`).

This module imports no torch, transformers or Kronfluence, so ``--help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from os import PathLike
from pathlib import Path
from typing import Any

from if_query.errors import InputError

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")  # Kronfluence's names (tests/test_kron_adapter.py checks them)
FISHER_TYPES = ("true", "empirical")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
EIGENDECOMPOSITION_DTYPES = ("float64", "float32")
ENGINES = ("if-query", "kronfluence")
MATMUL_PRECISIONS = ("auto", "ieee", "tf32")  # auto: see model.loading.CUDA_MATMUL_PRECISION
GB = 10**9  # every size and memory option: decimal gigabytes, as disks and GPU datasheets count
RANK_BY = ("cosine", "score")  # --rank-by (if_query.report.ranking)
# --track: if_query.model.tracking.TRACK_KINDS, one entry each
TRACK_CHOICES = ("mlp", "attention", "all-linear", "lora")
# The sections of every command's --help and options page, in this order (each option names its own).
GROUPS = ("Inputs", "Outputs", "Approximation", "Precision", "Memory and speed", "Engine", "Hardware")
KRONFLUENCE_ONLY = ("query_rank", "queries_per_pass", "module_partitions")  # run-query options of that engine
ROW_DTYPES = ("float16", "float32")  # if-query index --row-dtype
# if-query index's defaults and run-query --index's, chosen from the measurement in benchmarks/README.md (Index)
SKETCH_KINDS = ("eigen", "gaussian")  # if_query.index.sketch.SKETCHES
INDEX_SKETCH, SKETCH_DIM, SCALING_RANK, INDEX_CANDIDATES = "eigen", 64, 4, 100


def option(default: Any = MISSING, *, help: str, group: str, flags: tuple[str, ...] = (),
           minimum: float | None = None, choices: tuple[str, ...] | None = None, argument: bool = False,
           show_default: bool = True, compare: bool = True) -> Any:
    """A config field that is also a command-line option (see the module docstring).

    ``group`` is its section of ``--help`` and of the options pages (one of :data:`GROUPS`);
    ``minimum``/``choices`` are checked when the config is made (``None`` always passes); ``argument``
    makes it positional; ``compare=False`` leaves it out of equality (options that do not change results).
    """
    if group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {GROUPS}")
    metadata = {"help": help, "group": group, "flags": flags, "minimum": minimum, "choices": choices,
                "argument": argument, "show_default": show_default}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, compare=compare)
    return field(default=default, metadata=metadata, compare=compare)


def cli_fields(config_class: type) -> list:
    """The fields of ``config_class`` that are command-line options, in declaration order."""
    return [f for f in fields(config_class) if "help" in f.metadata]


def gigabytes(value: float | None) -> int | None:
    """A memory option's bytes: every ``--*-gb`` of every command counts 1 GB = 10^9 bytes (as the plan prints)."""
    return None if value is None else int(value * GB)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _refused(message: str, option: str) -> InputError:
    """A config check's error: its message names the option's flag, ``exc.option`` the field."""
    return InputError(message, option, flag_first=False)


def _as_declared(config: Any) -> None:
    """Paths and strings as their fields declare them, whichever a library caller gave: a path field given a
    string made a Path (a list field given one path, a list of it), a string field given a Path made a string."""
    for spec in fields(config):
        value, declared = getattr(config, spec.name), str(spec.type)
        if value is None:
            continue
        if declared.startswith("list[Path]"):
            setattr(config, spec.name, [Path(v) for v in ([value] if isinstance(value, str | PathLike) else value)])
        elif declared.startswith("Path") and isinstance(value, str):
            setattr(config, spec.name, Path(value))
        elif declared.startswith("str") and isinstance(value, PathLike):
            setattr(config, spec.name, str(value))


def _check_declared(config: Any) -> None:
    _as_declared(config)
    for spec in cli_fields(type(config)):
        value = getattr(config, spec.name)
        name = spec.metadata["flags"][0] if spec.metadata["flags"] else option_name(spec.name)
        minimum, choices = spec.metadata["minimum"], spec.metadata["choices"]
        if minimum is not None and value is not None and value < minimum:
            qualifier = "at least" if isinstance(minimum, int) and minimum > 0 else ">="
            raise _refused(f"{name} must be {qualifier} {minimum}, got {value}", spec.name)
        if choices is not None and value is not None and value not in choices:
            raise _refused(f"unknown {name} {value!r}; choose one of {', '.join(choices)}", spec.name)


# --- options that several commands share (each default written once, here) ---

def model_option() -> Any:
    return option(help="HuggingFace hub name or local directory of a causal LM.", group="Inputs")


def base_model_option() -> Any:
    return option(None, group="Inputs",
                  help="With --model a LoRA/PEFT adapter folder (adapter_config.json): its base model, a hub name or "
                       "a local directory (default: the adapter's base_model_name_or_path).")


def revision_option() -> Any:
    return option(None, help="Model revision (branch, tag or commit) on the hub. With a local model directory it "
                             "is not used to load anything, but is recorded and must match the factors' revision.",
                  group="Inputs")


def dtype_option() -> Any:
    return option("auto", choices=DTYPE_CHOICES,
                  help="Model weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16.",
                  group="Precision")


def matmul_precision_option() -> Any:
    return option(
        "auto", choices=MATMUL_PRECISIONS,
        help="Float32 matrix products on CUDA: ieee (full float32) or tf32 (TensorFloat-32: inputs rounded to 10 "
             "mantissa bits, several times faster on tensor cores); auto = tf32 on CUDA (measured safe: see "
             "docs/precision.md), ieee on CPU, which has no TF32. Set explicitly whatever the caller had set, "
             "and recorded.",
        group="Precision")


def chat_template_option() -> Any:
    return option(False, flags=("--chat-template",), group="Inputs",
                  help="Format prompt/completion records as one user turn and one assistant turn through the "
                       "tokenizer's chat template (instruct models). Records with 'messages' always use it.")


def max_length_option(help: str) -> Any:
    return option(512, minimum=1, help=help, group="Inputs")


def top_k_option(default: int = 5) -> Any:
    return option(default, minimum=1, compare=False, help="Helpful and harmful training examples shown per query.",
                  group="Outputs")


@dataclass
class FitConfig:
    """Fit Hessian factors (EK-FAC, K-FAC, diagonal or identity) on a model's MLP projections (or the layers --track
    names).

    Rerun with the same arguments to resume an interrupted fit from its last complete stage.
    """

    model: str = model_option()
    hessian_dataset: str = option(
        help="Fitting data: a dataset dir saved with datasets' save_to_disk (input_ids, optional attention_mask "
             "and labels), or a .json/.jsonl file of prompt/completion records.", group="Inputs")
    output_dir: str = option(help="Where the factors and metadata.json are written.", group="Outputs")
    revision: str | None = revision_option()
    base_model: str | None = base_model_option()
    factor_batch_size: int = option(8, minimum=1, help="Batch size for the covariance pass.", group="Memory and speed")
    lambda_batch_size: int = option(4, minimum=1, help="Batch size for the eigenvalue-correction pass.",
                                    group="Memory and speed")
    strategy: str = option("ekfac", choices=STRATEGIES,
                           help="Hessian approximation: ekfac, kfac, diagonal or identity.", group="Approximation")
    layer_stride: int = option(1, minimum=1, help="Track the layers of every Nth transformer block (0, N, 2N...).",
                               group="Approximation")
    track: str = option(
        "mlp", choices=TRACK_CHOICES, group="Approximation",
        help="Which layers of the blocks to attribute through: mlp (the MLP projections), attention (the attention "
             "projections: q/k/v/o, GPT-2's c_attn and c_proj) or all-linear (every linear layer of the blocks; "
             "never the embeddings or the LM head), or lora (a LoRA adapter's own lora_A and lora_B matrices: what "
             "fine-tuning changed; the other kinds track an adapter's model with the adapter merged in). Recorded "
             "with the factors, which run-query follows. Mixture-of-experts models: attention only.")
    dtype: str = dtype_option()
    max_examples: int | None = option(None, minimum=1, help="Use only the first N examples (default: all).",
                                      group="Inputs")
    max_length: int = max_length_option("Token limit for .json/.jsonl records (prompt cut from the left).")
    chat_template: bool = chat_template_option()
    fisher: str = option("true", choices=FISHER_TYPES,
                         help="true: labels sampled from the model (true Fisher); empirical: the data's own labels.",
                         group="Approximation")
    module_partitions: int = option(1, minimum=1, help="Fit the factors in N groups of modules to lower peak memory.",
                                    group="Memory and speed")
    seed: int = option(
        0, group="Approximation",
        help="Seed of the true Fisher's labels: each example's labels are a function of (seed, stage, its tokens), "
             "the same whatever the batch sizes, order, partitions, GPUs or resuming.")
    matmul_precision: str = matmul_precision_option()
    eigendecomposition_dtype: str = option(
        "float64", choices=EIGENDECOMPOSITION_DTYPES,
        help="Precision of the covariances' eigendecomposition: float64 or float32 (faster; factors are stored "
             "in float32 either way).", group="Precision")
    overwrite: bool = option(False, help="Replace factors fitted with other arguments.", group="Outputs")
    # Library callers only: replace factors fitted with other arguments or weights, but resume identical
    # ones (the demo's cache).
    refit_if_changed: bool = field(default=False)

    def __post_init__(self) -> None:
        _check_declared(self)


class MemoryOptions:
    """``--workspace-gb`` and ``--host-memory-gb`` in bytes (None: the default), for the commands that have them."""

    workspace_gb: float | None
    host_memory_gb: float | None

    @property
    def workspace_bytes(self) -> int | None:
        return gigabytes(self.workspace_gb)

    @property
    def host_memory_bytes(self) -> int | None:
        return gigabytes(self.host_memory_gb)


# Records given in memory (QueryConfig's ``queries``/``train``, the Python API's arguments) -> their file's field.
RECORDS_FILES = {"queries": "query_json", "train": "train_json"}


@dataclass
class QueryConfig(MemoryOptions):
    """Score every (query, train) pair and write query.csv, train.csv and influences.csv.

    Give query folders, or --train-json, --query-json and --output-dir for one pair of files.
    Prints each query's most helpful and harmful training examples unless --quiet.
    """

    model: str = model_option()
    factors_dir: str = option(help="Output directory of fit-hessians.", group="Inputs")
    folders: list[Path] | None = option(
        None, argument=True, show_default=False,
        help="Query folders, each with train.json and query.json; results go to FOLDER/results/.", group="Inputs")
    train_json: Path | None = option(None, help="Training examples (single-run mode).", group="Inputs")
    train_dataset: Path | None = option(
        None,
        help="A training corpus as the train side, instead of train.json (in single-run mode, and for every "
             "folder): a save_to_disk dataset (input_ids, optional attention_mask and labels; no labels: every "
             "token), a .jsonl or .parquet file of {\"text\": ...} documents (optional \"id\" and extra fields), or "
             "a flat .npy token array (uint16/uint32). Documents longer than --max-length are cut into consecutive "
             "windows (train_id ID#k).", group="Inputs")
    query_json: Path | None = option(None, help="Query examples (single-run mode).", group="Inputs")
    output_dir: Path | None = option(None, help="Where the CSVs go (single-run mode).", group="Outputs")
    revision: str | None = revision_option()
    base_model: str | None = base_model_option()
    per_token_scores: bool = option(False, flags=("--per-token-scores",),
                                    help="Add per-token scores aligned with each train example's tokens.",
                                    group="Outputs")
    score_batch_size: int = option(
        8, minimum=1,
        help="Batch size for gradients while scoring: the default of --query-batch-size and --train-batch-size.",
        group="Memory and speed")
    query_batch_size: int | None = option(
        None, minimum=1, show_default=False,
        help="Batch size for query gradients (default: --score-batch-size). Default engine: the queries (an "
             "example that is also a train example counts as a query) go through the model in batches of at most "
             "this many; Kronfluence engine: its query batch size (and the query-loss pass).", group="Memory and speed")
    train_batch_size: int | None = option(
        None, minimum=1, show_default=False,
        help="Batch size for train gradients (default: --score-batch-size). Default engine: the train examples "
             "that are not queries go through the model in batches of at most this many; Kronfluence engine: its "
             "train batch size (pairwise and self-influence passes).", group="Memory and speed")
    damping: str = option(
        "auto",
        help="Damping added to the Hessian approximation: a number, or auto (0.1 x mean eigenvalue per module).",
        group="Approximation")
    dtype: str = dtype_option()
    matmul_precision: str = matmul_precision_option()
    max_length: int = max_length_option("Token limit per example; prompts are cut from the left.")
    chat_template: bool = chat_template_option()
    eos_in_loss: bool = option(
        True, flags=("--eos-in-loss/--no-eos-in-loss",),
        help="Whether the EOS token that ends each completion is part of the loss being attributed (and of "
             "`loss`). --no-eos-in-loss leaves it out of both gradients: for base models, which are not trained "
             "to stop after a statement, EOS's uncertain prediction can dominate raw scores. The factors are "
             "fitted with EOS either way.", group="Approximation")
    engine: str = option(
        "if-query", choices=ENGINES,
        help="if-query: exact scores from one forward/backward pass per distinct sequence, in bounded memory "
             "(default); kronfluence: Kronfluence's own streaming scorer, a small-scale cross-check.", group="Engine")
    workspace_gb: float | None = option(
        None, minimum=0, compare=False,
        help="Memory for whitened gradients formed at once (on the GPU, or RAM on CPU), in GB of 10^9 bytes; "
             "default: half the free GPU memory (a quarter of the free RAM on CPU). Smaller is exact but slower.",
        group="Memory and speed")
    host_memory_gb: float | None = option(
        None, minimum=0, compare=False,
        help="RAM for the token factors (layer inputs and output gradients) of a folder, in GB of 10^9 bytes; "
             "beyond it the train side is scored in chunks (or the queries spilled to a memory-mapped file in "
             "--spill-dir). Default: half the free RAM (divided among a host's torchrun ranks), read once.",
        group="Memory and speed")
    spill_dir: str | None = option(
        None, compare=False,
        help="Directory of the spill file (default: the system's temp dir; deleted when the run ends).",
        group="Memory and speed")
    skip_done: bool = option(
        False, flags=("--skip-done",), compare=False,
        help="Skip folders whose results are complete and were scored with the same settings, weights, factors "
             "and inputs (their run.json's identity); others are scored again, saying what differs (resume an "
             "interrupted batch of folders).", group="Outputs")
    query_rank: int | None = option(
        None, minimum=1, help="--engine kronfluence only: low-rank (rank R) query gradients (approximate).",
        group="Engine")
    queries_per_pass: int | None = option(
        None, minimum=1,
        help="--engine kronfluence only: queries held in memory per pass over the train set (default: all).",
        group="Engine")
    module_partitions: int = option(
        1, minimum=1, help="--engine kronfluence only: score in N groups of modules to lower memory.", group="Engine")
    top_train: int | None = option(
        None, minimum=1,
        help="Keep only each query's K most helpful and K most harmful train examples (by --rank-by; ties "
             "by train_id) in influences.csv, and only the train examples that appear in train.csv.", group="Outputs")
    index: Path | None = option(
        None,
        help="An index of the --train-dataset corpus (if-query index): each query's --candidates best and worst "
             "windows by the index's estimate are read back from the corpus and scored exactly; no pass over the "
             "corpus. Needs --top-train. An index built for other weights, factors, damping, --max-length or "
             "another corpus is refused. See docs/index.md.", group="Inputs")
    candidates: int = option(
        INDEX_CANDIDATES, minimum=1,
        help="With --index: windows shortlisted per query at each end of the ranking (its most helpful and its "
             "most harmful by the index), scored exactly (the union over the queries).", group="Approximation")
    cosine: bool = option(
        True, flags=("--cosine/--no-cosine",),
        help="Compute influence_cosine, which needs every train example's self-influence (its gradient rotated "
             "into the eigenbasis: several times the model's own pass at 13B). --no-cosine drops the column.",
        group="Outputs")
    rank_by: str | None = option(
        None, choices=RANK_BY, show_default=False,
        help="What ranks the train examples in the summary, report.html and --top-train: cosine (influence_cosine: "
             "which examples point the same way as the query, whatever their gradients' size) or score "
             "(influence_score: the estimated effect on the query's loss, led by large gradients). Default: cosine, "
             "score under --no-cosine. Recorded in run.json.", group="Outputs")
    refine_steps: int = option(
        0, minimum=0,
        help="Refine each query's inverse-Hessian-vector product by N EK-FAC-preconditioned Neumann steps on the "
             "Gauss-Newton matrix of the fitting data (ASTRA); 0: EK-FAC. Needs the model, every module's factors "
             "and four times the tracked weights in float32 on the device (if-query plan --refine-steps says how "
             "much).", group="Approximation")
    refine_data: Path | None = option(
        None, help="Fitting data for --refine-steps (default: the factors' own, checked against their fingerprint).",
        group="Approximation")
    refine_batch_size: int = option(8, minimum=1, help="Examples per Gauss-Newton batch of --refine-steps.",
                                    group="Approximation")
    report: bool = option(
        False, flags=("--report",), compare=False,
        help="Also write report.html (heatmap, top influences, token colours) into each results dir.", group="Outputs")
    top_k: int = top_k_option()
    # Library callers only: the command line recorded in run.json (None: sys.argv).
    command: list[str] | None = field(default=None, compare=False)
    # Library callers only (if_query.api makes them): query and train records given in memory, a list of validated
    # if_query.data.records.Example each, instead of query_json and train_json (single-run mode).
    queries: list | None = field(default=None)
    train: list | None = field(default=None)
    # Library callers only (benchmarks): how --index sketches a query (if_query.index.sketch.QUERY_FORMS).
    index_query_form: str = field(default="symmetric")
    # Library callers only: False lets single-run mode leave output_dir None: the results are returned, not written.
    output_required: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        _check_declared(self)
        single = (self.train_json, self.query_json, self.output_dir, self.queries, self.train)
        if self.folders and any(value is not None for value in single):
            raise _refused("give either query folders or --train-json/--query-json/--output-dir, not both", "folders")
        given = {"train_json": self.train_json if self.train is None else self.train,
                 "query_json": self.query_json if self.queries is None else self.queries,
                 "output_dir": self.output_dir if self.output_required else True}
        if self.train_dataset is not None:
            given["train_json"] = self.train_dataset
        missing = [name for name, value in given.items() if value is None]
        if not self.folders and missing:
            if self.output_required:
                raise _refused("give query folders, or all of --train-json (or --train-dataset), --query-json and "
                               "--output-dir", missing[0])
            records = {file: name for name, file in RECORDS_FILES.items()}  # a library call: the records' arguments
            raise _refused("give query folders, or query records (or --query-json) and train records (or "
                           "--train-json, or --train-dataset)", records[missing[0]])
        if self.query_json is not None and self.queries is not None:
            raise _refused("give query records or --query-json, not both", "queries")
        if self.train_json is not None and self.train is not None:
            raise _refused("give train records or --train-json, not both", "train")
        if self.train_dataset is not None and (self.train_json is not None or self.train is not None):
            raise _refused("give --train-json or --train-dataset, not both", "train_dataset")
        if self.train_dataset is not None and self.per_token_scores and self.top_train is None:
            raise _refused("--per-token-scores with --train-dataset needs --top-train (per-token scores of every "
                           "pair of a corpus would not fit anywhere)", "per_token_scores")
        if self.engine == "kronfluence" and (self.train_dataset is not None or self.top_train is not None
                                             or not self.cosine or self.refine_steps):
            raise _refused("--train-dataset, --top-train, --no-cosine and --refine-steps need the default engine",
                           "engine")
        if self.index is not None and (self.train_dataset is None or self.top_train is None):
            raise _refused("--index shortlists windows of the --train-dataset corpus it indexes and keeps each "
                           "query's --top-train K of them: give both", "index")
        if self.report and not self.folders and self.output_dir is None:
            raise _refused("--report writes report.html into the results directory: give --output-dir", "report")
        if self.rank_by == "cosine" and not self.cosine:
            raise InputError("cosine ranks by influence_cosine, which --no-cosine does not compute; use --rank-by "
                             "score or drop --no-cosine", option="rank_by")
        if self.engine != "kronfluence":
            defaults = {spec.name: spec.default for spec in fields(self)}
            used = [name for name in KRONFLUENCE_ONLY if getattr(self, name) != defaults[name]]
            if used:
                raise _refused(f"{option_name(used[0])} applies only to --engine kronfluence (the default engine "
                               "scores exactly, one module at a time, in bounded memory)", used[0])
        parse_damping(self.damping)  # a bad --damping is refused here, not when scoring starts

    @property
    def ranking(self) -> str:
        """--rank-by resolved: cosine where the cosine is computed, else score."""
        return self.rank_by or ("cosine" if self.cosine else "score")

    @property
    def damping_value(self) -> float | None:
        """The damping as a number; None for ``auto`` (Kronfluence's heuristic, resolved per module)."""
        return parse_damping(self.damping)

    def batch_sizes(self) -> tuple[int, int]:
        """The effective (query, train) batch sizes, each defaulting to ``score_batch_size``. The default
        engine passes a query (an example that is also a train example counts as a query) through the
        model in a batch of at most the query batch size, a train-only example in a batch of at most the
        train batch size; Kronfluence's streaming scorer uses them as its query and train batch sizes."""
        return (self.query_batch_size or self.score_batch_size, self.train_batch_size or self.score_batch_size)


def misplaced_option(config_class: type, flag: str) -> str | None:
    """What to say when run-query is given ``flag``, an option of fit-hessians alone (``--strategy``, ...): it
    comes from the factors. None for any other unknown option (the command line's own message)."""
    if config_class is not QueryConfig:
        return None
    ours = {spec.name for spec in cli_fields(QueryConfig)}
    for spec in cli_fields(FitConfig):
        if spec.name not in ours | {"overwrite"} and flag in (spec.metadata["flags"] or (option_name(spec.name),)):
            return (f"{flag} is a fit-hessians option, not run-query's: the {spec.name.replace('_', ' ')} comes from "
                    f"the factors (--factors-dir); to change it, fit other factors with fit-hessians {flag}")
    return None


def parse_damping(damping: str) -> float | None:
    """``--damping`` as a number; None for ``auto``."""
    if damping.strip().lower() == "auto":
        return None
    try:
        value = float(damping)
    except ValueError:
        raise _refused(f"--damping must be a number or 'auto', got {damping!r}", "damping") from None
    if value < 0 or not math.isfinite(value):
        raise _refused(f"--damping must be a finite number >= 0 or 'auto', got {damping}", "damping")
    return value


def same_option(config_class: type, name: str, help: str | None = None) -> Any:
    """``config_class``'s option ``name`` again, with its default and checks (declared once), and its help
    unless another is given."""
    spec = next(f for f in fields(config_class) if f.name == name)
    metadata = dict(spec.metadata, **({"help": help} if help else {}))
    if spec.default_factory is not MISSING:
        return field(default_factory=spec.default_factory, metadata=metadata, compare=spec.compare)
    return field(default=spec.default, metadata=metadata, compare=spec.compare)


@dataclass
class IndexConfig:
    """Index a training corpus once for many query sets: each window's whitened gradient, sketched per module.

    One frozen-weight forward and backward pass per window of --train-dataset (windows as run-query cuts them); per
    tracked module the EK-FAC scaling approximated by a rank --scaling-rank sum and the whitened gradient sketched to
    --sketch-dim x --sketch-dim numbers from the window's token factors. Rows, their squared norms and a manifest go to
    --output-dir; run-query --index shortlists each query's candidates from them and scores those exactly. Rerun with
    the same arguments to resume; under torchrun each rank indexes its share of the shards. See docs/index.md.
    """

    model: str = same_option(QueryConfig, "model")
    factors_dir: str = same_option(QueryConfig, "factors_dir")
    train_dataset: Path = option(
        help="The corpus to index, in any format run-query's --train-dataset reads (windows of --max-length tokens).",
        group="Inputs")
    output_dir: Path = option(help="The index directory (manifest.json, shard files).", group="Outputs")
    base_model: str | None = same_option(QueryConfig, "base_model")
    revision: str | None = same_option(QueryConfig, "revision")
    damping: str = same_option(QueryConfig, "damping")
    dtype: str = same_option(QueryConfig, "dtype")
    matmul_precision: str = same_option(QueryConfig, "matmul_precision")
    max_length: int = same_option(QueryConfig, "max_length")
    chat_template: bool = same_option(QueryConfig, "chat_template")
    eos_in_loss: bool = same_option(QueryConfig, "eos_in_loss")
    sketch: str = option(
        INDEX_SKETCH, choices=SKETCH_KINDS,
        help="eigen: each module's whitened gradient kept on the block of its eigenbasis (k rows x k columns) that "
             "carries the most whitened energy, S applied exactly; gaussian: Gaussian projections of both sides, "
             "with S approximated by its rank --scaling-rank SVD (docs/index.md compares them).",
        group="Approximation")
    sketch_dim: int = option(
        SKETCH_DIM, minimum=1,
        help="k: each module's whitened gradient (out x in') is sketched to k x k numbers. A row is modules x k^2 "
             "numbers.", group="Approximation")
    scaling_rank: int = option(
        SCALING_RANK, minimum=1,
        help="--sketch gaussian: each module's EK-FAC scaling is approximated by its rank-R truncated SVD (its error "
             "is recorded in the manifest); the cost of sketching grows with R.", group="Approximation")
    seed: int = option(0, help="Seed of the Gaussian projections (recorded; queries use the same).",
                       group="Approximation")
    row_dtype: str = option("float16", choices=ROW_DTYPES, help="How rows are stored: float16 or float32.",
                            group="Outputs")
    shard_rows: int = option(65536, minimum=1, help="Windows per shard file (shard s is indexed by rank s mod N).",
                             group="Outputs")
    batch_size: int = option(8, minimum=1, help="Windows per forward and backward pass.", group="Memory and speed")
    spill_dir: str | None = option(None, compare=False, help="Directory of the corpus's token cache (default: the "
                                   "system's temp dir; deleted when the run ends).", group="Memory and speed")
    overwrite: bool = option(False, help="Replace an index built with other arguments in --output-dir.",
                             group="Outputs")

    def __post_init__(self) -> None:
        _check_declared(self)
        parse_damping(self.damping)


DEVICES = ("cuda", "cpu")
# Dense datasheet peaks of an H100 or H200 SXM (the same compute), FLOP/s: the plan's stated times.
H100_BF16_TFLOPS, H100_TF32_TFLOPS, H100_FP32_TFLOPS = 989.4, 494.7, 66.9


@dataclass
class PlanConfig(MemoryOptions):
    """Estimate the memory and time of fit-hessians and run-query from a model's config.json alone.

    The model is built on the meta device: no weights are read, nothing is downloaded when the config is local,
    no GPU is needed, and a directory holding only config.json will do (folders also need its tokenizer). Prints
    the factor sizes, each stage's peak memory per GPU (device and host) and its FLOPs with a time at stated
    peaks, and how a run would go: at once or in chunks, and which ranks score what. Give query folders,
    --sequences (a folder) or --documents (a corpus), of --tokens tokens, to plan scoring; without them the fit
    alone is planned. Exits 0 even when the plan does not fit, saying what does not and what to change (a fit
    pass over the memory: the fewest --module-partitions that fit). Estimates computed from the shapes, not
    measurements.
    """

    model: str = same_option(FitConfig, "model")
    folders: list[Path] | None = same_option(
        QueryConfig, "folders", help="Query folders to plan run-query for (train.json and query.json, tokenized).")
    sequences: int | None = option(
        None, minimum=1, help="Without folders: distinct sequences in a folder (train = query counts once).",
        group="Inputs")
    documents: int | None = option(
        None, minimum=1, help="Without folders: plan a corpus run (--train-dataset) of N documents (windows) of "
                              "--tokens tokens against --queries queries.", group="Inputs")
    queries: int = option(16, minimum=1, help="Queries scored against the corpus of --documents.", group="Inputs")
    tokens: int = option(512, minimum=1, help="Tokens per sequence (--sequences; also the fitting sequences).",
                         group="Inputs")
    revision: str | None = same_option(FitConfig, "revision")
    base_model: str | None = same_option(FitConfig, "base_model")
    strategy: str = same_option(FitConfig, "strategy")
    layer_stride: int = same_option(FitConfig, "layer_stride")
    track: str = same_option(FitConfig, "track")
    dtype: str = same_option(FitConfig, "dtype", help="Model weights dtype, as in the other commands; the plan is "
                             "for a GPU, so auto is bfloat16 (float32 with --device cpu).")
    matmul_precision: str = same_option(FitConfig, "matmul_precision")
    factor_batch_size: int = same_option(FitConfig, "factor_batch_size")
    lambda_batch_size: int = same_option(FitConfig, "lambda_batch_size")
    module_partitions: int = same_option(FitConfig, "module_partitions")
    fit_sequences: int = option(10000, minimum=1, help="Fitting sequences (of --tokens tokens), for fit-hessians' "
                                                       "time.", group="Inputs")
    max_length: int = same_option(QueryConfig, "max_length")
    chat_template: bool = same_option(QueryConfig, "chat_template")
    score_batch_size: int = same_option(QueryConfig, "score_batch_size")
    per_token_scores: bool = same_option(QueryConfig, "per_token_scores")
    refine_steps: int = same_option(QueryConfig, "refine_steps", help="As for run-query: plan its device memory "
                                    "(the model, every module's factors, a fitting batch of --refine-batch-size x "
                                    "--max-length tokens, one query's vectors).")
    refine_batch_size: int = same_option(QueryConfig, "refine_batch_size")
    workspace_gb: float | None = same_option(QueryConfig, "workspace_gb", help="As for run-query (GB of 10^9 bytes); "
                                             "default: half of the GPU's memory left by the model (CPU: a quarter "
                                             "of the free RAM).")
    host_memory_gb: float | None = same_option(
        QueryConfig, "host_memory_gb",
        help="As for run-query (GB of 10^9 bytes); default: half of --host-ram-gb, divided among --gpus ranks.")
    sketch: str = same_option(IndexConfig, "sketch", help="With --documents: the index's sketch (if-query index).")
    sketch_dim: int = same_option(IndexConfig, "sketch_dim", help="With --documents: the index's k (if-query index).")
    scaling_rank: int = same_option(IndexConfig, "scaling_rank",
                                    help="With --documents and --sketch gaussian: the index's R (if-query index).")
    row_dtype: str = same_option(IndexConfig, "row_dtype", help="With --documents: the index's row dtype.")
    gpu_memory_gb: float = option(80.0, minimum=0, help="Memory of each GPU, GB of 10^9 bytes.", group="Hardware")
    gpus: int = option(1, minimum=1, help="GPUs (torchrun ranks) on the host: fitting is data parallel, folders are "
                                          "shared out, host memory is divided among the ranks.", group="Hardware")
    host_ram_gb: float = option(512.0, minimum=0, help="The host's RAM, GB of 10^9 bytes (stated, not measured).",
                                group="Hardware")
    device: str = option("cuda", choices=DEVICES, group="Hardware",
                         help="Plan for CUDA GPUs, or for a run on the CPU (sizes and FLOPs, no times: the stated "
                              "peaks are a GPU's).")
    bf16_tflops: float = option(H100_BF16_TFLOPS, minimum=0,
                                help="Peak of the model's passes, TFLOP/s (H100/H200 SXM bf16, dense).",
                                group="Hardware")
    tf32_tflops: float = option(H100_TF32_TFLOPS, minimum=0, help="Peak of float32 work under tf32, TFLOP/s.",
                                group="Hardware")
    fp32_tflops: float = option(H100_FP32_TFLOPS, minimum=0, help="Peak of float32 work under ieee, TFLOP/s.",
                                group="Hardware")

    def __post_init__(self) -> None:
        _check_declared(self)


@dataclass
class ReportConfig:
    """Write RESULTS_DIR/report.html: one self-contained page (heatmap, top influences, token colours)."""

    results_dir: Path = option(argument=True, show_default=False,
                               help="A run-query results directory (query.csv, train.csv, influences.csv).",
                               group="Inputs")
    top_k: int = top_k_option()
    factors_dir: Path | None = option(
        None, help="The fit-hessians directory used, for the page's header (model, revision, strategy); by "
                   "default the header comes from the results' run.json.", group="Inputs")

    def __post_init__(self) -> None:
        _check_declared(self)


@dataclass
class DemoConfig:
    """Fit factors on the bundled tiny GPT-2 and score its test query, printing the top influences."""

    output_dir: Path = option(
        Path("if-query-demo"),
        help="Folder the demo writes into (created if missing): factors/ (a cache, reused while the model is "
             "unchanged) and test_query/ (the bundled query.json and train.json, scored into test_query/results/).",
        group="Outputs")
    top_k: int = top_k_option(3)

    def __post_init__(self) -> None:
        _check_declared(self)


# Each command's configuration, the one list: the command line is built from it (if_query.cli), and so are the
# option pages (scripts/option_docs.py).
COMMANDS = {"fit-hessians": FitConfig, "run-query": QueryConfig, "index": IndexConfig, "plan": PlanConfig,
            "report": ReportConfig, "demo": DemoConfig}

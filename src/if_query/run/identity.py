"""A run's identity: everything that determines its numbers, and nothing that does not.

In: the weights (their fingerprint; the model's name only where the factors recorded none), the factors (their
fit's arguments and completion time), the options that change scores or what is written, and the inputs as
tokens (the distinct query sequences in order; the train sequences, or the corpus's windows). Out: the budgets
(``--host-memory-gb``, ``--workspace-gb``), the batch sizes (scores do not depend on them), the spill directory,
the number of ranks, and paths that hold the same content. Partial results resume under the same identity
(:mod:`if_query.run.checkpoint`), whatever budget or number of ranks the rerun has; ``--skip-done`` skips a job whose
run.json records its identity (:func:`stale`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from if_query.config import QueryConfig
from if_query.data.tokenization import TokenizedExample
from if_query.fit.metadata import canonical_model
from if_query.report.provenance import RUN_FILE, read_run
from if_query.report.results import RESULT_FILES

# How --skip-done names an identity entry that differs (others: the option, with both values)
DESCRIBED = {"weights": "model weights", "factors": "factors", "queries": "query records (their tokens)",
             "train": "train examples (their tokens)", "refine_data": "--refine-steps fitting data"}
# The run-query options that change the scores or what is written (anything else: memory, speed, output).
SCORE_OPTIONS = ("damping", "dtype", "matmul_precision", "max_length", "eos_in_loss", "chat_template", "engine",
                 "cosine", "per_token_scores", "top_train", "rank_by", "refine_steps", "refine_batch_size",
                 "query_rank")


def sequences_digest(sequences: Iterable[TokenizedExample]) -> str:
    """sha256 of token sequences (ids and labels), in order."""
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(json.dumps([sequence.input_ids, sequence.labels]).encode())
    return digest.hexdigest()


def run_identity(config: QueryConfig, metadata: dict, queries: str, train: str, resolved: dict,
                 refine_data: str | None = None) -> dict:
    """What determines a run's numbers, entry by entry (``queries``/``train``: digests of the inputs' tokens;
    ``resolved``: the dtype and matmul precision ``auto`` resolved to on this device; ``refine_data``: the
    fingerprint of --refine-steps' fitting examples)."""
    fit = metadata.get("fit") or {}
    weights = fit.get("weights_fingerprint")
    return {
        "weights": weights if weights else canonical_model(config.model),
        "revision": config.revision,
        # the fit's arguments and data fingerprints decide the factors (a rerun of the same fit writes the same
        # numbers); not its completion time, which a resumed or repeated fit rewrites
        "factors": hashlib.sha256(json.dumps(fit, sort_keys=True, default=str).encode()).hexdigest(),
        **{name: getattr(config, name) for name in SCORE_OPTIONS},
        "damping": "auto" if config.damping_value is None else config.damping_value,  # "0.10" is "0.1"
        "rank_by": config.ranking,  # resolved: the default and an explicit --rank-by cosine rank alike
        **resolved,
        "refine_data": refine_data if config.refine_steps else None,
        "queries": queries,
        "train": train,
    }


def stale(output_dir: Path, current: dict) -> str | None:
    """Why the results in ``output_dir`` are not those of a run of identity ``current`` (None: they are, and
    --skip-done skips the job): a result file missing, or run.json recording another identity (the first entries
    that differ named)."""
    missing = [name for name in (*RESULT_FILES, RUN_FILE) if not (output_dir / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    recorded = (read_run(output_dir) or {}).get("identity")
    if not isinstance(recorded, dict):
        return "its run.json records no identity (written by an older if-query)"
    differing = [key for key in current if recorded.get(key) != current[key]]
    return None if not differing else "scored with other " + ", ".join(
        DESCRIBED.get(key, key.replace("_", "-")) + ("" if key in DESCRIBED else
                                                     f" ({recorded.get(key)!r}, now {current[key]!r})")
        for key in differing[:3])


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

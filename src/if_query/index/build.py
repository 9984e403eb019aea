"""``if-query index``: one frozen-weight forward and backward pass per window of a corpus, each tracked module's sketch
of the window's whitened gradient formed from its token factors inside the pass (:mod:`if_query.index.sketch`), the
rows written to the index's shards (:mod:`if_query.index.store`).

The model, factors and corpus are read as run-query reads them (a :class:`~if_query.run.run_query.QueryRunner` with
no queries: the same compatibility checks, windows and identity). Resumable by window; under torchrun (gloo, so
also on CPU) shard s is rank s mod N's, rank 0 writes the manifest and marks the index complete once every rank is
done. The index does not depend on the number of ranks: a shard's batches are the same whoever builds it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from if_query import __version__, distributed
from if_query.atomic import check_writable_dir
from if_query.config import IndexConfig, QueryConfig
from if_query.data.corpus import Corpus, file_digest
from if_query.data.tokenization import Collator
from if_query.errors import InputError, RunError
from if_query.index.sketch import ModuleSketch
from if_query.index.store import CORPUS, FORMAT, IDENTITY_KEYS, IndexStore, read_manifest
from if_query.plan.sizes import human_bytes
from if_query.run.run_query import QueryRunner
from if_query.score.capture import LayerRecorder, forward_backward, frozen_weights

logger = logging.getLogger(__name__)


def query_config(config: IndexConfig) -> QueryConfig:
    """The run-query configuration that reads the model, factors and corpus as ``config`` says (no queries)."""
    return QueryConfig(model=config.model, base_model=config.base_model, factors_dir=config.factors_dir,
                       train_dataset=config.train_dataset, queries=[], output_required=False,
                       revision=config.revision, damping=config.damping, dtype=config.dtype,
                       matmul_precision=config.matmul_precision, max_length=config.max_length,
                       chat_template=config.chat_template, eos_in_loss=config.eos_in_loss, spill_dir=config.spill_dir)


def module_sketches(scorer, sketch: dict) -> list[ModuleSketch]:
    """Every tracked module's sketch operators on the scorer's device, as the manifest's ``sketch`` says."""
    setup = scorer.setup
    return [ModuleSketch.make(shape, setup.factors.preconditioner(shape.name, setup.damping, setup.device),
                              sketch["k"], sketch["scaling_rank"], sketch["seed"], setup.device, sketch["kind"])
            for shape in setup.shapes]


def sketch_of(config: IndexConfig) -> dict:
    return {"kind": config.sketch, "seed": config.seed, "k": config.sketch_dim, "scaling_rank": config.scaling_rank}


def sketch_batch(model, recorder: LayerRecorder, sketches: list[ModuleSketch], batch: dict) -> torch.Tensor:
    """One forward and backward pass of a collated batch (on the device): its rows (batch, D) float32, modules in
    order. The token factors live only as long as the pass."""
    forward_backward(model, batch)
    rows = torch.cat([s.rows(recorder.inputs[s.shape.name], recorder.output_grads[s.shape.name]) for s in sketches],
                     dim=1)
    recorder.clear()
    return rows


def _manifest(config: IndexConfig, runner: QueryRunner, sketches: list[ModuleSketch]) -> dict:
    corpus = runner.corpus
    identity = runner._identity("", corpus.digest)
    offsets = np.cumsum([0] + [s.dim for s in sketches]).tolist()
    return {
        "format": FORMAT, "if_query_version": __version__,
        "identity": {key: identity[key] for key in IDENTITY_KEYS},
        "model": config.model, "factors_dir": str(config.factors_dir), "strategy": runner.scorer.factors.strategy,
        "tracked_modules": [s.shape.name for s in sketches],
        "corpus": {"path": str(config.train_dataset), "digest": corpus.digest, "tokens": int(corpus.lengths().sum())},
        "windows": len(corpus.lengths()),
        "sketch": sketch_of(config),
        "row_dtype": config.row_dtype, "shard_rows": config.shard_rows, "row_dim": int(offsets[-1]),
        "modules": [{"name": s.shape.name, "offset": int(offsets[i]), "dim": s.dim, "scaling_rank": s.rank,
                     "error": s.error, "damping": s.pre.damping} for i, s in enumerate(sketches)],
        "complete": False,
    }


def _same(recorded: dict | None, manifest: dict) -> bool:
    return recorded is not None and {**recorded, "complete": False, "if_query_version": None} == {
        **manifest, "if_query_version": None}


def _open(config: IndexConfig, manifest: dict, lengths: np.ndarray) -> IndexStore:
    """Rank 0: the index to write into ``config.output_dir``, resumed when it holds one of the same manifest; a
    directory holding another index is refused unless --overwrite."""
    directory = Path(config.output_dir)
    recorded = read_manifest(directory)
    if _same(recorded, manifest):
        store = IndexStore(directory, recorded, "r+")
        if done := store.done_count():
            logger.info("Resuming the index in %s: %d of %d windows already indexed", directory, done, store.windows)
        return store
    if recorded is not None and not config.overwrite:
        differ = [key for key in manifest if key not in ("complete", "if_query_version")
                  and recorded.get(key) != manifest[key]]
        raise InputError(f"{directory} holds an index built with other arguments ({', '.join(differ[:3])} differ): "
                         "give another --output-dir, or --overwrite to replace it", option="output_dir",
                         flag_first=False)
    return IndexStore.create(directory, manifest, lengths)


def _keep_windows(corpus: Corpus, directory: Path, read_from: str) -> None:
    """The index's copy of the corpus's windows, which run-query --index reads its candidates from (an optimisation:
    a copy that cannot be written is a warning, and answering reads the corpus)."""
    if Corpus.saved_digests(directory) == (corpus.digest, read_from):
        return
    try:
        corpus.save(directory, read_from)
    except OSError as exc:
        logger.warning("Could not keep the corpus's windows in %s (%s): run-query --index will read the corpus",
                       directory, exc)


def build_index(config: IndexConfig, quiet: bool = False) -> dict:
    """Index ``config.train_dataset`` into ``config.output_dir`` (see the module docstring); returns the manifest."""
    check_writable_dir(config.output_dir, "output_dir")
    world, me = distributed.world_size(), distributed.rank()
    if world > 1:
        distributed.start_folder_sharding()
    runner = QueryRunner(query_config(config), quiet=True)
    corpus = runner.corpus
    read_from = file_digest(config.train_dataset) if me == 0 else ""  # the bytes the windows are cut from (kept)
    corpus.locate()
    scorer = runner.load_scorer()
    digests = distributed.gather(corpus.digest)
    if len(set(digests)) > 1:
        raise RunError("the ranks read other windows from the corpus: every rank must read the same files with the "
                       "same tokenizer", option="train_dataset")
    sketches = module_sketches(scorer, sketch_of(config))
    manifest = _manifest(config, runner, sketches)
    lengths = corpus.lengths()
    failure = None
    if me == 0:
        try:
            store = _open(config, manifest, lengths)
            _keep_windows(corpus, store.directory / CORPUS, read_from)
        except InputError as exc:
            failure = exc
    if any(distributed.gather(failure is not None)):  # every rank stops when rank 0 refuses the directory
        if failure is not None:
            raise failure
        raise RunError(f"rank 0 refused {config.output_dir}")
    if me != 0:
        store = IndexStore.open(config.output_dir, "r+")
    if store.manifest.get("complete"):
        logger.info("%s is complete (%d windows): nothing to do", config.output_dir, store.windows)
        return store.manifest
    logger.info("Indexing %d windows (%d tokens) into %s: %d modules, %s sketch, k = %d%s (error per module %s), "
                "rows of %d numbers (%s each, %s in all)%s", store.windows, int(lengths.sum()), config.output_dir,
                len(sketches), config.sketch, config.sketch_dim,
                f", scaling rank {config.scaling_rank}" if config.sketch == "gaussian" else "",
                " / ".join(f"{s.error:.3f}" for s in sketches), store.dim,
                human_bytes(store.dim * np.dtype(store.row_dtype).itemsize),
                human_bytes(store.dim * np.dtype(store.row_dtype).itemsize * store.windows),
                f"; {world} ranks, shard s on rank s mod {world}" if world > 1 else "")
    mine = [s for s in range(store.shards) if s % world == me]
    todo = {s: np.flatnonzero(~store.done(s)) for s in mine}
    started = time.perf_counter()
    collate = Collator(runner.tokenizer.pad_token_id)
    model, device = scorer.model, scorer.device
    with tqdm(total=sum(len(t) for t in todo.values()), desc="index", unit="window", disable=quiet) as bar, \
            frozen_weights(model), LayerRecorder(scorer.linears) as recorder:
        for shard, local in todo.items():
            base = store.shard_range(shard).start
            order = local[np.argsort(lengths[base + local], kind="stable")]  # by length: little padding
            for start in range(0, len(order), config.batch_size):
                chosen = order[start : start + config.batch_size]
                batch = {k: v.to(device) for k, v in collate(corpus.windows(base + chosen)).items()}
                store.record(shard, chosen, sketch_batch(model, recorder, sketches, batch).cpu().numpy())
                bar.update(len(chosen))
    logger.info("Indexed %d windows in %.1f s", sum(len(t) for t in todo.values()), time.perf_counter() - started)
    distributed.gather(None)  # every rank's shards are done
    if me == 0:
        if (done := store.done_count()) != store.windows:
            raise RunError(f"{done} of {store.windows} windows indexed: rerun to finish")
        store.mark_complete()
    return store.manifest

"""Which weights factors were fitted for: a fingerprint of a model's config and weight files.

fit-hessians records it in ``metadata.json`` (``fit.weights_fingerprint``, compared on rerun) and
run-query refuses factors whose fingerprint differs from the model it is given
(:func:`if_query.run.compatibility.check_fingerprint`), so re-saving other weights into a model folder never
silently reuses old factors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from if_query.data.tokenization import TokenizedExample
from if_query.errors import InputError
from if_query.model.adapter import find_adapter

FULL_HASH_LIMIT = 256 * 1024**2  # larger files are sampled
SAMPLE_CHUNKS = 32
SAMPLE_CHUNK_BYTES = 1024**2


def _sha256_file(path: Path) -> str:
    """sha256 of the whole file up to FULL_HASH_LIMIT bytes; above it, of the size and SAMPLE_CHUNKS
    chunks of SAMPLE_CHUNK_BYTES at fixed, evenly spaced offsets (first and last bytes included)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: file.read(16 * 1024**2), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(f"sampled:{size}:".encode())
        last = size - SAMPLE_CHUNK_BYTES
        for i in range(SAMPLE_CHUNKS):
            file.seek(i * last // (SAMPLE_CHUNKS - 1))
            digest.update(file.read(SAMPLE_CHUNK_BYTES))
    return "sampled-" + digest.hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    """The files transformers loads weights from: ``*.safetensors`` when there are any (it prefers
    them), else ``*.bin``; top level only (``checkpoint-*/`` subfolders are not the model)."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in directory.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def _digest(config: str, weights: dict[str, str]) -> str:
    text = json.dumps({"config": config, "weights": weights}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _local_fingerprint(directory: Path) -> dict:
    config = directory / "config.json"
    if not config.is_file():
        raise InputError(f"{directory}: no config.json; not a model directory")
    weights = {p.name: _sha256_file(p) for p in _weight_files(directory)}
    config_hash = _sha256_file(config)
    return {"digest": _digest(config_hash, weights), "source": "local", "config": config_hash, "weights": weights}


def _blob_hash(path: Path) -> str:
    """A hub cache names blobs by their content hash (sha256 for LFS files, the git blob sha1 for
    others) and snapshot files are links to them; without links (e.g. Windows), hash the file."""
    if path.is_symlink():
        return Path(os.readlink(path)).name
    return _sha256_file(path)


def _hub_fingerprint(model: str, revision: str | None, cache_dir: str | Path | None) -> dict | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(model, "config.json", cache_dir=cache_dir, revision=revision)
    except ValueError:  # not a valid repo id (e.g. a missing local path): loading the model will say so
        return None
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    index = next((snapshot / name for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (snapshot / name).is_file()), None)
    if index is not None:  # sharded: every shard named by the index must be downloaded
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        files = [snapshot / shard for shard in shards]
        if not all(f.exists() for f in files):
            return None
    else:
        files = _weight_files(snapshot)
        if not files:
            return None
    weights = {f.name: _blob_hash(f) for f in files}
    config_hash = _blob_hash(Path(config))
    return {"digest": _digest(config_hash, weights), "source": "hub", "commit": snapshot.name,
            "config": config_hash, "weights": weights}


def weights_fingerprint(model: str, revision: str | None = None, cache_dir: str | Path | None = None,
                        base_model: str | None = None) -> dict | None:
    """A fingerprint of the weights ``AutoModelForCausalLM.from_pretrained(model, revision)`` loads.

    ``digest`` (16 hex digits) is what is compared; the other entries say where it came from.

    - A local directory: sha256 of ``config.json`` and of each top-level weight file
      (``*.safetensors``, else ``*.bin``). Files above 256 MB are not read whole: their hash covers
      the file size and 32 chunks of 1 MB at fixed, evenly spaced offsets (about 32 MB read per
      shard), which any retraining or re-save in another dtype changes, but an edit confined to
      unsampled bytes would not.
    - A hub model: read offline from the local HuggingFace cache (``cache_dir``, default the hub
      cache): the snapshot ``revision`` resolves to (``commit``) and the content hashes under which
      the cache stores ``config.json`` and the weight files (sha256 for LFS files). The digest covers
      those hashes, not the commit, so a commit that changes only other files keeps the factors.
      None when the weights are not in the cache yet (call again after loading the model).
    - A LoRA/PEFT adapter folder (:mod:`if_query.model.adapter`): its base model's fingerprint and the sha256 of the
      adapter's configuration and weights, together: factors fitted for one adapter are refused for another.
    """
    if (adapter := find_adapter(model, base_model)) is not None:
        base = weights_fingerprint(adapter.base, revision, cache_dir)
        if base is None:
            return None
        files = {p.name: _sha256_file(p) for p in adapter.files}
        return {"digest": _digest(base["digest"], files), "source": "adapter", "base": base, "adapter": files}
    path = Path(model)
    if path.is_dir():
        return _local_fingerprint(path)
    return _hub_fingerprint(model, revision, cache_dir)


def dataset_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A hash of tokenized fitting examples (their token ids and labels, in order): recorded by fit-hessians,
    compared by run-query --refine-steps before it reads the factors' fitting data again."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()[:16]

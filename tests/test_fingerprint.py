"""Factors are tied to the weights they were fitted for: other weights saved into the same model
folder are refused by fit-hessians (unless --overwrite, which always refits) and by run-query."""

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from helpers import TRAIN, assert_one_line_error, factors, save_tiny_model, tree, write_json

from if_query.errors import InputError
from if_query.fit.metadata import METADATA_FILE, canonical_model
from if_query.model import fingerprint as fp
from if_query.run.compatibility import check_fingerprint


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_model(tmp_path / "model", "gpt2", seed=0)


@pytest.fixture
def data(tmp_path):
    return write_json(tmp_path / "hessian.json", TRAIN)


def fit_args(model, data, out, *extra):
    return ["fit-hessians", "--model", model, "--hessian-dataset", data, "--output-dir", out, "--strategy", "ekfac",
            "--fisher", "empirical", "--factor-batch-size", 2, "--lambda-batch-size", 3, "--quiet", *extra]


def query_args(model, factors_dir, query_files, out):
    return ["run-query", "--model", model, "--factors-dir", factors_dir, "--train-json", query_files["train"],
            "--query-json", query_files["query"], "--output-dir", out]


def same_factors(a, b):
    return set(a) == set(b) and all(
        set(a[name]) == set(b[name]) and all(torch.equal(a[name][k], b[name][k]) for k in a[name]) for name in a
    )


def recorded(out):
    return json.loads((out / METADATA_FILE).read_text())


def test_fingerprint_of_a_local_folder_hashes_config_and_weights(model_dir):
    found = fp.weights_fingerprint(str(model_dir))
    assert found["source"] == "local"
    assert found["config"] == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    assert found["weights"] == {"model.safetensors": hashlib.sha256((model_dir / "model.safetensors").read_bytes())
                                .hexdigest()}
    assert re.fullmatch(r"[0-9a-f]{16}", found["digest"])
    save_tiny_model(model_dir, "gpt2", seed=0)  # the same weights saved again: the same fingerprint
    assert fp.weights_fingerprint(str(model_dir)) == found
    save_tiny_model(model_dir, "gpt2", seed=1)
    assert fp.weights_fingerprint(str(model_dir))["digest"] != found["digest"]


def test_large_files_are_sampled_at_fixed_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "FULL_HASH_LIMIT", 1000)
    monkeypatch.setattr(fp, "SAMPLE_CHUNKS", 4)
    monkeypatch.setattr(fp, "SAMPLE_CHUNK_BYTES", 10)
    path = tmp_path / "w.bin"
    content = bytearray(os.urandom(3000))
    path.write_bytes(content)
    sampled = fp._sha256_file(path)
    # chunks at 0, 996, 1993, 2990 (evenly spaced, last one ending at the end of the file)
    expected = hashlib.sha256(b"sampled:3000:" + b"".join(content[o:o + 10] for o in (0, 996, 1993, 2990)))
    assert sampled == "sampled-" + expected.hexdigest()
    content[1995] ^= 1  # inside a chunk: noticed
    path.write_bytes(content)
    assert fp._sha256_file(path) != sampled
    content[1995] ^= 1
    content[500] ^= 1  # between chunks: not noticed (documented)
    path.write_bytes(content)
    assert fp._sha256_file(path) == sampled
    path.write_bytes(content[:1000])  # at the limit: the whole file
    assert fp._sha256_file(path) == hashlib.sha256(content[:1000]).hexdigest()


def test_other_weights_are_refused_and_overwrite_refits(cli, model_dir, data, query_files, tmp_path):
    out = tmp_path / "f"
    cli(*fit_args(model_dir, data, out))
    old_factors, old_digest = factors(out), recorded(out)["fit"]["weights_fingerprint"]
    assert recorded(out)["weights"]["weights"]["model.safetensors"] == hashlib.sha256(
        (model_dir / "model.safetensors").read_bytes()).hexdigest()

    save_tiny_model(model_dir, "gpt2", seed=1)  # other weights, same folder
    new_digest = fp.weights_fingerprint(str(model_dir))["digest"]
    assert new_digest != old_digest
    before = tree(out)
    result = cli(*fit_args(model_dir, data, out), expect=None)
    assert_one_line_error(result, 2, "weights_fingerprint", old_digest, new_digest, "--overwrite")
    assert tree(out) == before

    result = cli(*query_args(model_dir, out, query_files, tmp_path / "out"), expect=None)
    assert_one_line_error(result, 2, str(out), "other weights", old_digest, new_digest)
    assert not (tmp_path / "out").exists()

    cli(*fit_args(model_dir, data, out, "--overwrite"))
    assert recorded(out)["fit"]["weights_fingerprint"] == new_digest
    new_factors = factors(out)
    assert set(new_factors) == set(old_factors) and not same_factors(new_factors, old_factors)
    cli(*query_args(model_dir, out, query_files, tmp_path / "out"), "--quiet")
    assert (tmp_path / "out" / "influences.csv").exists()


def test_overwrite_refits_even_with_identical_arguments(cli, model_dir, data, tmp_path):
    out = tmp_path / "f"
    cli(*fit_args(model_dir, data, out))
    original = factors(out)
    name = "activation_covariance.safetensors"
    from safetensors.torch import save_file

    save_file({k: torch.zeros_like(v) for k, v in original[name].items()}, out / "factors_hessian" / name)
    cli(*fit_args(model_dir, data, out))  # identical arguments: the factors are reused as they are
    assert all(not v.any() for v in factors(out)[name].values())
    cli(*fit_args(model_dir, data, out, "--overwrite"))  # refitted from scratch
    assert same_factors(factors(out), original)


def test_same_weights_resave_still_resumes(cli, model_dir, data, tmp_path, monkeypatch):
    from kronfluence.analyzer import Analyzer

    cli(*fit_args(model_dir, data, tmp_path / "whole"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Analyzer, "perform_eigendecomposition", interrupt)
        assert cli(*fit_args(model_dir, data, tmp_path / "resumed"), expect=None).exit_code == 130
    covariance = tmp_path / "resumed" / "factors_hessian" / "activation_covariance.safetensors"
    stamp = covariance.stat().st_mtime_ns
    save_tiny_model(model_dir, "gpt2", seed=0)  # the same weights written again (new files, same bytes)
    cli(*fit_args(model_dir, data, tmp_path / "resumed"))
    assert covariance.stat().st_mtime_ns == stamp  # resumed after the covariance stage, not refitted
    assert same_factors(factors(tmp_path / "resumed"), factors(tmp_path / "whole"))


def test_factors_without_a_fingerprint_warn_but_score(cli, model_dir, data, query_files, tmp_path):
    out = tmp_path / "f"
    cli(*fit_args(model_dir, data, out))
    metadata = recorded(out)
    del metadata["fit"]["weights_fingerprint"]  # as written by an older if-query
    (out / METADATA_FILE).write_text(json.dumps(metadata))
    result = cli(*query_args(model_dir, out, query_files, tmp_path / "out"))
    assert "no weights fingerprint" in result.stderr
    assert (tmp_path / "out" / "influences.csv").exists()


def test_demo_cache_refits_after_the_model_changes(model_dir, data, tmp_path):
    from if_query.config import FitConfig
    from if_query.fit.fit_hessians import fit_hessians

    def demo_fit():
        return fit_hessians(FitConfig(model=str(model_dir), hessian_dataset=str(data), output_dir=str(tmp_path / "c"),
                                      fisher="empirical", refit_if_changed=True), quiet=True)

    first = demo_fit()
    first_factors = factors(tmp_path / "c")
    save_tiny_model(model_dir, "gpt2", seed=1)
    second = demo_fit()
    assert second["fit"]["weights_fingerprint"] != first["fit"]["weights_fingerprint"]
    assert not same_factors(factors(tmp_path / "c"), first_factors)


# A hub model: the fingerprint is read offline from the HuggingFace cache, built here by hand with the
# layout huggingface_hub uses (models--org--name/{refs,snapshots/<commit>,blobs/<content hash>}).

def add_commit(cache, repo, commit, files, ref="main"):
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    hashes = {}
    for name, content in files.items():
        blob = hashlib.sha256(content).hexdigest()
        (root / "blobs" / blob).write_bytes(content)
        (snapshot / name).symlink_to(f"../../blobs/{blob}")
        hashes[name] = blob
    return hashes


def test_hub_fingerprint_from_a_fake_cache(tmp_path):
    cache, repo = tmp_path / "hub", "org/tiny"
    assert fp.weights_fingerprint(repo, cache_dir=cache) is None  # nothing cached
    first = add_commit(cache, repo, "a" * 40, {"config.json": b"{}", "model.safetensors": b"weights-1",
                                               "README.md": b"v1"})
    found = fp.weights_fingerprint(repo, cache_dir=cache)
    assert found["source"] == "hub" and found["commit"] == "a" * 40
    assert found["config"] == first["config.json"]
    assert found["weights"] == {"model.safetensors": hashlib.sha256(b"weights-1").hexdigest()}
    assert fp.weights_fingerprint(repo, "a" * 40, cache_dir=cache) == found  # a commit as the revision

    add_commit(cache, repo, "b" * 40, {"config.json": b"{}", "model.safetensors": b"weights-1",
                                       "README.md": b"v2"})  # only the README changed: same digest
    assert fp.weights_fingerprint(repo, cache_dir=cache)["digest"] == found["digest"]
    add_commit(cache, repo, "c" * 40, {"config.json": b"{}", "model.safetensors": b"weights-2"})
    changed = fp.weights_fingerprint(repo, cache_dir=cache)
    assert changed["commit"] == "c" * 40 and changed["digest"] != found["digest"]

    # Sharded weights count only once every shard named by the index is cached.
    index = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}).encode()
    add_commit(cache, repo, "d" * 40, {"config.json": b"{}", "model.safetensors.index.json": index,
                                       "model-1.safetensors": b"shard-1"})
    assert fp.weights_fingerprint(repo, cache_dir=cache) is None

    metadata = {"fit": {"model": repo, "revision": None, "weights_fingerprint": changed["digest"]}}
    assert check_fingerprint(metadata, repo, None, "F", cache_dir=cache) is False  # cannot decide yet
    assert check_fingerprint(metadata, repo, None, "F", cache_dir=cache, loaded=True) is True  # warns
    (cache / "models--org--tiny" / "refs" / "main").write_text("c" * 40)
    assert check_fingerprint(metadata, repo, None, "F", cache_dir=cache) is True
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    with pytest.raises(InputError, match=f"fingerprint {changed['digest']} in the factors, {found['digest']} now"):
        check_fingerprint(metadata, repo, None, "F", cache_dir=cache)


def test_another_path_is_judged_by_its_weights(model_dir, tmp_path):
    other = shutil.copytree(model_dir, tmp_path / "other")
    digest = fp.weights_fingerprint(str(model_dir))["digest"]
    metadata = {"fit": {"model": canonical_model(str(model_dir)), "revision": None, "weights_fingerprint": digest}}
    assert check_fingerprint(metadata, str(other)) is True  # the same weights in another folder
    with pytest.raises(InputError, match=f"does not fit this model .weights fingerprint 0000000000000000 in the "
                                         f"factors, {digest} now.: the factors were fitted for the model"):
        check_fingerprint({"fit": dict(metadata["fit"], weights_fingerprint="0" * 16)}, str(other))
    with pytest.raises(InputError, match="0000000000000000 in the factors"):
        check_fingerprint({"fit": dict(metadata["fit"], weights_fingerprint="0" * 16)}, str(model_dir))
    unrecorded = {"fit": {"model": canonical_model(str(model_dir)), "revision": None}}
    with pytest.raises(InputError, match="were fitted for the model"):  # no fingerprint: the name decides
        check_fingerprint(unrecorded, str(other))


def test_a_copied_model_folder_keeps_its_factors(cli, model_dir, data, query_files, tmp_path):
    """Factors belong to weights, not to a path: the same model copied to another folder scores with them
    (and resumes its fit), the log saying so."""
    out = tmp_path / "f"
    cli(*fit_args(model_dir, data, out))
    stamp = (out / "factors_hessian" / "lambda_matrix.safetensors").stat().st_mtime_ns
    copy = shutil.copytree(model_dir, tmp_path / "moved" / "model")
    result = cli(*query_args(copy, out, query_files, tmp_path / "out"))
    assert "has the same weights" in result.stderr and str(copy) in result.stderr
    assert (tmp_path / "out" / "influences.csv").exists()
    cli(*fit_args(copy, data, out))  # the same arguments and weights: resumed (nothing to do), not refused
    assert (out / "factors_hessian" / "lambda_matrix.safetensors").stat().st_mtime_ns == stamp

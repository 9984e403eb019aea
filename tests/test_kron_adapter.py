"""if_query.kron reads Kronfluence's factor files with Kronfluence's own conventions (fails if those change)."""

import pytest
import torch
from kronfluence.arguments import ScoreArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.utils.constants import LAMBDA_MATRIX_NAME
from safetensors.torch import load_file

from if_query.kron.factors import HessianFactors, factors_path

NAMES = ("activation_eigenvectors", "gradient_eigenvectors", "activation_eigenvalues", "gradient_eigenvalues",
         "lambda_matrix", "num_lambda_processed")


def kronfluence_storage(directory, module: str) -> dict:
    storage = {}
    for name in NAMES:
        path = factors_path(directory) / f"{name}.safetensors"
        storage[name] = load_file(path)[module].clone() if path.exists() else None
    return storage


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("damping", [None, 1e-3], ids=["auto", "fixed"])
def test_scale_is_kronfluence_inverse_curvature(fitted, strategy, damping):
    """S² equals the inverse damped curvature that Kronfluence's own FactorConfig.prepare computes
    (lambda normalisation by the example count, the 0.1 x mean heuristic, K-FAC's eigenvalue products)."""
    reader = HessianFactors(fitted[strategy])
    module = "transformer.h.1.mlp.c_fc"
    storage = kronfluence_storage(fitted[strategy], module)
    if strategy == "kfac":  # if-query clamps K-FAC eigenvalues at 0; compare on clamped ones
        for name in ("activation_eigenvalues", "gradient_eigenvalues"):
            storage[name] = storage[name].clamp_min(0)
    FactorConfig.CONFIGS[strategy].prepare(storage, ScoreArguments(damping_factor=damping), torch.device("cpu"))
    expected = storage[LAMBDA_MATRIX_NAME].squeeze(0)
    pre = reader.preconditioner(module, damping, torch.device("cpu"))
    torch.testing.assert_close(pre.scale.square(), expected, rtol=1e-5, atol=0)
    if strategy == "diagonal":
        assert pre.q_a is None and pre.q_g is None
    else:
        torch.testing.assert_close(pre.q_a, storage["activation_eigenvectors"].float())


def test_identity_has_no_preconditioner(fitted):
    pre = HessianFactors(fitted["identity"]).preconditioner("transformer.h.0.mlp.c_fc", None, torch.device("cpu"))
    assert pre.scale is None and pre.q_a is None and pre.damping is None


def test_kron_is_the_only_module_that_imports_kronfluence():
    import ast
    from pathlib import Path

    import if_query

    importers = set()
    for path in Path(if_query.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "kronfluence" for name in names):
                importers.add(path.relative_to(path.parents[1]).as_posix())
    assert importers and all(name.startswith("kron/") for name in importers), importers


def test_the_private_kronfluence_methods_kron_calls_still_take_what_it_passes(monkeypatch):
    from kronfluence.analyzer import Analyzer

    from if_query.kron import private

    assert private.private_api_changes() == []
    monkeypatch.setattr(Analyzer, "_get_dataloader", lambda self, dataset, batch_size: None)  # a changed signature
    assert private.private_api_changes() == ["_get_dataloader"]


def test_if_query_strategies_are_kronfluences():
    from if_query.config import STRATEGIES

    assert set(STRATEGIES) == set(FactorConfig.CONFIGS)


def test_the_written_out_names_are_kronfluences():
    """kron/constants.py spells Kronfluence's names so that reading factors imports no Kronfluence."""
    from kronfluence.utils import constants as theirs

    from if_query.kron import constants as ours

    names = [name for name in dir(ours) if name.isupper()]
    assert names and all(getattr(ours, name) == getattr(theirs, name) for name in names)

"""The one package that imports Kronfluence, split by who uses it, and the conventions if-query's own scoring
relies on (below).

- :mod:`~if_query.kron.factors`: the factor files, read one module at a time (:class:`~.factors.HessianFactors`,
  :class:`~.factors.Preconditioner`), for the engine, the refinement and the lambda stage;
- :mod:`~if_query.kron.lambda_files`: what the lambda stage (:mod:`if_query.fit.lambda_stage`) needs to write
  Kronfluence's lambda files;
- :mod:`~if_query.kron.fit`: Kronfluence's extension point (the task), the prepared model, the analyzer and the
  covariance and eigendecomposition stages, for fit-hessians;
- :mod:`~if_query.kron.streaming`: Kronfluence's own pairwise and self-influence scorers, the ``--engine
  kronfluence`` cross-check;
- :mod:`~if_query.kron.private`: the private Kronfluence methods called (three places, each marked ``# private:``
  with its reason); ``tests/test_kron_adapter.py`` fails if their signatures change.

Kronfluence 1.0.1 (pinned) fits the covariances and their eigendecomposition; if-query fits lambda itself into
Kronfluence's files. The files are read, and lambda's written, here and nowhere else. Every function takes plain
arguments: nothing here knows if-query's options.

The conventions, each checked against Kronfluence's source (``factor/config.py``,
``module/linear.py``, ``module/tracker/factor.py``) and by tests that compare scores:

- **Per-example gradient** of a tracked ``nn.Linear``: ``sum_t g_t a_t^T``, shape (out, in'), where
  ``a_t`` is the layer input at position t with a 1 appended when the layer has a bias
  (in' = in + 1, the *bias column*) and ``g_t`` the gradient of the summed loss w.r.t. the layer
  output at t.
- **Files**: ``<factors-dir>/factors_hessian/<factor>.safetensors``, each a {module name: tensor}
  map: ``activation_eigenvectors`` Q_a (in', in'), ``gradient_eigenvectors`` Q_g (out, out), their
  ``*_eigenvalues``, ``lambda_matrix`` (out, in') and ``num_lambda_processed`` (1,). Strategy and
  dtypes are in ``factor_arguments.json``.
- **Curvature in the eigenbasis** (the diagonal of the preconditioned Hessian approximation):
  EK-FAC and diagonal: ``lambda_matrix / num_lambda_processed`` (the lambda matrix is a *sum* over
  examples of squared rotated, resp. plain, per-example gradients); K-FAC:
  ``outer(gradient_eigenvalues, activation_eigenvalues)``; identity: none.
- **K-FAC eigenvalues are clamped at 0.** The eigenvalues of a covariance are >= 0 in exact
  arithmetic but can come out slightly negative; Kronfluence uses them as they are, which makes the
  preconditioner indefinite (and a tiny damping can turn a score's sign). if-query clamps them for
  both of its scorers (:func:`clamp_kfac_eigenvalues` on Kronfluence's loaded factors), so the same
  factors give the same scores whichever scorer runs.
- **Damping**: a number, or ``auto`` = ``HEURISTIC_DAMPING_SCALE`` (0.1) x the mean curvature of
  each module (Kronfluence's heuristic).
- **Preconditioned score**: ``score(q, t) = sum_ij C_ij^-1 R_q,ij R_t,ij`` with ``R = Q_g^T grad Q_a``
  (``grad`` itself without eigenvectors) and ``C = curvature + damping``.

**The lambda stage's files** (if-query computes lambda itself, :mod:`if_query.fit.lambda_stage`, and writes
what Kronfluence's ``fit_lambda_matrices`` would, so ``load_all_factors`` and scoring read them unchanged):

- ``lambda_matrix.safetensors`` {module: (out, in') float32} and ``num_lambda_processed.safetensors``
  {module: (1,) int64, the number of examples}, with Kronfluence's ``FactorArguments.to_str_dict()`` as
  safetensors metadata. With module partitions, Kronfluence first writes
  ``<name>_data_partition0_module_partition<j>.safetensors`` per group of modules (its own
  ``make_modules_partition`` of its tracked-module order; same metadata), then the union of the groups
  as ``<name>.safetensors`` *without* metadata (its ``aggregate_lambda_matrices``); both are kept.
- ``lambda_dataset_metadata.json`` and the check of ``factor_arguments.json`` are written by Kronfluence's
  own methods (:func:`prepare_lambda_stage`).
- **Done** = both unpartitioned files exist (Kronfluence's ``lambda_matrices_exist``); a finished group
  = its two partition files exist. Every file is written beside its name and renamed into place, so an
  interrupted stage leaves only whole files and reruns what is missing (Kronfluence writes in place).
- safetensors stores metadata in hash order, so two runs' files hold the same tensors and metadata but
  need not be byte-identical (true of Kronfluence's own files too).
"""

import warnings

# Kronfluence 1.0.1 uses torch.cuda.amp.GradScaler, deprecated in recent torch: not the user's concern.
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)

"""Kronfluence's names for its factor files and factors, and its damping heuristic's scale, written out here so that
reading factors (every run-query run) imports no Kronfluence; ``tests/test_kron_adapter.py`` checks each against
``kronfluence.utils.constants``."""

ACTIVATION_EIGENVALUES_NAME = "activation_eigenvalues"
ACTIVATION_EIGENVECTORS_NAME = "activation_eigenvectors"
FACTOR_ARGUMENTS_NAME = "factor"
FACTOR_SAVE_PREFIX = "factors_"
GRADIENT_EIGENVALUES_NAME = "gradient_eigenvalues"
GRADIENT_EIGENVECTORS_NAME = "gradient_eigenvectors"
HEURISTIC_DAMPING_SCALE = 0.1
LAMBDA_MATRIX_NAME = "lambda_matrix"
NUM_LAMBDA_PROCESSED = "num_lambda_processed"

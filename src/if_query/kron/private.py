"""The private Kronfluence methods if-query calls, and the parameters it passes to them: a Kronfluence upgrade
that changes them is caught by ``tests/test_kron_adapter.py``, not by a user's run."""

from __future__ import annotations

import inspect

from kronfluence.analyzer import Analyzer

PRIVATE_API = {  # called in kron/lambda_files.py and kron/streaming.py, and the parameters passed to them
    "_get_dataloader": ("dataset", "per_device_batch_size", "dataloader_params", "allow_duplicates", "stack"),
    "_configure_and_save_factor_args": ("factor_args", "factors_output_dir", "overwrite_output_dir"),
    "_save_dataset_metadata": ("dataset_name", "dataset", "output_dir", "overwrite_output_dir"),
}


def private_api_changes() -> list[str]:
    """The private Kronfluence methods whose parameters no longer include what this module passes."""
    changed = []
    for method, passed in PRIVATE_API.items():
        function = getattr(Analyzer, method, None)
        parameters = inspect.signature(function).parameters if function is not None else {}
        if function is None or any(name not in parameters for name in passed):
            changed.append(method)
    return changed

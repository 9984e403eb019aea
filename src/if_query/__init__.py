"""if-query: which training examples made the model say this? Influence-function scores for HuggingFace causal LMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("if-query")
except PackageNotFoundError:  # run from src/ without being installed (the GPU machine)
    __version__ = "unknown"

"""gemmakit: the hackable PyTorch home of Gemma 3 and Gemma 4."""

__version__ = "0.1.0"

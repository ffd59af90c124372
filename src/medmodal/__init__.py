"""medmodal: learning from imperfect multi-modal medical images (missing modalities, few or noisy labels)."""

__version__ = "0.1.0"

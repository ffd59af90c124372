"""Transforms: random samplers paired with deterministic functions."""

from medmodal.transforms.modality_dropout import drop_modalities, sample_modality_subsets
from medmodal.transforms.regions import drop_small_region, labels_to_regions, regions_to_labels

__all__ = ["drop_modalities", "drop_small_region", "labels_to_regions", "regions_to_labels", "sample_modality_subsets"]

"""Probe datasets: the photos shipped inside scikit-image / scikit-learn, and folders named with --dataset."""

from convlens.server.datasets.dataset import Dataset, DirectoryDataset, SamplesDataset
from convlens.server.datasets.registry import DatasetRegistry, parse_dataset_spec

__all__ = ["Dataset", "DatasetRegistry", "DirectoryDataset", "SamplesDataset", "parse_dataset_spec"]

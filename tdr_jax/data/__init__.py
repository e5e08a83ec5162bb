"""Dataset layer: raw-file loaders, preprocessing and the dataset cache.

    from tdr_jax.data import load_dataset
    ds = load_dataset("movielens", "/data/ml-10M100K")          # cached after the first call
    hist, target = ds.train_batch(np.arange(256), history_len=69)
    test = ds.eval_split("test", history_len=69)
"""

from tdr_jax.data._read import DataFormatError, LoadReport
from tdr_jax.data.datasets import DATASETS, DatasetSpec, load_dataset
from tdr_jax.data.loaders import LOADERS, load_interactions
from tdr_jax.data.preprocess import (
    Dataset,
    EvalSet,
    eval_split,
    gather_histories,
    preprocess,
    train_batch,
)

__all__ = [
    "DATASETS",
    "DataFormatError",
    "Dataset",
    "DatasetSpec",
    "EvalSet",
    "LOADERS",
    "LoadReport",
    "eval_split",
    "gather_histories",
    "load_dataset",
    "load_interactions",
    "preprocess",
    "train_batch",
]

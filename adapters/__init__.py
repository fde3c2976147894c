"""fire-defense adapters: BackdoorBench records, datasets on disk, and a model zoo, for the FIRE core.

Installed under the import name ``fire_adapters`` (the repository folder is
``adapters/``; a top-level ``adapters`` would shadow the PyPI package of that name).
It depends on ``fire_defense``; the core never imports it.
"""

from fire_adapters.datasets import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSpec,
    find_dataset,
    get_dataset_spec,
    list_datasets,
    load_dataset,
)
from fire_adapters.images import ImageSet
from fire_adapters.models import MODELS, create_model, list_models, load_model_state
from fire_adapters.preprocess import InputNormalization, model_input_channels, to_tensor, with_normalization
from fire_adapters.records import RECORD_FILE, Record, RecordError, load_record, save_record
from fire_adapters.safe_load import UnsafeFileError, safe_torch_load, safe_unpickle

__all__ = [
    "DATASETS",
    "MODELS",
    "RECORD_FILE",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageSet",
    "InputNormalization",
    "Record",
    "RecordError",
    "UnsafeFileError",
    "create_model",
    "find_dataset",
    "get_dataset_spec",
    "list_datasets",
    "list_models",
    "load_dataset",
    "load_model_state",
    "load_record",
    "model_input_channels",
    "safe_torch_load",
    "safe_unpickle",
    "save_record",
    "to_tensor",
    "with_normalization",
]

"""Training and evaluation on guanaco-format data: data pipeline, pretraining, DynamicLoRA SFT, evaluation."""

from .data import (
    DataFileError,
    DataSourceError,
    MalformedRowError,
    build_datasets,
    pack_documents,
    parse_guanaco,
    tokenize_messages,
)

__all__ = [
    "DataFileError",
    "DataSourceError",
    "MalformedRowError",
    "build_datasets",
    "pack_documents",
    "parse_guanaco",
    "tokenize_messages",
]

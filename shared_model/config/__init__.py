"""The configuration schemas both roles use, each defined once (pydantic): the strict schema base
(`base`), what a consortium's patients bring (`inputs`) and the preprocessing, training and patient-level DP
schemas (`schemas`). The model's architecture is `shared_model.model.configuration.ModelConfig`."""

from shared_model.config.base import (
    ConfigError,
    Float,
    Int,
    Schema,
    SchemaT,
    format_validation_error,
    parse_json,
)
from shared_model.config.inputs import ClinicalVariable, InputsConfig
from shared_model.config.schemas import (
    FRAME_NAMES,
    PREPROCESSING_VERSION,
    SEGMENTER_VERSION,
    PatientDPConfig,
    PreprocessConfig,
    TextEncoderConfig,
    TrainConfig,
    parse_frame,
)

__all__ = [
    "FRAME_NAMES",
    "PREPROCESSING_VERSION",
    "SEGMENTER_VERSION",
    "ClinicalVariable",
    "ConfigError",
    "Float",
    "InputsConfig",
    "Int",
    "PatientDPConfig",
    "PreprocessConfig",
    "Schema",
    "SchemaT",
    "TextEncoderConfig",
    "TrainConfig",
    "format_validation_error",
    "parse_frame",
    "parse_json",
]

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_FORMAT_UNSPECIFIED: _ClassVar[TensorFormat]
    TENSOR_FORMAT_RAW: _ClassVar[TensorFormat]
    TENSOR_FORMAT_SAFETENSORS: _ClassVar[TensorFormat]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class BatchingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCHING_MODE_UNSPECIFIED: _ClassVar[BatchingMode]
    BATCHING_MODE_DYNAMIC: _ClassVar[BatchingMode]
    BATCHING_MODE_REPRODUCIBLE: _ClassVar[BatchingMode]
TENSOR_FORMAT_UNSPECIFIED: TensorFormat
TENSOR_FORMAT_RAW: TensorFormat
TENSOR_FORMAT_SAFETENSORS: TensorFormat
DTYPE_UNSPECIFIED: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
BATCHING_MODE_UNSPECIFIED: BatchingMode
BATCHING_MODE_DYNAMIC: BatchingMode
BATCHING_MODE_REPRODUCIBLE: BatchingMode

class ModelFingerprint(_message.Message):
    __slots__ = ("family", "weights_id", "revision", "hidden_layers", "max_length", "dtype", "digest", "precision", "upsampling")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLING_FIELD_NUMBER: _ClassVar[int]
    family: str
    weights_id: str
    revision: str
    hidden_layers: _containers.RepeatedScalarFieldContainer[int]
    max_length: int
    dtype: DType
    digest: str
    precision: str
    upsampling: bool
    def __init__(self, family: _Optional[str] = ..., weights_id: _Optional[str] = ..., revision: _Optional[str] = ..., hidden_layers: _Optional[_Iterable[int]] = ..., max_length: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., digest: _Optional[str] = ..., precision: _Optional[str] = ..., upsampling: _Optional[bool] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "format", "expected_fingerprint", "request_id", "bypass_cache", "model", "upsample")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BYPASS_CACHE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLE_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    format: TensorFormat
    expected_fingerprint: str
    request_id: str
    bypass_cache: bool
    model: str
    upsample: UpsampleOptions
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., format: _Optional[_Union[TensorFormat, str]] = ..., expected_fingerprint: _Optional[str] = ..., request_id: _Optional[str] = ..., bypass_cache: _Optional[bool] = ..., model: _Optional[str] = ..., upsample: _Optional[_Union[UpsampleOptions, _Mapping]] = ...) -> None: ...

class UpsampleOptions(_message.Message):
    __slots__ = ("temperature", "max_new_tokens", "seed", "images", "images_per_prompt")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    max_new_tokens: int
    seed: int
    images: _containers.RepeatedScalarFieldContainer[bytes]
    images_per_prompt: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, temperature: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., images: _Optional[_Iterable[bytes]] = ..., images_per_prompt: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("format", "dtype", "shape", "byte_length", "sha256", "fingerprint", "cache_hit", "request_id", "batching_mode", "model", "upsampled_prompts", "upsample_seed")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCHING_MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    format: TensorFormat
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    sha256: bytes
    fingerprint: ModelFingerprint
    cache_hit: _containers.RepeatedScalarFieldContainer[bool]
    request_id: str
    batching_mode: BatchingMode
    model: str
    upsampled_prompts: _containers.RepeatedScalarFieldContainer[str]
    upsample_seed: int
    def __init__(self, format: _Optional[_Union[TensorFormat, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ..., sha256: _Optional[bytes] = ..., fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., cache_hit: _Optional[_Iterable[bool]] = ..., request_id: _Optional[str] = ..., batching_mode: _Optional[_Union[BatchingMode, str]] = ..., model: _Optional[str] = ..., upsampled_prompts: _Optional[_Iterable[str]] = ..., upsample_seed: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_prompts_per_request", "max_prompt_chars", "chunk_bytes", "max_queued_requests", "max_inflight_bytes", "max_batch_prompts")
    MAX_PROMPTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    max_prompts_per_request: int
    max_prompt_chars: int
    chunk_bytes: int
    max_queued_requests: int
    max_inflight_bytes: int
    max_batch_prompts: int
    def __init__(self, max_prompts_per_request: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_inflight_bytes: _Optional[int] = ..., max_batch_prompts: _Optional[int] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "fingerprint", "embedding_dim", "limits", "batching_mode", "is_default", "upsampling")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_MODE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLING_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: ModelFingerprint
    embedding_dim: int
    limits: ServerLimits
    batching_mode: BatchingMode
    is_default: bool
    upsampling: UpsampleLimits
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., embedding_dim: _Optional[int] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., batching_mode: _Optional[_Union[BatchingMode, str]] = ..., is_default: _Optional[bool] = ..., upsampling: _Optional[_Union[UpsampleLimits, _Mapping]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("fingerprint", "embedding_dim", "limits", "server_version", "api_version", "batching_mode", "models", "default_model", "upsampling")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCHING_MODE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLING_FIELD_NUMBER: _ClassVar[int]
    fingerprint: ModelFingerprint
    embedding_dim: int
    limits: ServerLimits
    server_version: str
    api_version: str
    batching_mode: BatchingMode
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    default_model: str
    upsampling: UpsampleLimits
    def __init__(self, fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., embedding_dim: _Optional[int] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., api_version: _Optional[str] = ..., batching_mode: _Optional[_Union[BatchingMode, str]] = ..., models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ..., default_model: _Optional[str] = ..., upsampling: _Optional[_Union[UpsampleLimits, _Mapping]] = ...) -> None: ...

class UpsampleLimits(_message.Message):
    __slots__ = ("max_images", "max_image_bytes", "max_image_pixels", "max_temperature", "max_new_tokens", "max_prompts", "images")
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_temperature: float
    max_new_tokens: int
    max_prompts: int
    images: bool
    def __init__(self, max_images: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_temperature: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., max_prompts: _Optional[int] = ..., images: _Optional[bool] = ...) -> None: ...

class UpsampleRequest(_message.Message):
    __slots__ = ("prompts", "images", "temperature", "max_new_tokens", "seed", "request_id", "model", "images_per_prompt")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    temperature: float
    max_new_tokens: int
    seed: int
    request_id: str
    model: str
    images_per_prompt: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[bytes]] = ..., temperature: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., images_per_prompt: _Optional[_Iterable[int]] = ...) -> None: ...

class UpsampleResponse(_message.Message):
    __slots__ = ("prompts", "request_id", "seed", "fingerprint", "new_tokens")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    seed: int
    fingerprint: ModelFingerprint
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., seed: _Optional[int] = ..., fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., new_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

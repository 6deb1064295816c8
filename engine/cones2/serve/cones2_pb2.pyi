from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_LATENTS: _ClassVar[OutputFormat]

class SamplingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLING_MODE_UNSPECIFIED: _ClassVar[SamplingMode]
    SAMPLING_MODE_PAPER_EXACT: _ClassVar[SamplingMode]
    SAMPLING_MODE_FAST: _ClassVar[SamplingMode]

class LayoutResize(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_RESIZE_UNSPECIFIED: _ClassVar[LayoutResize]
    LAYOUT_RESIZE_ALIGNED_CORNERS: _ClassVar[LayoutResize]
    LAYOUT_RESIZE_CELL_CENTRES: _ClassVar[LayoutResize]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_LATENTS: OutputFormat
SAMPLING_MODE_UNSPECIFIED: SamplingMode
SAMPLING_MODE_PAPER_EXACT: SamplingMode
SAMPLING_MODE_FAST: SamplingMode
LAYOUT_RESIZE_UNSPECIFIED: LayoutResize
LAYOUT_RESIZE_ALIGNED_CORNERS: LayoutResize
LAYOUT_RESIZE_CELL_CENTRES: LayoutResize

class Subject(_message.Message):
    __slots__ = ("name", "residual_id", "residual_safetensors", "positions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    residual_id: str
    residual_safetensors: bytes
    positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., residual_id: _Optional[str] = ..., residual_safetensors: _Optional[bytes] = ..., positions: _Optional[_Iterable[int]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("subject", "x0", "y0", "x1", "y1", "strength")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    subject: str
    x0: float
    y0: float
    x1: float
    y1: float
    strength: float
    def __init__(self, subject: _Optional[str] = ..., x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ..., strength: _Optional[float] = ...) -> None: ...

class ColorEntry(_message.Message):
    __slots__ = ("color", "subject", "strength")
    COLOR_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    color: str
    subject: str
    strength: float
    def __init__(self, color: _Optional[str] = ..., subject: _Optional[str] = ..., strength: _Optional[float] = ...) -> None: ...

class ColorMap(_message.Message):
    __slots__ = ("png", "entries")
    PNG_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    entries: _containers.RepeatedCompositeFieldContainer[ColorEntry]
    def __init__(self, png: _Optional[bytes] = ..., entries: _Optional[_Iterable[_Union[ColorEntry, _Mapping]]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("boxes", "color_map")
    BOXES_FIELD_NUMBER: _ClassVar[int]
    COLOR_MAP_FIELD_NUMBER: _ClassVar[int]
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    color_map: ColorMap
    def __init__(self, boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., color_map: _Optional[_Union[ColorMap, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "subjects", "layout", "seed", "steps", "guidance_steps", "guidance_weight", "cfg_scale", "negative_weight", "width", "height", "output_format", "mode", "preview_every", "layout_resize", "negative_prompt")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_RESIZE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    subjects: _containers.RepeatedCompositeFieldContainer[Subject]
    layout: Layout
    seed: int
    steps: int
    guidance_steps: int
    guidance_weight: float
    cfg_scale: float
    negative_weight: float
    width: int
    height: int
    output_format: OutputFormat
    mode: SamplingMode
    preview_every: int
    layout_resize: LayoutResize
    negative_prompt: str
    def __init__(self, prompt: _Optional[str] = ..., subjects: _Optional[_Iterable[_Union[Subject, _Mapping]]] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_steps: _Optional[int] = ..., guidance_weight: _Optional[float] = ..., cfg_scale: _Optional[float] = ..., negative_weight: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., mode: _Optional[_Union[SamplingMode, str]] = ..., preview_every: _Optional[int] = ..., layout_resize: _Optional[_Union[LayoutResize, str]] = ..., negative_prompt: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("image", "latents", "seed", "timings", "engine_version", "model_id", "backend", "batch_size", "width", "height")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    latents: bytes
    seed: int
    timings: _containers.ScalarMap[str, float]
    engine_version: str
    model_id: str
    backend: str
    batch_size: int
    width: int
    height: int
    def __init__(self, image: _Optional[bytes] = ..., latents: _Optional[bytes] = ..., seed: _Optional[int] = ..., timings: _Optional[_Mapping[str, float]] = ..., engine_version: _Optional[str] = ..., model_id: _Optional[str] = ..., backend: _Optional[str] = ..., batch_size: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "preview_png")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    preview_png: bytes
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., preview_png: _Optional[bytes] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class RegisterResidualRequest(_message.Message):
    __slots__ = ("safetensors",)
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    def __init__(self, safetensors: _Optional[bytes] = ...) -> None: ...

class ResidualInfo(_message.Message):
    __slots__ = ("id", "word", "rows", "dim", "base_model", "size_bytes", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    word: str
    rows: int
    dim: int
    base_model: str
    size_bytes: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., word: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., base_model: _Optional[str] = ..., size_bytes: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterResidualResponse(_message.Message):
    __slots__ = ("residual", "created")
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    residual: ResidualInfo
    created: bool
    def __init__(self, residual: _Optional[_Union[ResidualInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListResidualsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResidualsResponse(_message.Message):
    __slots__ = ("residuals",)
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    residuals: _containers.RepeatedCompositeFieldContainer[ResidualInfo]
    def __init__(self, residuals: _Optional[_Iterable[_Union[ResidualInfo, _Mapping]]] = ...) -> None: ...

class DeleteResidualRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteResidualResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("engine_version", "model_id", "backend", "device", "text_dim", "default_resolution", "max_resolution", "max_steps", "max_subjects", "max_batch", "max_queue", "max_residual_bytes")
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TEXT_DIM_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MAX_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_RESIDUAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    engine_version: str
    model_id: str
    backend: str
    device: str
    text_dim: int
    default_resolution: int
    max_resolution: int
    max_steps: int
    max_subjects: int
    max_batch: int
    max_queue: int
    max_residual_bytes: int
    def __init__(self, engine_version: _Optional[str] = ..., model_id: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., text_dim: _Optional[int] = ..., default_resolution: _Optional[int] = ..., max_resolution: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_subjects: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_residual_bytes: _Optional[int] = ...) -> None: ...

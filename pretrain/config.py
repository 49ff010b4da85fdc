"""The one typed schema for everything (omegaconf structured dataclasses); defaults live here and nowhere else.

Field names of ``ModelConfig`` follow transformers' ``PerceiverConfig`` where the two share a meaning, so converting
between them is a rename, not arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

from omegaconf import MISSING, IntegerNode, OmegaConf, StringNode
from omegaconf.errors import ValidationError

from .shard_format import FIELD_MODALITY, MODALITY_FIELDS
from .vocab import VOCAB_SIZE

# The enumerations: each the type of its fields, and the tuple of its values (in messages, for other modules) read
# from it, so the two cannot drift apart.
AttentionBackend = Literal["auto", "autotune", "flash_attn", "varlen", "sdpa", "sdpa_unpadded", "math"]
CrossAttentionShape = Literal["q", "kv"]
Precision = Literal["auto", "fp32", "bf16", "autocast"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]
WandbMode = Literal["online", "offline", "disabled"]
ZeroStage = Literal[0, 1, 2, 3]
ATTENTION_BACKENDS = typing.get_args(AttentionBackend)
PRECISIONS = typing.get_args(Precision)
COMPILE_MODES = typing.get_args(CompileMode)
WANDB_MODES = typing.get_args(WandbMode)
# The enumerations whose messages list their values otherwise than "must be one of (...)".
_CHOICE_MESSAGES = {CrossAttentionShape: "must be 'q' or 'kv', got {!r}", ZeroStage: "must be 0, 1, 2 or 3, got {}"}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what would fix it."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _require_divides(value: int, by: int, key: str, by_key: str) -> None:
    _require(by > 0, by_key, f"must be a positive integer, got {by}")
    _require(value % by == 0, key, f"{value} is not divisible by {by_key}={by}; pick a multiple of {by}")


def _require_choice(value: Any, kind: Any, key: str) -> None:
    """``value`` is one of the ``Literal`` ``kind``'s: the one check and message of an enumeration, for the sections'
    ``validate`` (a dataclass built in code bypasses omegaconf) and for :func:`load_config`."""
    choices = typing.get_args(kind)
    _require(value in choices, key, _CHOICE_MESSAGES.get(kind, f"must be one of {choices}, got {{!r}}").format(value))


def _require_positive(section: Any, keys: Sequence[str], prefix: str) -> None:
    for key in keys:
        value = getattr(section, key)
        _require(value > 0, f"{prefix}.{key}", f"must be a positive integer, got {value}")


class ModalityConfig:
    """What a modality's section of ``ModelConfig`` is: the fields holding one are the model's input modalities (their
    units are in ``pretrain.modalities``)."""


@dataclass
class TextConfig(ModalityConfig):
    """UTF-8 bytes in the paper's 262-id vocabulary (``pretrain.vocab``), or token ids of another vocabulary."""

    vocab_size: int = 262
    max_length: int = 2048

    def validate(self, prefix: str) -> None:
        """Fail early, naming the key (``prefix`` is where this section sits), for sizes no embedding can have."""
        _require(self.vocab_size > 0, f"{prefix}.vocab_size", "must be positive")
        _require(self.max_length > 0, f"{prefix}.max_length", "must be positive")


class PatchGrid(ModalityConfig):
    """What a patch modality's config says about its patches: the raw array's sizes along the axes it is cut on
    (``patch_sizes``), one patch's extent along them (``patch_block``), its channels, and the grid of patches. The
    model's adapters and the data stream both read them here."""

    patch_sizes: List[int]
    patch_block: List[int]
    patch_channels: int

    @property
    def grid(self) -> List[int]:
        return [n // b for n, b in zip(self.patch_sizes, self.patch_block)]

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    def _validate_grid(self, key: str, block_key: str) -> None:
        """The patches tile the array: as many block sizes as axes, each dividing its axis."""
        size, block = self.patch_sizes, self.patch_block
        _require(len(size) == len(block), key, f"has {len(size)} dims but {block_key} has {len(block)}")
        for dim, (n, b) in enumerate(zip(size, block)):
            _require(n > 0 and b > 0, key, f"sizes must be positive, got {list(size)} and {block_key}={list(block)}")
            _require(n % b == 0, f"{key}[{dim}]", f"{n} is not divisible by {block_key}[{dim}]={b}")


@dataclass
class ImageConfig(PatchGrid):
    """Images as non-overlapping patches with 2-D Fourier position features of the patch grid."""

    size: List[int] = field(default_factory=lambda: [28, 28])
    channels: int = 1
    patch_size: int = 4
    fourier_bands: int = 16

    patch_sizes = property(lambda self: list(self.size))
    patch_block = property(lambda self: [self.patch_size] * 2)
    patch_channels = property(lambda self: self.channels)

    def validate(self, prefix: str) -> None:
        """Fail early, naming the key, for an image the patches cannot tile."""
        _require(len(self.size) == 2, f"{prefix}.size", f"must be [height, width], got {self.size}")
        self._validate_grid(f"{prefix}.size", "patch_size")
        _require(self.channels > 0, f"{prefix}.channels", "must be positive")


@dataclass
class AudioConfig(PatchGrid):
    """Mono waveforms of a fixed number of samples, cut into patches with 1-D Fourier features."""

    num_samples: int = 16000
    patch_size: int = 160
    fourier_bands: int = 32

    patch_sizes = property(lambda self: [self.num_samples])
    patch_block = property(lambda self: [self.patch_size])
    patch_channels = property(lambda self: 1)

    def validate(self, prefix: str) -> None:
        """Fail early, naming the key, for a waveform the patches cannot tile."""
        self._validate_grid(f"{prefix}.num_samples", "patch_size")


@dataclass
class VideoConfig(PatchGrid):
    """Clips of ``frames`` frames cut into space-time tubelets (t, h, w) with 3-D Fourier features."""

    frames: int = 8
    size: List[int] = field(default_factory=lambda: [32, 32])
    channels: int = 3
    tubelet: List[int] = field(default_factory=lambda: [2, 8, 8])
    fourier_bands: int = 8

    patch_sizes = property(lambda self: [self.frames, *self.size])
    patch_block = property(lambda self: list(self.tubelet))
    patch_channels = property(lambda self: self.channels)

    def validate(self, prefix: str) -> None:
        """Fail early, naming the key, for a clip the tubelets cannot tile."""
        _require(len(self.size) == 2, f"{prefix}.size", f"must be [height, width], got {self.size}")
        _require(len(self.tubelet) == 3, f"{prefix}.tubelet", f"must be [t, h, w], got {self.tubelet}")
        self._validate_grid(f"{prefix}.frames/size", "tubelet")


@dataclass
class ArrayConfig(PatchGrid):
    """Generic arrays of up to ``length`` elements with ``channels`` features each, 1-D Fourier positions."""

    length: int = 64
    channels: int = 16
    fourier_bands: int = 16

    patch_sizes = property(lambda self: [self.length])
    patch_block = property(lambda self: [1])
    patch_channels = property(lambda self: self.channels)

    def validate(self, prefix: str) -> None:
        """Fail early, naming the key, for an empty array."""
        _require(self.length > 0 and self.channels > 0, prefix, "length and channels > 0")


@dataclass
class SeriesConfig(PatchGrid):
    """Numeric series ``[T, C]`` (sensors, climate, patient records) of up to ``max_length`` steps and ``channels``
    channels, cut into patches of ``patch_size`` steps with 1-D Fourier features (``pretrain.modalities.series``)."""

    max_length: int = 256
    channels: int = 1
    patch_size: int = 16
    fourier_bands: int = 16

    patch_sizes = property(lambda self: [self.max_length])
    patch_block = property(lambda self: [self.patch_size])
    patch_channels = property(lambda self: self.channels)

    def validate(self, prefix: str) -> None:
        """Fail early, naming the key, for a series the patches cannot tile."""
        self._validate_grid(f"{prefix}.max_length", "patch_size")
        _require(self.channels > 0, f"{prefix}.channels", "must be positive")


@dataclass
class ModelConfig:
    """A Perceiver IO: inputs of several modalities -> latents -> queries for the outputs wanted.

    ``d_model`` is the channel count of the input array (every adapter projects to it) and of the decoder queries.
    ``qk_channels``/``v_channels`` default to the query's channels (transformers' rules).
    ``attention_backend``: ``auto`` times the candidate kernels once per attention shape on CUDA and keeps the fastest
    (a fixed order on CPU); ``autotune`` does so on any device; a backend's name pins it.
    ``init_from``: start a training run from pretrained weights (``pretrain.init_from``): one of our export
    directories, a transformers ``PerceiverForMaskedLM`` directory, or a run, checkpoint or tag directory (its fp32
    master weights). Tensors of the same name and shape are loaded; this model's others (a new head, a new modality)
    start fresh. Read at a run's first start only: a resumed run continues from its checkpoint.
    """

    d_model: int = 768
    num_latents: int = 256
    d_latents: int = 1280
    num_blocks: int = 1
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    qk_channels: Optional[int] = None
    v_channels: Optional[int] = None
    cross_attention_shape_for_attention: CrossAttentionShape = "kv"
    self_attention_widening_factor: int = 1
    cross_attention_widening_factor: int = 1
    use_query_residual: bool = True
    attention_dropout: float = 0.1
    decoder_num_heads: int = 8
    decoder_qk_channels: int = 256
    decoder_v_channels: Optional[int] = None
    decoder_widening_factor: int = 1
    decoder_use_query_residual: bool = False
    num_classes: int = 0
    init_std: float = 0.02
    activation_checkpointing: bool = False
    attention_backend: AttentionBackend = "auto"
    init_from: str = ""
    text: Optional[TextConfig] = field(default_factory=TextConfig)
    image: Optional[ImageConfig] = None
    audio: Optional[AudioConfig] = None
    video: Optional[VideoConfig] = None
    array: Optional[ArrayConfig] = None
    series: Optional[SeriesConfig] = None

    @property
    def input_modalities(self) -> List[str]:
        """The enabled modality sections, in the schema's order."""
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), ModalityConfig)]

    @property
    def output_modalities(self) -> List[str]:
        return self.input_modalities + (["label"] if self.num_classes > 0 else [])

    @property
    def cross_attention_channels(self) -> Tuple[int, int]:
        """(qk, v) of the encoder cross-attention with transformers' defaults: qk from the inputs ("kv") or the
        latents ("q"), v from qk."""
        qk = self.qk_channels or (self.d_model if self.cross_attention_shape_for_attention == "kv" else self.d_latents)
        return qk, self.v_channels or qk

    @property
    def self_attention_channels(self) -> Tuple[int, int]:
        """(qk, v) of the latent self-attention layers: qk from the latents, v from qk."""
        qk = self.qk_channels or self.d_latents
        return qk, self.v_channels or qk

    @property
    def decoder_attention_channels(self) -> Tuple[int, int]:
        """(qk, v) of the decoder cross-attention: v defaults to the query channels (d_model)."""
        return self.decoder_qk_channels, self.decoder_v_channels or self.d_model

    def validate(self, prefix: str = "model") -> ModelConfig:
        """Fail early, naming the key (``prefix`` is where this section sits), for any value the model could not be
        built with; returns the config, checked."""
        _require_positive(self, ("d_model", "num_latents", "d_latents", "num_blocks", "num_self_attends_per_block"),
                          prefix)
        _require_choice(self.cross_attention_shape_for_attention, CrossAttentionShape,
                        f"{prefix}.cross_attention_shape_for_attention")
        _require(0.0 <= self.attention_dropout < 1.0, f"{prefix}.attention_dropout", "must be in [0, 1)")
        _require_choice(self.attention_backend, AttentionBackend, f"{prefix}.attention_backend")
        _require(len(self.input_modalities) > 0, prefix, "enable at least one input modality (text, image, audio, ...)")
        _require(self.num_classes >= 0, f"{prefix}.num_classes", "must be >= 0 (0 means no classification head)")

        for heads_key, (qk, v), key_prefix in (
            ("num_cross_attention_heads", self.cross_attention_channels, ""),
            ("num_self_attention_heads", self.self_attention_channels, ""),
            ("decoder_num_heads", self.decoder_attention_channels, "decoder_"),
        ):
            for key, value in ((f"{key_prefix}qk_channels", qk), (f"{key_prefix}v_channels", v)):
                _require_divides(value, getattr(self, heads_key), f"{prefix}.{key}", f"{prefix}.{heads_key}")
        if self.v_channels is not None:
            _require(
                self.v_channels == self.d_latents,
                f"{prefix}.v_channels",
                f"the latent self-attention adds its output to the latents, so v_channels must equal "
                f"d_latents={self.d_latents} (or be left unset), got {self.v_channels}",
            )
        if self.decoder_use_query_residual and self.decoder_v_channels is not None:
            _require(
                self.decoder_v_channels == self.d_model,
                f"{prefix}.decoder_v_channels",
                f"with decoder_use_query_residual it must equal d_model={self.d_model}",
            )
        for name in self.input_modalities:
            getattr(self, name).validate(f"{prefix}.{name}")
        return self


def validate_model_config(cfg: ModelConfig, prefix: str = "model") -> ModelConfig:
    """:meth:`ModelConfig.validate`, for the callers that hold a config rather than call its method."""
    return cfg.validate(prefix)


def model_config_from_dict(values: dict) -> ModelConfig:
    """Build and validate a ModelConfig from plain values (YAML, a checkpoint); unknown keys are an error."""
    schema = OmegaConf.structured(ModelConfig)
    try:
        merged = OmegaConf.merge(schema, _checked_enumerations(OmegaConf.create(values), "model."))
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf raises several types; all mean a bad key or value
        raise ConfigError(f"model config: {exc}") from exc
    return OmegaConf.to_object(merged).validate()


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# --- Data ------------------------------------------------------------------------------------------------------------

PIXEL_CHANNELS = (1, 3, 4)
# What a modality of the data is to a run (``data.objective``): hidden in part and predicted, seen whole, or predicted.
MASKED, INPUT, TARGET = "masked", "input", "target"
ROLES = {**{name: (MASKED, INPUT) for name in MODALITY_FIELDS}, "label": (TARGET,)}


@dataclass
class MaskingConfig:
    """Fraction of each modality hidden from the encoder and predicted by the decoder; 0 makes it input-only.

    Text is hidden in contiguous spans of ``text_mean_span`` bytes on average (T5-style), the others per patch.
    ``caption_whole``: the fraction of samples whose text comes with another modality (an image's caption, a speech
    transcript) that hide their text whole, up to the text's prediction slots (``text`` x ``model.text.max_length``),
    instead of in spans: the text is then predicted from the other modality alone, as a captioner would.
    ``normalized_patches``: each hidden patch's target is its values less their mean, over their standard deviation
    (MAE's normalised pixels): the loss then rewards shapes and edges, not a patch's overall brightness.
    """

    text: float = 0.15
    text_mean_span: float = 3.0
    caption_whole: float = 0.0
    image: float = 0.5
    audio: float = 0.5
    video: float = 0.5
    series: float = 0.5
    series_mean_span: float = 3.0
    normalized_patches: bool = False

    def ratios(self) -> List[str]:
        """The fields that are fractions: one per modality, and ``caption_whole``."""
        return [f.name for f in dataclasses.fields(self) if f.type == "float" and f.name not in self.spans()]

    def spans(self) -> List[str]:
        """The mean span lengths of the modalities hidden in spans."""
        return [f.name for f in dataclasses.fields(self) if f.name.endswith("_mean_span")]

    def validate(self, prefix: str = "data.masking") -> None:
        """Fail early, naming the key, for a fraction outside [0, 1] or spans shorter than a byte."""
        for name in self.ratios():
            ratio = getattr(self, name)
            _require(0.0 <= ratio <= 1.0, f"{prefix}.{name}", f"must be in [0, 1], got {ratio}")
        for name in self.spans():
            _require(getattr(self, name) >= 1.0, f"{prefix}.{name}", "must be >= 1 (positions: bytes, patches)")


@dataclass
class DataConfig:
    """The training/validation stream. Shapes (text length, image size, ...) come from ``ModelConfig``.

    Each entry of ``train_shards``/``val_shards`` is one dataset: a path, URL or brace pattern of shards
    (``/d/shard-{000000..000099}.tar``, ``s3://bucket/c4/shard-{0000..0099}.tar.gz``: ``.tar``, ``.tar.gz``,
    ``.tgz``; ``http(s)://``, ``s3://``, ``gs://``), a directory or remote prefix holding ``index.json`` or shards (a
    local one also subdirectories holding ``index.json``), a ``pipe:`` command (brace patterns allowed), or several of
    these joined by ``::``. Training datasets are mixed by ``weights`` (one per entry; empty = proportional to their
    sample counts).
    An epoch is ``epoch_samples`` samples over all ranks: 0 = the sum of the index.json counts, which shards without
    an index lack (``python -m data_prep index SPEC`` writes one). Validation reads every sample of ``val_shards``
    once, whatever their count (``train.eval_batches`` can cap it). Training samples come from ``streams`` logical
    streams, each with its share of every dataset's shards and ``shuffle_buffer / streams`` samples of shuffle
    buffer, interleaved into one global order: the global batches are the same on any number of processes, data-loader
    workers and micro-batches whose readers (processes x ``num_workers``) divide ``streams``; 0 = the largest highly
    composite number (1, 2, 4, 6, 12, 24, 36, 48, 60, 120, ...) not above the fewest shards of a training dataset
    that the first start's readers divide (a resume keeps it). A resume whose order differs from the checkpoint's
    (seed, streams, global batch, shuffle buffer, weights, shards) is refused unless ``new_order``: then the epoch
    goes on from the same number of samples, in the new order.
    ``require`` lists
    sample keys without which a sample is skipped. ``random_crop`` crops long text and audio at a random offset (else
    from the start). ``image_shift``: each training image moves by up to this many pixels in each direction at random
    (its edge pixels fill in), light augmentation for fine-tuning on few labels; validation images never move.
    ``pixel_mean``/``pixel_std`` normalise image and video pixels scaled to [0, 1]. ``pin_memory``
    page-locks batches where CUDA is present (a copy from pageable memory makes the host wait for the work queued on
    the GPU, every step); it does nothing elsewhere. ``pipe_stall_timeout_s``: a ``pipe:`` shard's command that sends
    nothing for this long while a worker waits is killed and the rest of its shard skipped (``stalled_shard``), so a
    download that hangs cannot hang the job (0 = wait forever). ``shard_retries``: a remote or ``pipe:`` shard whose
    read fails (or stalls) is read again this many times, after 1, 2, 4, ... s, going on after the samples it gave,
    before the rest of it is skipped and counted.
    """

    train_shards: List[str] = field(default_factory=list)
    val_shards: List[str] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)
    epoch_samples: int = 0
    streams: int = 0
    new_order: bool = False
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = True
    shuffle_buffer: int = 1000
    resample: bool = False
    require: List[str] = field(default_factory=list)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    random_crop: bool = True
    image_shift: int = 0
    audio_sample_rate: int = 16000
    pixel_mean: List[float] = field(default_factory=lambda: [0.5])
    pixel_std: List[float] = field(default_factory=lambda: [0.5])
    pipe_stall_timeout_s: float = 300.0
    shard_retries: int = 3
    objective: Dict[str, str] = field(default_factory=dict)

    def validate(self, model: ModelConfig, prefix: str = "data") -> DataConfig:
        """Fail early, naming the key, for any value the stream could not run with for ``model``: its own (under
        ``prefix``) and what the stream needs of the model's (byte ids, pixel channels); returns the config."""
        _require_positive(self, ("batch_size", "audio_sample_rate", "prefetch_factor"), prefix)
        for key in ("num_workers", "shuffle_buffer", "epoch_samples", "streams", "seed", "pipe_stall_timeout_s",
                    "shard_retries", "image_shift"):
            _require(getattr(self, key) >= 0, f"{prefix}.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.weights:
            _require(
                len(self.weights) == len(self.train_shards),
                f"{prefix}.weights",
                f"has {len(self.weights)} entries for {len(self.train_shards)} train_shards; give one per dataset or "
                f"none",
            )
            _require(all(w >= 0 for w in self.weights) and sum(self.weights) > 0, f"{prefix}.weights",
                     f"must be >= 0 with a positive sum, got {list(self.weights)}")
        self.masking.validate(f"{prefix}.masking")
        for key in self.require:
            _require(key in FIELD_MODALITY, f"{prefix}.require",
                     f"unknown sample key {key!r}; known keys: {sorted(FIELD_MODALITY)}")
        if model.text is not None:
            _require(model.text.vocab_size >= VOCAB_SIZE, "model.text.vocab_size",
                     f"the stream feeds UTF-8 byte ids, which need vocab_size >= {VOCAB_SIZE}, got "
                     f"{model.text.vocab_size}")
        for name in ("image", "video"):
            sub = getattr(model, name)
            _require(sub is None or sub.channels in PIXEL_CHANNELS, f"model.{name}.channels",
                     f"the stream makes grey (1), RGB (3) or RGBA (4) pixels, got {getattr(sub, 'channels', None)}")
        channels = {c.channels for c in (model.image, model.video) if c is not None}
        for key in ("pixel_mean", "pixel_std"):
            values = getattr(self, key)
            _require(len(values) == 1 or {len(values)} == channels, f"{prefix}.{key}",
                     f"needs 1 value or one per image/video channel {sorted(channels)}, got {list(values)}")
        _require(all(s > 0 for s in self.pixel_std), f"{prefix}.pixel_std",
                 f"must be positive, got {list(self.pixel_std)}")
        readable = streamed_modalities(model)
        for name, role in self.objective.items():
            _require(name in readable, f"{prefix}.objective.{name}",
                     f"the model has no {name!r} {'head (model.num_classes is 0)' if name == 'label' else 'modality'}; "
                     f"it reads {readable}")
            _require(role in ROLES[name], f"{prefix}.objective.{name}", f"must be one of {ROLES[name]}, got {role!r}")
        if self.objective:
            roles = data_roles(self, model)
            _require(any(role != TARGET for role in roles.values()), f"{prefix}.objective",
                     f"names no input: give at least one modality as {MASKED!r} or {INPUT!r}, got {dict(roles)}")
            _require(any(role != INPUT for role in roles.values()), f"{prefix}.objective",
                     f"nothing to predict: make a modality {MASKED!r} or the label a {TARGET!r}, got {dict(roles)}")
        return self

    def validate_for_training(self, eval_every_steps: int) -> None:
        """What a training run needs of its data besides :meth:`validate` (a stream alone reads one split): shards to
        train on, and validation shards when ``train.eval_every_steps`` evaluates."""
        _require(bool(self.train_shards), "data.train_shards", "give at least one shard spec to train on")
        _require(not eval_every_steps or bool(self.val_shards), "data.val_shards",
                 "train.eval_every_steps is set but there are no validation shards; give data.val_shards or set "
                 "train.eval_every_steps=0")


def streamed_modalities(model: ModelConfig) -> List[str]:
    """The modalities of the data this model can take, the label included when it classifies, in stream order."""
    inputs = [name for name in MODALITY_FIELDS if getattr(model, name) is not None]
    return inputs + (["label"] if model.num_classes else [])


def data_roles(data: DataConfig, model: ModelConfig) -> Dict[str, str]:
    """The role of each modality a run reads from its data (``data.objective``, or its default), in stream order."""
    if data.objective:
        return {name: data.objective[name] for name in ROLES if name in data.objective}
    return {name: ROLES[name][0] for name in streamed_modalities(model)}


def validate_data_config(cfg: DataConfig, model: ModelConfig, prefix: str = "data") -> DataConfig:
    """:meth:`DataConfig.validate`, for the callers that hold a config rather than call its method."""
    return cfg.validate(model, prefix)


# --- Training run ----------------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """Where a run writes everything (resolved config, DeepSpeed JSON, metrics.jsonl, checkpoints/, wandb/, log).
    ``progress_bar``: rank 0 draws a bar of the steps where its stderr is a terminal (never into a log file or Slurm's
    output, which it would fill with redraws). ``profile_steps`` > 0: ``torch.profiler`` over that many training
    steps after the first ``profile_after_steps`` of the process (attention tuning, compilation and data warm-up
    happen there), each rank's summary and trace in ``<dir>/profile/``; the steps exclude evaluation and checkpoints
    unless one falls in them."""

    dir: str = "runs/default"
    name: str = ""
    log_every_steps: int = 10
    progress_bar: bool = True
    profile_steps: int = 0
    profile_after_steps: int = 5

    def validate(self) -> None:
        """Fail early, naming the key, for a run without a directory or a step count that cannot be."""
        _require(bool(self.dir), "run.dir", "must name the run directory")
        _require(self.log_every_steps > 0, "run.log_every_steps", "must be a positive integer")
        for key in ("profile_steps", "profile_after_steps"):
            _require(getattr(self, key) >= 0, f"run.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    """The loop. ``global_batch_size`` 0 means ``data.batch_size x world size`` (no accumulation); otherwise it must be
    a multiple of that product and the quotient is the number of gradient-accumulation micro-steps.
    ``precision`` auto is bf16 on GPU and fp32 on CPU; bf16 is DeepSpeed's bf16 mode (bf16 weights, fp32 master copies
    in the optimizer); autocast its ``torch_autocast`` (fp32 weights, the forward under bf16 autocast, Linear
    gradients reduced in bf16: no master copies to keep in step). ``loss_weights`` weighs the per-modality losses
    (default 1). ``eval_every_steps``: evaluate on ``data.val_shards`` every N steps and at the last (0: never);
    each evaluation scores every validation sample once, or only the first ``eval_batches`` batches per rank (0: all).
    ``freeze``: parameters that do not train (no gradient, no optimizer state): ``pretrained`` (every tensor
    ``model.init_from`` loaded: with a new label head, a linear probe), ``latents``, or any module path of the model
    (``encoder``, ``encoder.cross_attention``, ``encoder.self_attends``, ``decoder``, ``adapters.image``,
    ``modality_embeddings``, ...). A run keeps its frozen parameters when it resumes. In a bf16 run they are held in
    bf16 alone (DeepSpeed keeps fp32 copies of the trained parameters only), and exported so.
    ``compile``: ``torch.compile`` the model in place with that mode (``default``, ``reduce-overhead`` for CUDA
    graphs, ``max-autotune``), or ``none``; the first steps then include the compilation. Not with ZeRO stage 3.
    ``collective_timeout_minutes``: how long a rank waits for its peers in a collective before the run fails, so that a
    hung rank (a stuck filesystem, a wedged GPU) does not hold the job's nodes until its time limit; raise it when a
    checkpoint save or load, or the universal conversion at a resume on another world size (rank 0 converts, the others
    wait), takes longer. It bounds DeepSpeed's own groups too (NCCL's watchdog aborts the process; gloo raises)."""

    max_steps: int = 1000
    seed: int = 0
    global_batch_size: int = 0
    precision: Precision = "auto"
    compile: CompileMode = "none"
    eval_every_steps: int = 0
    eval_batches: int = 0
    loss_weights: Dict[str, float] = field(default_factory=dict)
    freeze: List[str] = field(default_factory=list)
    collective_timeout_minutes: float = 30.0

    def validate(self, model: ModelConfig, batch_size: int, world_size: int, zero_stage: int) -> None:
        """Fail early, naming the key, for a loop that cannot run: ``global_batch_size`` against ``data.batch_size``
        (``batch_size``) x ``world_size``, ``loss_weights`` against ``model``'s outputs, ``compile`` against
        ``deepspeed.zero_stage`` (``zero_stage``)."""
        _require_positive(self, ("max_steps",), "train")
        _require_choice(self.precision, Precision, "train.precision")
        _require_choice(self.compile, CompileMode, "train.compile")
        micro = batch_size * world_size
        _require(
            self.global_batch_size >= 0 and self.global_batch_size % micro == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not a multiple of data.batch_size x world size = {batch_size} x "
            f"{world_size} = {micro}; use a multiple of {micro} (or 0 for no accumulation)",
        )
        for key in ("eval_every_steps", "eval_batches"):
            _require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0 = off / whole split)")
        _require(self.collective_timeout_minutes > 0, "train.collective_timeout_minutes",
                 f"must be positive, got {self.collective_timeout_minutes}")
        unknown = set(self.loss_weights) - set(model.output_modalities)
        _require(not unknown, "train.loss_weights", f"unknown modalities {sorted(unknown)}; the model outputs "
                 f"{model.output_modalities}")
        _require(self.compile == "none" or zero_stage != 3, "train.compile",
                 f"{self.compile!r} cannot run with deepspeed.zero_stage=3 (the partitioned parameters are gathered by "
                 f"hooks that the compiled graph does not see); use zero_stage 0-2 or train.compile=none")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr x min_lr_ratio`` at ``train.max_steps``.
    ``pretrained_lr_scale``: the parameters ``model.init_from`` loaded learn at ``lr x`` this, the new ones (a head)
    at ``lr``: below 1, fine-tuning moves the pretrained weights less."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    pretrained_lr_scale: float = 1.0

    def validate(self) -> None:
        """Fail early, naming the key, for a schedule or AdamW setting that cannot train."""
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 f"two values in [0, 1), got {self.betas}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")
        _require(self.pretrained_lr_scale > 0, "optim.pretrained_lr_scale",
                 f"must be positive, got {self.pretrained_lr_scale} (train.freeze: [pretrained] keeps them fixed)")


@dataclass
class DeepSpeedConfig:
    """ZeRO stage 0-3 and optional optimizer offload to CPU; ``extra`` is merged last into the generated JSON.

    ``fp32_grad_accumulation`` accumulates and reduces gradients in fp32 in a bf16 run. With ZeRO-1 DeepSpeed then
    keeps one flat fp32 gradient buffer (its ``BF16_Optimizer``) instead of copying each gradient into buckets: the
    fastest engine for the 201M config on an H100 (``bench/README.md``), at twice the bytes per gradient reduction."""

    zero_stage: ZeroStage = 2
    offload_optimizer: bool = False
    fp32_grad_accumulation: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Fail early, naming the key, for a ZeRO stage DeepSpeed does not have or cannot combine."""
        _require_choice(self.zero_stage, ZeroStage, "deepspeed.zero_stage")
        _require(not self.fp32_grad_accumulation or self.zero_stage > 0, "deepspeed.fp32_grad_accumulation",
                 "needs deepspeed.zero_stage 1-3 (DeepSpeed accumulates bf16 gradients in fp32 only under ZeRO); "
                 "zero_stage 1 is the fast one")


@dataclass
class CheckpointConfig:
    """Saved every ``every_steps`` steps and every ``every_minutes`` minutes (0 = off), at the end, and on SIGUSR1 or
    SIGTERM; the last ``keep_last`` are kept. ``dir`` empty means ``<run.dir>/checkpoints``."""

    every_steps: int = 1000
    every_minutes: float = 0.0
    keep_last: int = 3
    dir: str = ""

    def validate(self) -> None:
        """Fail early, naming the key, for a negative period or keeping no checkpoint."""
        _require(self.every_steps >= 0 and self.every_minutes >= 0, "checkpoint.every_steps",
                 "checkpoint.every_steps and checkpoint.every_minutes must be >= 0 (0 = off)")
        _require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class WandbConfig:
    """W&B on rank 0 only. ``online`` without an API key falls back to ``offline`` (logged), never a hang. At the end
    of a process W&B's upload waits at most ``finish_timeout_s`` (0: no limit): a job warned of its time limit has 180
    s to checkpoint, exit and requeue itself; what is left stays under ``<run>/wandb/`` for ``wandb sync``."""

    mode: WandbMode = "offline"
    project: str = "perceiver-pretrain"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    finish_timeout_s: float = 120.0

    def validate(self) -> None:
        """Fail early, naming the key, for a mode W&B does not have or a negative upload wait."""
        _require_choice(self.mode, WandbMode, "wandb.mode")
        _require(self.finish_timeout_s >= 0, "wandb.finish_timeout_s",
                 f"must be >= 0 (0: no limit), got {self.finish_timeout_s}")


@dataclass
class Config:
    """Everything a training run reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, world_size: int) -> Config:
        """Every check that can run before any work, on ``world_size`` processes, each failing with the key in its
        message: each section's own, given what it needs of the others; returns the config."""
        self.model.validate()
        self.data.validate(self.model)
        self.train.validate(self.model, self.data.batch_size, world_size, self.deepspeed.zero_stage)
        for section in (self.optim, self.deepspeed, self.checkpoint, self.wandb, self.run):
            section.validate()
        self.data.validate_for_training(self.train.eval_every_steps)
        return self


def _field_type(key: str) -> Any:
    """The schema's type of a dotted key (``Optional`` unwrapped), or None for a key the schema does not have; read
    from the dataclasses, so a key under a section that is None by default (``model.image.size``) has one too."""
    node: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
        if typing.get_origin(node) is typing.Union:
            node = next(arg for arg in typing.get_args(node) if arg is not type(None))
    return node


def _scalar_type(kind: Any) -> Any:
    """The type of a ``Literal``'s values (str, int), else ``kind``: what a YAML or override value is read as."""
    return type(typing.get_args(kind)[0]) if typing.get_origin(kind) is Literal else kind


_SCALAR_NODES = {str: StringNode, int: IntegerNode}


def _checked_enumerations(layer: Any, prefix: str = "") -> Any:
    """``layer`` (values under ``prefix``) with each value of a ``Literal`` field converted as its plain str or int
    field converted it (omegaconf matches a Literal by type: ``zero_stage: "2"`` would fail), and a value outside the
    Literal refused with the message of its section's ``validate`` rather than omegaconf's own. Nulls, ``???`` and
    interpolations are left for omegaconf to judge, and so is a value not even of the field's type."""
    if not OmegaConf.is_dict(layer):
        return layer
    for key, value in dotted(OmegaConf.to_container(layer)).items():
        kind = _field_type(prefix + key)
        if typing.get_origin(kind) is not Literal or value is None or value == MISSING or "${" in str(value):
            continue
        try:
            value = _SCALAR_NODES[_scalar_type(kind)]().validate_and_convert(value)
        except ValidationError:
            continue
        _require_choice(value, kind, prefix + key)
        OmegaConf.update(layer, key, value)
    return layer


def _override_layer(schema: Any, override: str) -> Any:
    """One ``key=value`` override as a config layer. ``key=`` empties a string (YAML would read null); a list-valued
    key takes ``key=a`` as the list ``[a]`` (the value as written, braces and all) and ``key=`` as ``[]``."""
    key, _, value = override.partition("=")
    kind = _field_type(key)
    if typing.get_origin(kind) is list and not value.lstrip().startswith("["):
        layer = OmegaConf.create()
        OmegaConf.update(layer, key, [value] if value else [], force_add=True)
        element = typing.get_args(kind)[0].__name__
        try:
            OmegaConf.merge(schema, layer)
        except Exception as exc:  # omegaconf's validation errors: the value is not of the list's element type
            raise ConfigError(f"{key}: {value!r} is not of type {element}; give one value as {key}=a or several "
                              f"as {key}=[a,b]") from exc
        return layer
    if _scalar_type(kind) is str and value == "":
        override = f"{key}=''"
    try:
        return OmegaConf.from_dotlist([override])
    except Exception as exc:
        raise ConfigError(f"{key}: cannot parse override {override!r} ({exc}); quote values holding YAML syntax such "
                          f"as {{...}} or [...], e.g. {key}='\"...\"'") from exc


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) plus ``key=value`` dotlist overrides onto the schema; unknown keys, wrong types and values
    outside an enumeration raise a ConfigError naming the key. Semantic checks that need the world size are in
    :meth:`Config.validate`. The layers merge before the schema checks them, so that only the value that wins is
    judged, as when every field was a plain str or int."""
    schema = OmegaConf.structured(Config)
    try:
        layers = []
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"--config: file {path} does not exist")
            layers.append(OmegaConf.load(path))
        for override in overrides:
            layers.append(_override_layer(schema, override))
        merged = OmegaConf.merge(schema, _checked_enumerations(OmegaConf.merge({}, *layers)))
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf's errors carry the full key in their message
        raise ConfigError(f"config: {exc}") from exc


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of the resolved config (for config.yaml, W&B and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def dotted(values: dict, prefix: str = "") -> Dict[str, Any]:
    """A nested config dict as ``{"section.key": value}`` (to compare two configs key by key)."""
    flat: Dict[str, Any] = {}
    for key, value in values.items():
        flat.update(dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def validate_config(cfg: Config, world_size: int) -> Config:
    """:meth:`Config.validate`, for the callers that hold a config rather than call its method."""
    return cfg.validate(world_size)


def gradient_accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step, from ``train.global_batch_size`` (validated by :meth:`Config.validate`)."""
    micro = cfg.data.batch_size * world_size
    return max(1, cfg.train.global_batch_size // micro)


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step over every rank: ``train.global_batch_size``, or one micro-batch per rank."""
    return cfg.data.batch_size * world_size * gradient_accumulation_steps(cfg, world_size)

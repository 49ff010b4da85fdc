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
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from .shard_format import FIELD_MODALITY, MODALITY_FIELDS
from .vocab import VOCAB_SIZE

ATTENTION_BACKENDS = ("auto", "autotune", "flash_attn", "varlen", "sdpa", "sdpa_unpadded", "math")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what would fix it."""


@dataclass
class TextConfig:
    """UTF-8 bytes in the paper's 262-id vocabulary (``pretrain.vocab``), or token ids of another vocabulary."""

    vocab_size: int = 262
    max_length: int = 2048


class PatchGrid:
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


@dataclass
class AudioConfig(PatchGrid):
    """Mono waveforms of a fixed number of samples, cut into patches with 1-D Fourier features."""

    num_samples: int = 16000
    patch_size: int = 160
    fourier_bands: int = 32

    patch_sizes = property(lambda self: [self.num_samples])
    patch_block = property(lambda self: [self.patch_size])
    patch_channels = property(lambda self: 1)


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


@dataclass
class ArrayConfig(PatchGrid):
    """Generic arrays of up to ``length`` elements with ``channels`` features each, 1-D Fourier positions."""

    length: int = 64
    channels: int = 16
    fourier_bands: int = 16

    patch_sizes = property(lambda self: [self.length])
    patch_block = property(lambda self: [1])
    patch_channels = property(lambda self: self.channels)


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
    cross_attention_shape_for_attention: str = "kv"
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
    attention_backend: str = "auto"
    init_from: str = ""
    text: Optional[TextConfig] = field(default_factory=TextConfig)
    image: Optional[ImageConfig] = None
    audio: Optional[AudioConfig] = None
    video: Optional[VideoConfig] = None
    array: Optional[ArrayConfig] = None

    @property
    def input_modalities(self) -> List[str]:
        return [name for name in MODALITIES if getattr(self, name) is not None]

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


MODALITIES = ("text", "image", "audio", "video", "array")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _require_divides(value: int, by: int, key: str, by_key: str) -> None:
    _require(by > 0, by_key, f"must be a positive integer, got {by}")
    _require(value % by == 0, key, f"{value} is not divisible by {by_key}={by}; pick a multiple of {by}")


def validate_model_config(cfg: ModelConfig, prefix: str = "model") -> ModelConfig:
    """Fail early, naming the key, for any value the model could not be built with."""
    for key in ("d_model", "num_latents", "d_latents", "num_blocks", "num_self_attends_per_block"):
        _require(getattr(cfg, key) > 0, f"{prefix}.{key}", f"must be a positive integer, got {getattr(cfg, key)}")
    _require(
        cfg.cross_attention_shape_for_attention in ("q", "kv"),
        f"{prefix}.cross_attention_shape_for_attention",
        f"must be 'q' or 'kv', got {cfg.cross_attention_shape_for_attention!r}",
    )
    _require(0.0 <= cfg.attention_dropout < 1.0, f"{prefix}.attention_dropout", "must be in [0, 1)")
    _require(
        cfg.attention_backend in ATTENTION_BACKENDS,
        f"{prefix}.attention_backend",
        f"must be one of {ATTENTION_BACKENDS}, got {cfg.attention_backend!r}",
    )
    _require(len(cfg.input_modalities) > 0, prefix, "enable at least one input modality (text, image, audio, ...)")
    _require(cfg.num_classes >= 0, f"{prefix}.num_classes", "must be >= 0 (0 means no classification head)")

    for heads_key, (qk, v), key_prefix in (
        ("num_cross_attention_heads", cfg.cross_attention_channels, ""),
        ("num_self_attention_heads", cfg.self_attention_channels, ""),
        ("decoder_num_heads", cfg.decoder_attention_channels, "decoder_"),
    ):
        for key, value in ((f"{key_prefix}qk_channels", qk), (f"{key_prefix}v_channels", v)):
            _require_divides(value, getattr(cfg, heads_key), f"{prefix}.{key}", f"{prefix}.{heads_key}")
    if cfg.v_channels is not None:
        _require(
            cfg.v_channels == cfg.d_latents,
            f"{prefix}.v_channels",
            f"the latent self-attention adds its output to the latents, so v_channels must equal "
            f"d_latents={cfg.d_latents} (or be left unset), got {cfg.v_channels}",
        )
    if cfg.decoder_use_query_residual and cfg.decoder_v_channels is not None:
        _require(
            cfg.decoder_v_channels == cfg.d_model,
            f"{prefix}.decoder_v_channels",
            f"with decoder_use_query_residual it must equal d_model={cfg.d_model}",
        )
    _validate_modalities(cfg, prefix)
    return cfg


def _validate_grid(size: List[int], block: List[int], key: str, block_key: str) -> None:
    _require(len(size) == len(block), key, f"has {len(size)} dims but {block_key} has {len(block)}")
    for dim, (n, b) in enumerate(zip(size, block)):
        _require(n > 0 and b > 0, key, f"sizes must be positive, got {list(size)} and {block_key}={list(block)}")
        _require(n % b == 0, f"{key}[{dim}]", f"{n} is not divisible by {block_key}[{dim}]={b}")


def _validate_modalities(cfg: ModelConfig, prefix: str) -> None:
    if cfg.text is not None:
        _require(cfg.text.vocab_size > 0, f"{prefix}.text.vocab_size", "must be positive")
        _require(cfg.text.max_length > 0, f"{prefix}.text.max_length", "must be positive")
    if cfg.image is not None:
        _require(len(cfg.image.size) == 2, f"{prefix}.image.size", f"must be [height, width], got {cfg.image.size}")
        _validate_grid(cfg.image.patch_sizes, cfg.image.patch_block, f"{prefix}.image.size", "patch_size")
        _require(cfg.image.channels > 0, f"{prefix}.image.channels", "must be positive")
    if cfg.audio is not None:
        _validate_grid(cfg.audio.patch_sizes, cfg.audio.patch_block, f"{prefix}.audio.num_samples", "patch_size")
    if cfg.video is not None:
        v = cfg.video
        _require(len(v.size) == 2, f"{prefix}.video.size", f"must be [height, width], got {v.size}")
        _require(len(v.tubelet) == 3, f"{prefix}.video.tubelet", f"must be [t, h, w], got {v.tubelet}")
        _validate_grid(v.patch_sizes, v.patch_block, f"{prefix}.video.frames/size", "tubelet")
    if cfg.array is not None:
        _require(cfg.array.length > 0 and cfg.array.channels > 0, f"{prefix}.array", "length and channels > 0")


def model_config_from_dict(values: dict) -> ModelConfig:
    """Build and validate a ModelConfig from plain values (YAML, a checkpoint); unknown keys are an error."""
    schema = OmegaConf.structured(ModelConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(values))
    except Exception as exc:  # omegaconf raises several types; all mean a bad key or value
        raise ConfigError(f"model config: {exc}") from exc
    return validate_model_config(OmegaConf.to_object(merged))


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
    normalized_patches: bool = False


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
    """Fail early, naming the key, for any value the stream could not run with for this model."""
    for key in ("batch_size", "audio_sample_rate", "prefetch_factor"):
        _require(getattr(cfg, key) > 0, f"{prefix}.{key}", f"must be a positive integer, got {getattr(cfg, key)}")
    for key in ("num_workers", "shuffle_buffer", "epoch_samples", "streams", "seed", "pipe_stall_timeout_s",
                "shard_retries", "image_shift"):
        _require(getattr(cfg, key) >= 0, f"{prefix}.{key}", f"must be >= 0, got {getattr(cfg, key)}")
    if cfg.weights:
        _require(
            len(cfg.weights) == len(cfg.train_shards),
            f"{prefix}.weights",
            f"has {len(cfg.weights)} entries for {len(cfg.train_shards)} train_shards; give one per dataset or none",
        )
        _require(all(w >= 0 for w in cfg.weights) and sum(cfg.weights) > 0, f"{prefix}.weights",
                 f"must be >= 0 with a positive sum, got {list(cfg.weights)}")
    for name in ("text", "image", "audio", "video", "caption_whole"):
        ratio = getattr(cfg.masking, name)
        _require(0.0 <= ratio <= 1.0, f"{prefix}.masking.{name}", f"must be in [0, 1], got {ratio}")
    _require(cfg.masking.text_mean_span >= 1.0, f"{prefix}.masking.text_mean_span", "must be >= 1 (bytes)")
    for key in cfg.require:
        _require(key in FIELD_MODALITY, f"{prefix}.require",
                 f"unknown sample key {key!r}; known keys: {sorted(FIELD_MODALITY)}")
    if model.text is not None:
        _require(model.text.vocab_size >= VOCAB_SIZE, "model.text.vocab_size",
                 f"the stream feeds UTF-8 byte ids, which need vocab_size >= {VOCAB_SIZE}, got {model.text.vocab_size}")
    for name in ("image", "video"):
        sub = getattr(model, name)
        _require(sub is None or sub.channels in PIXEL_CHANNELS, f"model.{name}.channels",
                 f"the stream makes grey (1), RGB (3) or RGBA (4) pixels, got {getattr(sub, 'channels', None)}")
    channels = {c.channels for c in (model.image, model.video) if c is not None}
    for key in ("pixel_mean", "pixel_std"):
        values = getattr(cfg, key)
        _require(len(values) == 1 or {len(values)} == channels, f"{prefix}.{key}",
                 f"needs 1 value or one per image/video channel {sorted(channels)}, got {list(values)}")
    _require(all(s > 0 for s in cfg.pixel_std), f"{prefix}.pixel_std", f"must be positive, got {list(cfg.pixel_std)}")
    readable = streamed_modalities(model)
    for name, role in cfg.objective.items():
        _require(name in readable, f"{prefix}.objective.{name}",
                 f"the model has no {name!r} {'head (model.num_classes is 0)' if name == 'label' else 'modality'}; "
                 f"it reads {readable}")
        _require(role in ROLES[name], f"{prefix}.objective.{name}", f"must be one of {ROLES[name]}, got {role!r}")
    if cfg.objective:
        roles = data_roles(cfg, model)
        _require(any(role != TARGET for role in roles.values()), f"{prefix}.objective",
                 f"names no input: give at least one modality as {MASKED!r} or {INPUT!r}, got {dict(roles)}")
        _require(any(role != INPUT for role in roles.values()), f"{prefix}.objective",
                 f"nothing to predict: make a modality {MASKED!r} or the label a {TARGET!r}, got {dict(roles)}")
    return cfg


# --- Training run ----------------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "autocast")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
WANDB_MODES = ("online", "offline", "disabled")


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
    precision: str = "auto"
    compile: str = "none"
    eval_every_steps: int = 0
    eval_batches: int = 0
    loss_weights: Dict[str, float] = field(default_factory=dict)
    freeze: List[str] = field(default_factory=list)
    collective_timeout_minutes: float = 30.0


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


@dataclass
class DeepSpeedConfig:
    """ZeRO stage 0-3 and optional optimizer offload to CPU; ``extra`` is merged last into the generated JSON.

    ``fp32_grad_accumulation`` accumulates and reduces gradients in fp32 in a bf16 run. With ZeRO-1 DeepSpeed then
    keeps one flat fp32 gradient buffer (its ``BF16_Optimizer``) instead of copying each gradient into buckets: the
    fastest engine for the 201M config on an H100 (``bench/README.md``), at twice the bytes per gradient reduction."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    fp32_grad_accumulation: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """Saved every ``every_steps`` steps and every ``every_minutes`` minutes (0 = off), at the end, and on SIGUSR1 or
    SIGTERM; the last ``keep_last`` are kept. ``dir`` empty means ``<run.dir>/checkpoints``."""

    every_steps: int = 1000
    every_minutes: float = 0.0
    keep_last: int = 3
    dir: str = ""


@dataclass
class WandbConfig:
    """W&B on rank 0 only. ``online`` without an API key falls back to ``offline`` (logged), never a hang. At the end
    of a process W&B's upload waits at most ``finish_timeout_s`` (0: no limit): a job warned of its time limit has 180
    s to checkpoint, exit and requeue itself; what is left stays under ``<run>/wandb/`` for ``wandb sync``."""

    mode: str = "offline"
    project: str = "perceiver-pretrain"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    finish_timeout_s: float = 120.0


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
    if kind is str and value == "":
        override = f"{key}=''"
    try:
        return OmegaConf.from_dotlist([override])
    except Exception as exc:
        raise ConfigError(f"{key}: cannot parse override {override!r} ({exc}); quote values holding YAML syntax such "
                          f"as {{...}} or [...], e.g. {key}='\"...\"'") from exc


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) plus ``key=value`` dotlist overrides onto the schema; unknown keys and wrong types raise a
    ConfigError naming the key. Semantic checks that need the world size are in :func:`validate_config`."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"--config: file {path} does not exist")
            layers.append(OmegaConf.load(path))
        for override in overrides:
            layers.append(_override_layer(schema, override))
        merged = OmegaConf.merge(*layers)
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
    """Every check that can run before any work, each failing with the key in its message."""
    validate_model_config(cfg.model)
    validate_data_config(cfg.data, cfg.model)
    t, o, d, c, w, r = cfg.train, cfg.optim, cfg.deepspeed, cfg.checkpoint, cfg.wandb, cfg.run
    _require(t.max_steps > 0, "train.max_steps", f"must be a positive integer, got {t.max_steps}")
    _require(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {t.precision!r}")
    _require(t.compile in COMPILE_MODES, "train.compile", f"must be one of {COMPILE_MODES}, got {t.compile!r}")
    micro = cfg.data.batch_size * world_size
    _require(
        t.global_batch_size >= 0 and t.global_batch_size % micro == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not a multiple of data.batch_size x world size = {cfg.data.batch_size} x "
        f"{world_size} = {micro}; use a multiple of {micro} (or 0 for no accumulation)",
    )
    for key in ("eval_every_steps", "eval_batches"):
        _require(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0 = off / whole split)")
    _require(t.collective_timeout_minutes > 0, "train.collective_timeout_minutes",
             f"must be positive, got {t.collective_timeout_minutes}")
    unknown = set(t.loss_weights) - set(cfg.model.output_modalities)
    _require(not unknown, "train.loss_weights", f"unknown modalities {sorted(unknown)}; the model outputs "
             f"{cfg.model.output_modalities}")
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"two values in [0, 1), got {o.betas}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")
    _require(o.pretrained_lr_scale > 0, "optim.pretrained_lr_scale",
             f"must be positive, got {o.pretrained_lr_scale} (train.freeze: [pretrained] keeps them fixed)")
    _require(d.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {d.zero_stage}")
    _require(not d.fp32_grad_accumulation or d.zero_stage > 0, "deepspeed.fp32_grad_accumulation",
             "needs deepspeed.zero_stage 1-3 (DeepSpeed accumulates bf16 gradients in fp32 only under ZeRO); "
             "zero_stage 1 is the fast one")
    _require(t.compile == "none" or d.zero_stage < 3, "train.compile",
             f"{t.compile!r} cannot run with deepspeed.zero_stage=3 (the partitioned parameters are gathered by hooks "
             f"that the compiled graph does not see); use zero_stage 0-2 or train.compile=none")
    _require(c.every_steps >= 0 and c.every_minutes >= 0, "checkpoint.every_steps",
             "checkpoint.every_steps and checkpoint.every_minutes must be >= 0 (0 = off)")
    _require(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    _require(w.mode in WANDB_MODES, "wandb.mode", f"must be one of {WANDB_MODES}, got {w.mode!r}")
    _require(w.finish_timeout_s >= 0, "wandb.finish_timeout_s", f"must be >= 0 (0: no limit), got {w.finish_timeout_s}")
    _require(bool(r.dir), "run.dir", "must name the run directory")
    _require(r.log_every_steps > 0, "run.log_every_steps", "must be a positive integer")
    for key in ("profile_steps", "profile_after_steps"):
        _require(getattr(r, key) >= 0, f"run.{key}", f"must be >= 0, got {getattr(r, key)}")
    _require(bool(cfg.data.train_shards), "data.train_shards", "give at least one shard spec to train on")
    return cfg


def gradient_accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step, from ``train.global_batch_size`` (validated by :func:`validate_config`)."""
    micro = cfg.data.batch_size * world_size
    return max(1, cfg.train.global_batch_size // micro)


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step over every rank: ``train.global_batch_size``, or one micro-batch per rank."""
    return cfg.data.batch_size * world_size * gradient_accumulation_steps(cfg, world_size)

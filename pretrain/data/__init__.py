"""The WebDataset stream: shard specs -> per-rank, per-worker readers -> decode, transform, mask -> batches.

``DataStream(data_cfg, model_cfg, rank, world_size)`` is the training stream (``for batch in stream`` yields one
epoch, resumable exactly); ``ValidationPass(data_cfg, model_cfg, rank, world_size)`` yields every validation sample
once. This package imports ``pretrain.config``, ``pretrain.vocab``, ``pretrain.shard_format``, ``pretrain.shards``
(shard specs and reading, shared with ``data_prep``) and ``pretrain.modalities`` (each modality's decode, transform,
masking and stacking), never ``pretrain.model``.

Sample schema (webdataset keys, any subset per sample): those of the modalities (``pretrain.shard_format``: ``txt``
UTF-8 text, ``png``/``jpg`` image, ``flac``/``wav`` audio, ``npy`` (T, H, W, C uint8) or ``mp4`` video, ...; each
unit of ``pretrain.modalities`` says what it reads), ``cls`` integer label, ``json`` metadata (not read).

Batch contract (B = ``data.batch_size``; shapes from the ``ModelConfig``; a modality's keys appear only when the run
reads it: the model enables it and ``data.objective`` names it, or is empty; ``array`` inputs are not streamed):

``batch["inputs"]`` -- for ``PerceiverIO.encode``:
    ``text`` long [B, S] (S = model.text.max_length): UTF-8 byte ids (``vocab.encode_utf8``), positions to predict
    replaced by ``vocab.MASK_ID``, padding ``vocab.PAD_ID``; ``text_mask`` bool [B, S], False on padding and for rows
    without text.
    ``image`` float [B, C, H, W], ``(pixel/255 - data.pixel_mean) / data.pixel_std``, zeros where absent;
    ``image_mask`` bool [B, patches], False where the row has no image or the patch is hidden for reconstruction.
    ``audio`` float [B, num_samples] mono at ``data.audio_sample_rate``, zero-padded; ``audio_mask`` [B, patches],
    also False on patches wholly in the padding.
    ``video`` float [B, T, C, H, W] normalised like images; ``video_mask`` [B, tubelets].
    Every other patch modality alike: its raw values (its unit says their shape) and a [B, patches] key mask.
    Hidden patches keep their values in the input tensors (the key mask hides them).
``batch["decode"]`` -- positions to predict, long [B, P_mod] with a fixed P_mod = round(ratio x positions) per
    modality (``data.masking``; a ratio of 0, or the role ``input``, leaves the modality out), and ``label`` [B, 1]
    zeros when the label is a target. Padding slots hold 0.
``batch["decode_mask"]`` -- bool [B, P_mod], False on padding slots and for rows lacking the modality.
``batch["targets"]`` -- ``text`` long [B, P_text], the original ids at the decoded positions, -100 on padding slots;
    ``label`` long [B], -100 when absent (only when the label is a target); each patch modality's float
    [B, P_mod, values], the original values of the patches at the decoded positions (``pretrain.modalities.patched``),
    each patch normalised to mean 0 and standard deviation 1 with ``data.masking.normalized_patches``.
``batch["keys"]`` -- list of the B samples' ``__key__`` (``""`` for a padding row).
``batch["valid"]`` -- bool [B]; False for a row whose sample failed to decode (skipped and counted: the row stays,
    empty, so that a batch is always exactly B raw samples -- see ``stream.py`` for why) and for the padding rows
    of a validation pass's last batch.
"""

from .collate import IGNORE_INDEX, BatchBuilder
from ..shards import DataError, Shard, expand_spec, listed_classes
from .plan import check_before_start, saved_streams
from .stream import DataStream, ValidationPass

__all__ = ["DataStream", "ValidationPass", "DataError", "BatchBuilder", "IGNORE_INDEX", "Shard", "check_before_start",
           "expand_spec", "listed_classes", "saved_streams"]

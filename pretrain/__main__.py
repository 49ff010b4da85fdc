"""The ``pretrain`` command line (also the ``perceiver-pretrain`` console script).

    python -m pretrain train --config configs/demo.yaml [key=value ...] [--resume auto|none|PATH] [--print-config]
    python -m pretrain export runs/demo --out exported/demo [--hf exported/demo-hf] [--hf-encoder DIR]

``train`` exit codes: 0 trained to ``train.max_steps`` (or found the run there already: it says so and starts
nothing); 2 a bad config, data path or checkpoint path (before any
training, the message names the key); 3 training diverged (a non-finite loss or gradient norm): nothing was saved
after it, do not requeue, resume from the last checkpoint or an earlier one with changed ``optim`` settings (a resumed
run takes its optimizer settings from its config); 143 SIGUSR1/SIGTERM came (caught from the process's first lines)
and a checkpoint was written, or nothing had been trained yet: requeue the job and it resumes; anything else is a
failure (the last complete checkpoint stays the ``latest``).

``export`` writes the fp32 weights of a run's latest checkpoint (or of the checkpoint directory or tag given) as a
model directory that ``pretrain.load_pretrained`` loads, and with ``--hf`` as a transformers ``PerceiverForMaskedLM``
directory (text-only MLM models), with ``--hf-encoder`` as the text encoder alone for transformers' other heads; exit 2
names a path or config that cannot be exported.

A process that seems stuck prints the Python stack of every thread to its stderr on ``kill -USR2 <pid>`` and keeps
running; so do its data-loader workers (the grandchildren of the trainer, under its multiprocessing fork server).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from pretrain.preemption import Preemption

EXIT_BAD_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="pretrain a Perceiver IO with DeepSpeed (one process per device)")
    train.add_argument("--config", required=True, help="YAML file of the schema in pretrain/config.py")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    train.add_argument("--resume", default="auto",
                       help="auto: continue the run directory's latest checkpoint if any (default); none: start fresh "
                            "(refused when the run directory has checkpoints); PATH: a checkpoint tag directory, or a "
                            "checkpoints or run directory whose 'latest' file names one")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    export = commands.add_parser("export", help="a training checkpoint -> a model directory to fine-tune from")
    export.add_argument("checkpoint", type=Path,
                        help="a run directory or a checkpoint directory (their latest checkpoint), or a tag directory")
    export.add_argument("--out", required=True, type=Path,
                        help="new directory for our format (model.safetensors + config.yaml; pretrain.load_pretrained)")
    export.add_argument("--hf", type=Path, help="also this new directory as a transformers PerceiverForMaskedLM "
                                                "(text-only MLM models)")
    export.add_argument("--hf-encoder", type=Path,
                        help="also this new directory as the text encoder alone, in transformers' names: "
                             "PerceiverForSequenceClassification.from_pretrained(DIR, num_labels=K) loads it with "
                             "only its decoder new and nothing unused (text-only models)")
    return parser


def report_before_training(message: str) -> None:
    """A mistake found before training, said once: every rank finds it, rank 0 prints it. Under torchrun rank 0 also
    leaves it in its error file (``TORCHELASTIC_ERROR_FILE``, torchelastic's own contract), and the other ranks of its
    node wait to be ended (``_await_torchrun_ending``): the summary torchrun prints last then names rank 0's failure as
    the root cause, not another rank's that happened to exit first."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if "SLURM_STEP_ID" in os.environ else None)
    if rank not in (None, "0"):
        _await_torchrun_ending()
        return
    print(f"error: {message}", file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps({"message": f"error: {message}", "timestamp": int(time.time())}))


def _await_torchrun_ending(timeout_s: float = 60.0) -> None:
    """On rank 0's node torchrun sees rank 0 fail, then terminates the others (SIGTERM): its failures are then in
    that order whatever the timing. A rank waits for that SIGTERM, at most ``timeout_s``; ranks of other nodes, whose
    torchrun never sees rank 0, and ranks not under torchrun exit at once."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("GROUP_RANK") != "0":
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigtimedwait({signal.SIGTERM}, timeout_s)


def quiet_deepspeed() -> None:
    """DeepSpeed's start-up noise that we can configure: without a GPU its accelerator is named (else each import
    warns "Setting accelerator to CPU ... we were unable to detect it"), and its ZeRO optimizers' use of
    ``all_gather_into_tensor``, which torch 2.13 deprecates, is not warned about at every step."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def train_command(config: str, overrides: Sequence[str], resume: str, print_config: bool,
                  preemption: Preemption) -> int:
    from launch.env import detect_env
    from omegaconf import OmegaConf

    quiet_deepspeed()

    from pretrain.config import config_to_dict, load_config, validate_config
    from pretrain.model.hf import export_refusal
    from pretrain.start import decide_start

    try:
        cfg = load_config(config, overrides)
        env = detect_env()
        validate_config(cfg, env.world_size)
        if print_config:
            refusal = export_refusal(cfg.model)
            print(OmegaConf.to_yaml(config_to_dict(cfg)) + (f"# {refusal}\n" if refusal else ""), end="")
            return 0
        start = decide_start(cfg, env.world_size, resume)
        if start.step >= cfg.train.max_steps:
            if env.rank == 0:
                print(f"run already at train.max_steps={cfg.train.max_steps} ({start.resume_from}): nothing to "
                      f"train (raise train.max_steps to continue)", file=sys.stderr)
            return 0
    except ValueError as exc:  # ConfigError, DataError, CheckpointError and launch's environment errors
        report_before_training(str(exc))
        return EXIT_BAD_CONFIG
    from pretrain.train import train

    faulthandler.register(signal.SIGUSR2, all_threads=True)
    return train(cfg, env, start, preemption)


def export_command(checkpoint: Path, out: Path, hf_out: Optional[Path], hf_encoder_out: Optional[Path]) -> int:
    from pretrain.export import export_checkpoint

    quiet_deepspeed()
    try:  # DeepSpeed's log (its handler takes stdout at import) and prints: stdout holds the result line alone
        with contextlib.redirect_stdout(sys.stderr):
            exported = export_checkpoint(checkpoint, out, hf_out, hf_encoder_out)
    except ValueError as exc:  # ExportError, and ConfigError for a config the checkpoint holds
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"exported step {exported.step} ({exported.tag_dir}) to {', '.join(map(str, exported.directories))}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "export":
        return export_command(args.checkpoint, args.out, args.hf, args.hf_encoder)
    preemption = Preemption()  # first, before torch is imported: see pretrain.preemption
    try:
        return train_command(args.config, args.overrides, args.resume, args.print_config, preemption)
    finally:
        preemption.restore()


if __name__ == "__main__":
    sys.exit(main())

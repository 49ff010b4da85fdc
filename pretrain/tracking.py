"""Experiment tracking: the run's ``metrics.jsonl`` and Weights & Biases, on rank 0 only.

``metrics.jsonl`` (one JSON object per logged step, ``step`` first) is written in every W&B mode, flushed on every
line, so a killed run keeps all it logged; a resumed run first drops the lines after its checkpoint's step (and a
fresh start the whole file), so the file ends up identical to an uninterrupted run's. Non-finite values are written
as ``NaN``/``Infinity``, which Python's ``json`` reads back.

W&B (``wandb.mode``): ``online``, ``offline`` or ``disabled`` (wandb is then never imported: the GPU image lacks it).
``online`` without credentials, or with a server that cannot be reached within ``init_timeout``, logs offline instead,
with one warning; offline runs never touch the network and are uploaded later with ``wandb sync <run>/wandb/offline-*``.
W&B's files go under ``<run_dir>/wandb/``; the run id is kept in ``<run_dir>/wandb_run_id`` and in the checkpoint
(``state_dict``), so a resumed run continues the same W&B run.

W&B never stops training once its run has started: a failing W&B call (above all, W&B's service process ended: Slurm
signals every process of a job it requeues, preempts or cancels, and the service exits on SIGTERM, wandb/wandb#9963)
is logged once and W&B is off for the rest of the process, so the ranks still checkpoint after the signal;
``metrics.jsonl`` keeps every step, and the requeued job continues the W&B run from its checkpoint's step. W&B's
own record loses what its service had not written yet.

Metric names the console line knows (:func:`format_metrics`); W&B groups names by their ``/`` prefix:
``loss``, ``loss/<modality>``, ``val/loss``, ``val/loss/<modality>``, ``val/accuracy`` (top-1; per class
``val/accuracy/<class>`` is logged, not printed), ``lr``, ``grad_norm``, ``samples_per_s``,
``data_wait_frac`` (fraction of the wall time spent waiting for batches). Any other name is logged, not printed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import numbers
import os
import secrets
import string
from pathlib import Path
from typing import IO, Any, Mapping, Optional
from urllib.parse import urlsplit

from .atomic import write_text_atomically
from .config import WandbConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id"
DEFAULT_BASE_URL = "https://api.wandb.ai"
_ID_ALPHABET = string.ascii_lowercase + string.digits

# name -> how the console line shows it, in this order (after the losses).
_CONSOLE = {
    "val/accuracy": "val top-1 {:.2%}",
    "lr": "lr {:.2e}",
    "grad_norm": "grad {:.3g}",
    "samples_per_s": "{:.1f} samples/s",
    "data_wait_frac": "data wait {:.1%}",
}


def wandb_credentials_found(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether W&B could authenticate without a prompt: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or a netrc entry
    (``NETRC`` or ``~/.netrc``, as ``wandb login`` writes it) for the host of WANDB_BASE_URL."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).netloc
    path = Path(environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _share(metrics: Mapping[str, float], modality: str) -> str:
    """" on 40% of steps" for a training loss part that not every step had (``loss_share/<modality>``)."""
    share = metrics.get(f"loss_share/{modality}")
    return "" if share is None else f" on {share:.0%} of steps"


def format_metrics(metrics: Mapping[str, float], step: int, max_steps: int) -> str:
    """One console line: step, losses (per modality in parentheses, with the share of steps that had it where not
    all did: the total is the sum of weight x share x loss), the validation samples scored, then lr, grad norm,
    throughput, data wait."""
    parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}"]
    for loss in ("loss", "val/loss"):
        if loss in metrics:
            training = loss == "loss"
            per = [f"{key[len(loss) + 1:]} {value:.4f}{_share(metrics, key[len(loss) + 1:]) if training else ''}"
                   for key, value in metrics.items() if key.startswith(loss + "/")]
            scored = "" if training or "val/samples" not in metrics else f" on {int(metrics['val/samples'])} samples"
            parts.append(f"{loss} {metrics[loss]:.4f}" + (f" ({', '.join(per)})" if per else "") + scored)
    parts.extend(fmt.format(metrics[key]) for key, fmt in _CONSOLE.items() if key in metrics)
    return " | ".join(parts)


class Tracker:
    """``metrics.jsonl`` plus W&B for one run; on every rank but 0 each method does nothing.

    ``resume_step`` is the step of the checkpoint being resumed (the number of optimizer steps it holds): the lines
    above it in ``metrics.jsonl`` are dropped, because the resumed run logs them anew, and the W&B run of
    ``<run_dir>/wandb_run_id`` continues. ``None`` is a fresh start: a new W&B run and a new ``metrics.jsonl`` (a run
    killed before its first checkpoint starts over). The W&B run starts at the first :meth:`log`, so a checkpoint's
    run id given to :meth:`load_state_dict` after construction is still the one used.
    """

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: Path,
        rank: int,
        config: dict,
        run_name: str = "",
        resume_step: Optional[int] = None,
        init_timeout: float = 30.0,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.config = config
        self.run_name = run_name
        self.init_timeout = init_timeout
        self.run_id: Optional[str] = None
        self._run: Any = None
        self._wandb_failed = False
        self._metrics: Optional[IO[str]] = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / RUN_ID_FILE
        if resume_step is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip() or None
        if self.run_id is None and cfg.mode != "disabled":
            self.run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
        metrics_path = self.run_dir / METRICS_FILE
        if resume_step is None:
            metrics_path.unlink(missing_ok=True)
        else:
            _keep_complete_lines(metrics_path, resume_step)
        self._metrics = metrics_path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One line in ``metrics.jsonl`` (flushed) and one W&B history row at ``step``. Values must be numbers
        (Python, numpy or one-element tensors); they are stored as int or float."""
        if self.rank != 0:
            return
        if "step" in metrics:
            raise ValueError("Tracker.log: metric name 'step' is reserved; pass the step as the step argument")
        if self._metrics is None:
            raise RuntimeError("Tracker.log after Tracker.finish()")
        values = {key: _number(key, value) for key, value in metrics.items()}
        self._metrics.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics.flush()
        if self.cfg.mode == "disabled" or self._wandb_failed:
            return
        if self._run is None:
            self._run = self._start_wandb()
        try:
            self._run.log(values, step=step)
        except Exception as exc:  # noqa: BLE001 -- any W&B failure: see the module docstring
            self._wandb_failure(exc, f"at step {step}")

    def finish(self, exit_code: int = 0) -> None:
        """Close ``metrics.jsonl`` and end the W&B run (``exit_code`` != 0 marks it failed). Safe to call twice.
        W&B's service is shut down too: ``run.finish`` alone returns before its files are written."""
        if self._run is not None:
            import wandb

            try:
                self._run.finish(exit_code=exit_code)
                self._run = None
                wandb.teardown()
            except TimeoutError:  # wandb.finish_timeout_s: the rest waits on disk
                self._drop_wandb()
                log.warning("W&B did not finish uploading within wandb.finish_timeout_s=%s; the rest is under %s: "
                            "upload it with `wandb sync`", self.cfg.finish_timeout_s, self.run_dir / "wandb")
            except SystemExit as exc:  # wandb exits the process when its service failed; the run must go on
                log.warning("W&B's service exited with code %s: its files under %s/wandb may be incomplete",
                            exc.code, self.run_dir)
            except Exception as exc:  # noqa: BLE001 -- as in log()
                self._wandb_failure(exc, "at the end of the run")
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def _drop_wandb(self) -> None:
        """W&B off for the rest of the process, its process-wide state (which names the service) dropped."""
        import wandb

        self._run, self._wandb_failed = None, True
        with contextlib.suppress(Exception, SystemExit):
            wandb.teardown()

    def _wandb_failure(self, exc: Exception, when: str) -> None:
        self._drop_wandb()
        log.warning("W&B failed %s (%s: %s), most likely because its service process ended (a Slurm requeue, "
                    "preemption or scancel signals it too). W&B is off for the rest of this process; %s keeps "
                    "every step, and a resumed run continues W&B run %s", when, type(exc).__name__, exc,
                    self.run_dir / METRICS_FILE, self.run_id)

    def state_dict(self) -> dict:
        """The W&B run id, for the checkpoint's client state."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the checkpoint's W&B run; call it before the first :meth:`log`."""
        run_id = state.get("run_id")
        if not run_id or run_id == self.run_id:
            return
        if self._run is not None:
            raise RuntimeError(f"Tracker.load_state_dict: W&B run {self.run_id} already started; load the "
                               f"checkpoint's tracker state (run {run_id}) before the first log()")
        self.run_id = run_id

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def _start_wandb(self) -> Any:
        """``wandb.init`` for this run id with resume="allow"; online falls back to offline rather than fail."""
        # W&B's own error reporting and telemetry would contact its servers even from an offline run (a DNS lookup
        # that hangs without internet); set WANDB_ERROR_REPORTING=true to keep them.
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        mode = self.cfg.mode
        if mode == "online" and not wandb_credentials_found():
            log.warning("wandb.mode=online but no W&B API key (WANDB_API_KEY, or `wandb login` for a netrc entry): "
                        "logging offline under %s/wandb; upload later with `wandb sync`", self.run_dir)
            mode = "offline"
        if mode == "online":
            try:
                return self._init_wandb(wandb, mode)
            except wandb.errors.Error as exc:
                log.warning("W&B online start failed (%s): logging offline under %s/wandb; upload later with "
                            "`wandb sync`", str(exc).splitlines()[0], self.run_dir)
                wandb.teardown()  # the wandb service still holds the failed run's id
        return self._init_wandb(wandb, "offline")

    def _init_wandb(self, wandb: Any, mode: str) -> Any:
        run = wandb.init(
            mode=mode,
            dir=str(self.run_dir),
            project=self.cfg.project,
            entity=self.cfg.entity,
            tags=list(self.cfg.tags),
            name=self.run_name or None,
            id=self.run_id,
            resume="allow",
            config=self.config,
            settings=wandb.Settings(console="off", init_timeout=self.init_timeout,
                                    finish_timeout=self.cfg.finish_timeout_s, finish_timeout_raises=True),
        )
        write_text_atomically(self.run_dir / RUN_ID_FILE, run.id + "\n")
        return run


def _number(key: str, value: Any) -> float | int:
    """A JSON-ready number: ints stay ints (bools too are numbers here), everything else becomes a float."""
    if isinstance(value, numbers.Integral):
        return int(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Tracker.log: metric {key!r} is {value!r}, not a number; log floats or ints "
                        "(e.g. tensor.item())") from None


def _keep_complete_lines(path: Path, resume_step: int) -> None:
    """Rewrite ``path`` without steps after ``resume_step`` and without a torn last line (a kill mid-write);
    untouched when there is nothing to drop."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if line.endswith("\n") and step <= resume_step:
            kept.append(line)
    if "".join(kept) != text:
        write_text_atomically(path, "".join(kept))



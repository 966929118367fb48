"""The LightningCLI: `python -m medassist fit|validate|test|predict --config configs/lora.yaml [--key value ...]`
(reached through medassist/commands.py, the one entry point).

LightningCLI builds the parser from the typed __init__ signatures of MedAssistLM and InstructionDataModule, and
saves the resolved config as `config.yaml` in each run's directory. This file adds only what is ours: the base
model given once, `--ckpt_path last` meaning "the newest run of this name", checks of the output directory and of
the strategy before training, and checkpoint files written atomically.
"""

import json
import logging
import shutil
import signal
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medassist import UserError
from medassist.data import InstructionDataModule
from medassist.callbacks import AtomicCheckpointIO
from medassist.model import MedAssistLM

log = logging.getLogger("medassist")

MIN_FREE_BYTES = 512 * 2**20  # checkpoints of an adapter + optimizer state are tens of MB; leave room for many
TRACKERS_FILE = "trackers.json"  # in the TensorBoard run directory: the MLflow/W&B run ids a resume continues
# The init argument of each tracker's logger that names the run to continue (W&B's logger already passes
# resume="allow" to wandb.init).
TRACKER_RUN_ARGS = {"MLFlowLogger": "run_id", "WandbLogger": "id"}


class MedAssistCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # Say the base model once: the data side needs its tokenizer.
        parser.link_arguments("model.base_model", "data.base_model")

    def before_instantiate_classes(self):
        check_strategy(self.config[self.subcommand])
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self._resolve_last(self.config.fit)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default, not a plugin the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _resolve_last(self, config):
        """`--ckpt_path last` resumes the newest version of the run that has a last.ckpt, in that same directory."""
        logger = config.trainer.get("logger")
        if isinstance(logger, list):  # TensorBoard + a tracker (configs/mlflow.yaml): the first names the run directory
            logger = logger[0] if logger else None
        args = getattr(logger, "init_args", None)
        if args is None:
            return  # no TensorBoard logger configured: let Lightning look for last.ckpt itself
        run = Path(args.save_dir) / args.name
        # last-v1.ckpt: Lightning's name for it when a last.ckpt it did not write is in the way (a copied run)
        found = sorted(run.glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            log.warning("no last.ckpt under %s: starting a new run", run)
            config.ckpt_path = None
            return
        config.ckpt_path = str(found[-1])
        args.version = found[-1].parent.parent.name
        log.info("resuming from %s", config.ckpt_path)
        resume_trackers(config.trainer.get("logger"), found[-1].parent.parent / TRACKERS_FILE)

    def predict(self, model, datamodule, ckpt_path=None, **kwargs):
        """Lightning's predict loop, then the answer records written to data.predict_output as JSONL."""
        from medassist.files import write_jsonl_atomic

        batches = self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        records = [record for batch in batches for record in batch]
        write_jsonl_atomic(datamodule.predict_output, records)
        print(f"wrote {len(records)} answers to {datamodule.predict_output}", file=sys.stderr)

    def before_fit(self):
        # Only the writer checks: other ranks would race on the probe file and create a stray version_N directory.
        if self.trainer.is_global_zero:
            check_writable(Path(self.trainer.log_dir or self.trainer.default_root_dir))
            save_tracker_runs(self.trainer)


def _tracker_kind(logger) -> str | None:
    """MLFlowLogger / WandbLogger for a logger or its config entry; None for TensorBoard and the rest."""
    name = str(getattr(logger, "class_path", type(logger).__name__)).rsplit(".", 1)[-1]
    return name if name in TRACKER_RUN_ARGS else None


def resume_trackers(loggers, saved: Path) -> None:
    """Point the MLflow and W&B loggers of a resumed fit at the runs the first fit logged to, so their curves
    continue in one run as TensorBoard's do, instead of starting a new run at the resumed step. A run id the user
    gave in the config wins."""
    if not isinstance(loggers, list) or not saved.is_file():
        return
    runs = json.loads(saved.read_text(encoding="utf-8"))
    for logger in loggers:
        kind = _tracker_kind(logger)
        if kind in runs and getattr(logger.init_args, TRACKER_RUN_ARGS[kind], None) is None:
            setattr(logger.init_args, TRACKER_RUN_ARGS[kind], runs[kind])
            log.info("continuing the %s run %s", kind.removesuffix("Logger"), runs[kind])


def save_tracker_runs(trainer) -> None:
    """The tracker runs of this fit, beside its checkpoints, for resume_trackers."""
    runs = {kind: str(logger.run_id if kind == "MLFlowLogger" else logger.experiment.id)
            for logger in trainer.loggers if (kind := _tracker_kind(logger))}
    if runs and trainer.log_dir:
        (Path(trainer.log_dir) / TRACKERS_FILE).write_text(json.dumps(runs) + "\n", encoding="utf-8")


def check_strategy(config) -> None:
    """Refuse int8 + FSDP before any process starts or model loads: 8-bit bitsandbytes weights cannot be sharded."""
    strategy = config.trainer.get("strategy")
    if "fsdp" in str(getattr(strategy, "class_path", strategy)).lower() and config.model.quantization == "int8":
        raise UserError("quantization int8 does not work with FSDP: bitsandbytes keeps 8-bit weights as int8 tensors "
                        "that FSDP cannot shard (bitsandbytes #466, #1709). Use --model.quantization nf4 (QLoRA, as "
                        "configs/fsdp.yaml does) or none, or keep int8 with configs/ddp.yaml or configs/deepspeed.yaml")


def check_writable(directory: Path) -> None:
    """Fail before training, not after an hour, if checkpoints cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write checkpoints to {directory}: {e.strerror}; pick another trainer.logger "
                        f"save_dir or free the directory") from None
    free = shutil.disk_usage(directory).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"only {free / 2**20:.0f} MiB free at {directory}; checkpoints need at least "
                        f"{MIN_FREE_BYTES / 2**20:.0f} MiB. Free space or write elsewhere")


def main(args=None) -> None:
    """LightningCLI; exits 2 on a UserError (one line, as every command shows it) and 1 on a NaN/infinite loss."""
    given = sys.argv[1:] if args is None else list(args)
    command = given[0] if given else "fit"
    try:
        MedAssistCLI(MedAssistLM, InstructionDataModule, save_config_kwargs={"overwrite": True}, args=args)
    except UserError as e:
        print(e.line(command), file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # not the user's doing: exit 1, in the words the NaN tests and scripts look for
        print(f"medassist: error: {e}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:  # Lightning exits 0 here; a scheduler or script must see that the run did not finish
        print("medassist: stopped by SIGTERM; `fit ... --ckpt_path last` resumes", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)

"""DVC stage `train@<variant>`: train the dual encoder, writing models/<variant>/{best,last,state}.

The variant (params.yaml `variants.<name>`) names the folder of training shards and its online PDG.
That folder is data/prepared for the baseline, and original plus proximity pairs for pdg.
Validation always uses data/prepared's val split."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.checkpointing import StateError
from pipeline.core.config import ConfigError, FieldError
from pipeline.core.io import write_bytes_atomic, write_json_atomic
from pipeline.plots import plot_training_curves
from pipeline.core.runtime import start_stage
from pipeline.optimization import make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import NonFiniteLossError, Trainer


log = logging.getLogger("stages.train")


def _write_reports(progress, timing: list[dict], metrics: Path, reports: Path, variant: str) -> None:
    """The metrics file (what was learned) and the reports, among them the epochs' timings (written
    to <reports>/timing.json as each epoch ends, never under models/, where a clock figure would
    change the output's hash)."""
    best = next(e for e in progress.epochs if e["epoch"] == progress.best_epoch)
    summary = {
        "best_epoch": progress.best_epoch,
        "best_val_R1": best["val_R1"],
        "best_val_mAP": best["val_mAP"],
        "final_train_loss": progress.epochs[-1]["train_loss"],
        "steps": progress.global_step,
        "skipped_batches": progress.skipped_batches,
    }
    write_json_atomic(metrics, summary)
    timing_of = {t["epoch"]: t for t in timing}
    write_json_atomic(reports / "epochs.json", [{**timing_of.get(e["epoch"], {}), **e} for e in progress.epochs])
    steps_csv = "step,loss\n" + "".join(f"{step},{loss:.6f}\n" for step, loss in progress.losses)
    write_bytes_atomic(reports / "steps.csv", steps_csv.encode())
    plot_training_curves(progress.losses, progress.epochs, reports / "curves.png", f"train@{variant}")


def main() -> int:
    args, params = start_stage("train", __doc__, with_variant=True, paths=("prepared", "model", "metrics", "reports"), launcher=True)
    try:
        accelerator = make_accelerator(params)
        try:
            trainer = Trainer(params, args.prepared, RunFolder(args.model), accelerator,
                              params.variant(args.variant), timing_file=args.reports / "timing.json")
        except FieldError as err:  # a check on the variant's settings: name them in full
            raise err.under(f"variants.{args.variant}") from None
        progress = trainer.fit()
    except (ConfigError, NonFiniteLossError, FileNotFoundError, StateError) as err:
        log.error("%s", err)
        return 1
    if accelerator.is_main_process:
        _write_reports(progress, trainer.timing, args.metrics, args.reports, args.variant)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())

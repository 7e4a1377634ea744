"""wandb on rank 0 (the only module that imports wandb). Offline by default: no network, no key."""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("mmpretrain.wandb")


class WandbLogger:
    """Logs metric dicts to a wandb run that a resumed job continues (same id)."""

    def __init__(self, mode: str, project: str, name: str, run_dir: str | os.PathLike,
                 config: dict[str, Any], enabled: bool = True):
        self.run = None
        if not enabled or mode == "disabled":
            return
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                              dir=str(run_dir), mode=mode, config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        log.info("wandb %s run %s in %s", mode, run_id, self.run.dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log one step's metrics."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        """Flush and close the run."""
        if self.run is not None:
            self.run.finish()
            self.run = None

"""Orbax checkpoints of a LoRA run: adapters, optimizer state, step and PRNG key (``state``)
plus JSON metadata (``meta``), saved asynchronously; ``--resume`` restores the latest exactly."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpoints:
    """Orbax checkpoints of a run under ``directory`` (see module doc)."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        self.manager.reload()
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Start saving (async: returns once the arrays are copied off the device)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

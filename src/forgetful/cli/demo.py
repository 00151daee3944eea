"""``forgetful demo``: the whole project at small scale on the embedded data, offline, on a CPU."""

from __future__ import annotations

from ..demo import DemoConfig, run_demo

ARGUMENTS = (DemoConfig,)


def run(config: DemoConfig) -> dict:
    return run_demo(config)

"""M2/M3 set-up on an engine core's decode graphs: partitions, pipelined graphs, the calibrated plan, and why.

A requested pipeline that cannot run, or that the planner never picks, says so once (one WARNING naming
the reason and the path decode uses instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from splitserve.config import EngineConfig

logger = logging.getLogger("splitserve")


def check_split(config: EngineConfig, device: torch.device) -> int | None:
    """The user's memory-partition size, checked against this GPU before any memory is taken (None: not
    given, so the planner calibrates candidate splits; or no pipeline)."""
    from splitserve.pipeline import green

    if not (config.enable_decode_pipeline and device.type == "cuda"):
        return None
    total = torch.cuda.get_device_properties(device).multi_processor_count
    return green.check_split(config.decode_memory_sm, config.decode_compute_sm, total)[0]


@dataclass
class DecodePipeline:
    """The pipeline's status (requested, active, reason, plan report) and the partitions its graphs use."""
    status: dict
    partitions: dict = field(default_factory=dict)  # DecodePath -> green.SMPartition, kept alive

    def stats(self, graphs) -> dict:
        out = dict(self.status)
        if graphs is not None and graphs.planner is not None:
            out["planner"] = graphs.planner.summary()
        if graphs is not None and graphs.profiler is not None:
            out["profile"] = graphs.profiler.summary()
            out["profile_records"] = list(graphs.profiler.records)[-256:]  # all kept: graphs.profiler.records
        return out


def setup_decode_pipeline(runner, config: EngineConfig, memory_sm: int | None) -> DecodePipeline:
    from splitserve.pipeline import green, planner
    from splitserve.worker.decode_graphs import pipeline_path

    status = {"requested": config.enable_decode_pipeline, "active": False, "reason": "not requested"}
    if not config.enable_decode_pipeline:
        return DecodePipeline(status)
    graphs = runner.graphs
    ok, reason = green.capability(runner.device)
    if ok and graphs is None:
        ok, reason = False, "enforce_eager=True, and the pipeline runs only as CUDA graphs"
    partitions = {}
    if ok:
        total = torch.cuda.get_device_properties(runner.device).multi_processor_count
        try:
            for sm in [memory_sm] if memory_sm else planner.candidate_splits(total):
                part = green.split(runner.device, sm)
                partitions[pipeline_path(part.memory_sm, part.compute_sm)] = part
            graphs.planner, report = planner.build_planner(graphs, partitions, planner.model_shape(runner.hf_config),
                                                           str(runner.dtype))
            status.update(report)
        except RuntimeError as e:  # the driver refused a partition or a capture: plain graphs still run
            graphs.planner, graphs.pipelined = None, {}
            ok, reason = False, f"setting up the pipeline failed: {e}"
    if ok and not graphs.pipelined:
        graphs.planner = None
        ok, reason = False, ("the planner measured plain CUDA graphs faster at every calibrated batch and "
                             f"context\n{status['plan']}")
    status["reason"] = "planner: pipelined where measured faster" if ok else reason
    status["active"] = ok
    if ok:
        logger.info("decode plan (%s; cached in %s):\n%s", "from cache" if status["plan_cached"] else
                    f"calibrated in {status['calibration_s']} s", status["plan_file"], status["plan"])
        return DecodePipeline(status, {p: partitions[p] for p, _ in graphs.pipelined})
    path = "plain CUDA graphs" if graphs is not None else (
        "eager (enforce_eager=True)" if config.enforce_eager else f"eager ({runner.device.type})")
    logger.warning("decode pipeline requested but not used: %s; decode runs %s", reason, path)
    return DecodePipeline(status)

"""Device memory between the rows of a benchmark that runs several in one process group."""
from __future__ import annotations

import gc

import torch
import torch.distributed as dist

__all__ = ["allocated_gib_per_rank", "allocator_events", "release_between_rows"]


def release_between_rows(device: torch.device) -> None:
    """Collect garbage, return cached blocks and reset the peak counters, so the next row's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_gib_per_rank(device: torch.device) -> list[float]:
    """``torch.cuda.memory_allocated`` of every rank in GiB (0 on CPU): what a previous row left on one rank shows
    up under the next row's peak there."""
    mine = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [float(x) for x in every]


def allocator_events(device: torch.device) -> tuple[int, int]:
    """``(cudaMalloc retries, cudaMalloc calls)`` of the caching allocator so far (0, 0 on CPU). A retry frees every
    cached block and synchronizes the device before allocating again: a stall inside the step that no schedule
    model sees. Calls after the warm-up mean the allocator is still growing (each one a host-side cudaMalloc)."""
    if device.type != "cuda":
        return 0, 0
    stats = torch.cuda.memory_stats(device)
    return int(stats.get("num_alloc_retries", 0)), int(stats.get("num_device_alloc", 0))

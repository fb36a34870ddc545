"""7: the Raspberry Pi projection. Scales the measured CPU figures by an assumed
single-core speed ratio per board (not measured here) into shares of one core
and of all cores, and the real-time load a board could carry.

Measures nothing itself; imports nothing of `edge_agent`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["project_pi"]

def project_pi(cpu: dict[str, Any], pi4_ratio: float, pizero_ratio: float) -> dict[str, Any]:
    """What the x86 CPU figures imply on a board `ratio` times slower per core.

    The Trio thread (Python: capture, ring, chunking, HTTP) must fit in one core;
    the encoders run in worker threads and may use the other cores. The maximum
    real-time load is how many such audio streams' worth of work the board
    could carry: the smaller of one core over the Trio thread's share and all
    cores over the whole agent's share.
    """
    boards: dict[str, dict[str, Any]] = {}
    # A device runs in real time: use that run's figures when there are some.
    realtime = "realtime_agent_cpu_s_per_audio_hour" in cpu
    prefix = "realtime_" if realtime else ""
    total = cpu[f"{prefix}agent_cpu_s_per_audio_hour"]
    trio_thread = cpu[f"{prefix}trio_thread_s_per_audio_hour" if realtime
                      else "agent_trio_thread_s_per_audio_hour"]
    for name, ratio, cores in (("pi4", pi4_ratio, 4), ("pi_zero_2w", pizero_ratio, 4)):
        core_share = total * ratio / 3600
        trio_share = trio_thread * ratio / 3600
        boards[name] = {
            "ratio_assumed": ratio, "cores": cores,
            "agent_cpu_s_per_audio_hour": round(total * ratio, 1),
            "opusenc_cpu_s_per_audio_hour": round(cpu["opusenc_cpu_s_per_audio_hour"] * ratio,
                                                  1),
            "agent_percent_of_one_core": round(100 * core_share, 1),
            "agent_percent_of_all_cores": round(100 * core_share / cores, 1),
            "trio_thread_percent_of_one_core": round(100 * trio_share, 1),
            "max_realtime_load": round(min(1 / max(trio_share, 1e-9),
                                           cores / max(core_share, 1e-9)), 2),
        }
    return {"assumption": (f"one core of this machine is {pi4_ratio:g}x a Pi 4 core "
                           f"(Cortex-A72 1.5 GHz) and {pizero_ratio:g}x a Pi Zero 2 W core "
                           "(Cortex-A53 1 GHz); not measured here"),
            "basis": "real-time run" if realtime else "fast run", "boards": boards}

"""Built-in clusters, usable by name wherever a cluster file is expected (the same as examples/clusters/*.yaml)."""

from __future__ import annotations

from typing import Any

CLUSTERS: dict[str, dict[str, Any]] = {
    "emulated8": {
        "name": "emulated8",
        "nodes": [
            {"name": "h100", "gpu": "H100", "count": 4},
            {"name": "a100", "gpu": "A100-40GB", "count": 2},
            {"name": "l4", "gpu": "L4", "count": 2},
        ],
        "inter_node_link": {"gb_s": 12.5, "latency_us": 15},
    },
    "h100x4_l4x4": {
        "name": "h100x4_l4x4",
        "nodes": [{"name": "h100", "gpu": "H100", "count": 4}, {"name": "l4", "gpu": "L4", "count": 4}],
        "inter_node_link": {"gb_s": 12.5, "latency_us": 15},
    },
}

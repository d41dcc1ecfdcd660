"""Same request and seed, same bytes, on one worker or on two (DESIGN.md section 3)."""

from __future__ import annotations

import requests

from tests.server_process import ServerProcess

REQUEST = {"prompts": ["a castle", "a ship at sea", "a portrait"], "num_images_per_prompt": 2, "seed": 2024}


def test_one_and_two_workers_give_identical_bytes(server: ServerProcess, two_workers: ServerProcess) -> None:
    two = two_workers
    health = requests.get(two.url + "/health", timeout=10).json()
    assert len(health["workers"]) == 2
    single = requests.post(server.url + "/generate", json=REQUEST, timeout=120).json()
    double = requests.post(two.url + "/generate", json=REQUEST, timeout=120).json()
    assert single["count"] == double["count"] == 6
    assert single["seeds"] == double["seeds"]
    assert single["images"] == double["images"]
    after = requests.get(two.url + "/health", timeout=10).json()
    assert all(worker["images_done"] > 0 for worker in after["workers"]), "both workers must have taken shards"

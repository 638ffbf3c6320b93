"""scripts/perf-analyzer's request data: Triton's serialized BYTES form and perf_analyzer's --input-data
JSON."""

from __future__ import annotations

import base64
import struct

from bench.perf_analyzer import input_data, parse_csv, serialize_bytes
from isekai.client import api


def test_bytes_elements_are_length_prefixed_little_endian():
    assert serialize_bytes(b"abc") == b"\x03\x00\x00\x00abc"
    assert serialize_bytes(b"", b"xy") == struct.pack("<I", 0) + struct.pack("<I", 2) + b"xy"


def test_input_data_sends_the_photo_as_b64_of_the_serialized_tensor_with_shapes():
    photo = b"\x89PNG fake photo bytes"
    data = input_data(photo, (200.0, 300.0), steps=3)
    (entry,) = data["data"]
    assert base64.b64decode(entry[api.IMAGE]["b64"]) == struct.pack("<I", len(photo)) + photo
    assert entry[api.IMAGE]["shape"] == [1]
    assert entry[api.POINTS] == {"content": [200.0, 300.0], "shape": [1, 2]}
    assert entry[api.LABELS] == {"content": [1], "shape": [1]}
    assert entry[api.STEPS] == {"content": [3], "shape": [1]}
    assert api.STEPS not in input_data(photo, (1.0, 2.0), steps=None)["data"][0]


def test_csv_latencies_become_ms():
    text = ("Concurrency,Inferences/Second,Client Send,p50 latency,p90 latency,p95 latency,p99 latency,"
            "Avg latency\n"
            "2,3.5,10,120000,150000,160000,200000,125000\n")
    row = parse_csv(text)
    assert row == {"concurrency": 2, "throughput_rps": 3.5, "p50_ms": 120.0, "p90_ms": 150.0, "p95_ms": 160.0,
                   "p99_ms": 200.0}

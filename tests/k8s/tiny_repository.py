"""A tiny Triton repository for the k8s tests: one Python-backend model that sleeps, behind an ensemble.

The ensemble is named like the public model (``isekai``) and the sleeper runs one instance without batching,
so concurrent requests queue in front of it exactly where the real pipeline's requests queue (in the
composing models, not in the ensemble itself). A ``configs/gpu.pbtxt`` beside the sleeper's config proves
which profile Triton loaded: the two configs differ only in the ``profile`` parameter the model reports back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from isekai import constants as C

SLEEPER = "sleeper"
PROFILE_OUTPUT = "profile"

_MODEL_PY = """
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.sleep_s = float(params["sleep_ms"]["string_value"]) / 1000.0
        self.profile = params["profile"]["string_value"]

    def execute(self, requests):
        responses = []
        for request in requests:
            time.sleep(self.sleep_s)  # the work: concurrent requests wait in Triton's queue meanwhile
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            profile = np.array([self.profile.encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("y", x), pb_utils.Tensor("{profile}", profile),
            ]))
        return responses
"""


def _sleeper_config(profile: str, sleep_ms: int) -> str:
    return f"""
name: "{SLEEPER}"
backend: "python"
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [
  {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "{PROFILE_OUTPUT}" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "sleep_ms" value: {{ string_value: "{sleep_ms}" }} }}
parameters {{ key: "profile" value: {{ string_value: "{profile}" }} }}
"""


_ENSEMBLE = f"""
name: "{C.ENSEMBLE_MODEL}"
platform: "ensemble"
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [
  {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "{PROFILE_OUTPUT}" data_type: TYPE_STRING dims: [ 1 ] }}
]
ensemble_scheduling {{ step [ {{
  model_name: "{SLEEPER}"
  model_version: -1
  input_map {{ key: "x" value: "x" }}
  output_map {{ key: "y" value: "y" }}
  output_map {{ key: "{PROFILE_OUTPUT}" value: "{PROFILE_OUTPUT}" }}
}} ] }}
"""


def write_tiny_repository(root: Path, sleep_ms: int = 20) -> Path:
    """Write the repository under ``root`` and return it; ``sleep_ms`` is the sleeper's time per request."""
    sleeper = root / SLEEPER
    (sleeper / C.MODEL_VERSION).mkdir(parents=True)
    (sleeper / "configs").mkdir()
    (sleeper / C.MODEL_VERSION / "model.py").write_text(_MODEL_PY.replace("{profile}", PROFILE_OUTPUT))
    (sleeper / "config.pbtxt").write_text(_sleeper_config("default", sleep_ms))
    (sleeper / "configs" / "gpu.pbtxt").write_text(_sleeper_config("gpu", sleep_ms))
    ensemble = root / C.ENSEMBLE_MODEL
    (ensemble / C.MODEL_VERSION).mkdir(parents=True)
    (ensemble / "config.pbtxt").write_text(_ENSEMBLE)
    return root


def infer_once(client, value: float = 1.0):
    """One request to the ensemble through a ``tritonclient.grpc.InferenceServerClient``; the result."""
    x = grpcclient.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.array([value], dtype=np.float32))
    return client.infer(C.ENSEMBLE_MODEL, [x], client_timeout=60)

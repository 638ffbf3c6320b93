"""A tiny Triton repository for the k8s tests: one Python-backend model that sleeps, behind an ensemble.

With ``bls=True`` the sleeper also calls a second Python model (``echo``) through BLS between its sleeps, as
the diffusion model calls ``unet``: a drain must let those calls through until the request is done.

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
ECHO = "echo"
BLS_CALLS = 3
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
        self.bls_model = params.get("bls_model", {}).get("string_value", "")

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            if not self.bls_model:
                time.sleep(self.sleep_s)  # the work: concurrent requests wait in Triton's queue meanwhile
            for _ in range({calls} if self.bls_model else 0):
                time.sleep(self.sleep_s / {calls})
                reply = pb_utils.InferenceRequest(
                    model_name=self.bls_model, requested_output_names=["y"], inputs=[pb_utils.Tensor("x", x)]
                ).exec()
                if reply.has_error():
                    raise pb_utils.TritonModelException(reply.error().message())
                x = pb_utils.get_output_tensor_by_name(reply, "y").as_numpy()
            profile = np.array([self.profile.encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("y", x), pb_utils.Tensor("{profile}", profile),
            ]))
        return responses
"""

_ECHO_PY = (
    """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", """
    """pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""
)

_ECHO_CONFIG = f"""
name: "{ECHO}"
backend: "python"
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _sleeper_config(profile: str, sleep_ms: int, bls_model: str = "") -> str:
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
parameters {{ key: "bls_model" value: {{ string_value: "{bls_model}" }} }}
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


def write_tiny_repository(root: Path, sleep_ms: int = 20, bls: bool = False) -> Path:
    """Write the repository under ``root`` and return it; ``sleep_ms`` is the sleeper's time per request,
    spread over :data:`BLS_CALLS` BLS calls to ``echo`` with ``bls``."""
    sleeper = root / SLEEPER
    (sleeper / C.MODEL_VERSION).mkdir(parents=True)
    (sleeper / "configs").mkdir()
    model_py = _MODEL_PY.replace("{profile}", PROFILE_OUTPUT).replace("{calls}", str(BLS_CALLS))
    (sleeper / C.MODEL_VERSION / "model.py").write_text(model_py)
    bls_model = ECHO if bls else ""
    (sleeper / "config.pbtxt").write_text(_sleeper_config("default", sleep_ms, bls_model))
    (sleeper / "configs" / "gpu.pbtxt").write_text(_sleeper_config("gpu", sleep_ms, bls_model))
    if bls:
        echo = root / ECHO
        (echo / C.MODEL_VERSION).mkdir(parents=True)
        (echo / C.MODEL_VERSION / "model.py").write_text(_ECHO_PY)
        (echo / "config.pbtxt").write_text(_ECHO_CONFIG)
    ensemble = root / C.ENSEMBLE_MODEL
    (ensemble / C.MODEL_VERSION).mkdir(parents=True)
    (ensemble / "config.pbtxt").write_text(_ENSEMBLE)
    return root


def infer_once(client, value: float = 1.0):
    """One request to the ensemble through a ``tritonclient.grpc.InferenceServerClient``; the result."""
    x = grpcclient.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.array([value], dtype=np.float32))
    return client.infer(C.ENSEMBLE_MODEL, [x], client_timeout=60)

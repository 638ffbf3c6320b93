"""``isekai export sam|lama|sd|demo``: each exporter registers its own flags and runs."""

from __future__ import annotations

import argparse
import importlib

# exporter -> module with add_arguments(parser) and main(args) -> int
EXPORTERS = {
    "sam": ("isekai.export.sam", "SAM .pth (vit_h/l/b, MobileSAM vit_t) -> sam_encoder + sam_decoder"),
    "lama": ("isekai.export.lama", "big-lama best.ckpt + config.yaml -> lama"),
    "esrgan": ("isekai.export.esrgan", "Real-ESRGAN .pth/.safetensors (RRDBNet x4/x2/x1) -> upscale"),
    "sd": ("isekai.export.sd",
           "diffusers SD 1.x folder -> text_encoder, unet, vae_encoder, vae_decoder (+ character)"),
    "demo": ("isekai.export.demo",
             "make small random-weight checkpoints in the real formats and export them"),
    "tensorrt": ("isekai.export.tensorrt", "build TensorRT fp16 plans from the exported ONNX (GPU only)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="exporter", required=True, metavar="WHAT")
    for name, (module, help_text) in EXPORTERS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_exporter=module)
        importlib.import_module(module).add_arguments(p)


def main(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._exporter).main(args) or 0)

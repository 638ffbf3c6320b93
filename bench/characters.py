"""Characters on the served UNet: ``python -m bench.characters [--size sd15] [--characters 10] [--runs 3]``.

What the characters issue asks to measure, on the full-size SD 1.5 UNet with random weights (they cost the
same to run as trained ones), served by a real tritonserver (the ``unet`` model of the default profile, called
over gRPC with the ``character`` input, exactly as the diffusion model calls it):

1. memory: the unet process's resident memory after one call of one LoRA character, then after one call of
   each of ``--characters`` more (per rank): the growth against the bytes of the adapters it had to load
   (goal: no more than the adapters' bytes + 5 %, i.e. N characters do not cost N UNets);
2. time: one UNet step (batch 2, the guidance pair, at 512x512's 64x64 latent) with a rank-4 and a rank-64
   adapter against the same served graph without one (goal: <= +10 %), and, in-process, the slotted graph
   without an adapter against the graph exported without slots (what the slots themselves cost);
3. a full fine-tune character: its first call (loading its own 3.4 GB graph), its steady step, and the memory
   it adds.

The base SD folder is ``bench.train_step``'s (``.cache/bench/train/<size>``); the repository, the characters
and a slot-free UNet graph are made once under ``.cache/bench/characters/<size>/``. Results go to
``bench/results/characters-<size>.md`` and ``.json`` (what this code wrote; never edited by hand).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.models import DEFAULT_CACHE, ROOT
from bench.timing import say
from bench.train_step import sd_folder

DEFAULT_OUTPUT = ROOT / "bench" / "results"
SERVED_MODELS = ("unet", "diffusion")  # diffusion only because the character data lives in its folder
BENCH_ADAPTER_BYTES = 16 * 2**30


def _repository(args: argparse.Namespace) -> tuple[Path, Path]:
    """The bench repository (unet + text_encoder graphs with slots, pipeline data, a base prompt character)
    and the slot-free UNet graph, made once."""
    from isekai import constants as C  # noqa: PLC0415
    from isekai.export import sd  # noqa: PLC0415
    from isekai.export.characters import add_prompt_character  # noqa: PLC0415
    from isekai.export.demo import copy_configs  # noqa: PLC0415

    root = args.cache / "characters" / args.size
    repository, plain = root / "repository", root / "plain-unet" / C.ONNX_FILENAME
    done = root / ".done"
    if done.is_file():
        return repository, plain
    shutil.rmtree(root, ignore_errors=True)
    folder = sd_folder(args.size, args.cache)
    copy_configs(root / "configs")
    for model in (*SERVED_MODELS, C.TEXT_ENCODER_MODEL):
        shutil.copytree(root / "configs" / model, repository / model)
    shutil.rmtree(root / "configs")
    # Room for every character's adapter: the memory rows measure what holding them costs, not the LRU budget
    # (2 GiB by default: 10 rank-64 SD 1.5 adapters are 2.6 GiB, and the budget would unload some of them).
    config = repository / C.UNET_MODEL / "config.pbtxt"
    text, n = re.subn(r'("character_adapter_bytes" value: \{ string_value: )"\d+"',
                      rf'\1"{BENCH_ADAPTER_BYTES}"', config.read_text())
    if n != 1:
        raise RuntimeError(f"{config} has no character_adapter_bytes parameter")
    config.write_text(text)
    graph = lambda m: repository / m / C.MODEL_VERSION / C.ONNX_FILENAME  # noqa: E731
    say("exporting the UNet and text encoder with LoRA slots (every Linear and Conv2d)")
    sd.export_graphs(sd.load_sd(folder), {m: graph(m) for m in (C.UNET_MODEL, C.TEXT_ENCODER_MODEL)}, "all")
    say("exporting the UNet without slots (the in-process baseline)")
    sd.export_graphs(sd.load_sd(folder), {C.UNET_MODEL: plain}, None)
    sd.write_pipeline_data(sd.load_sd(folder, text_only=True), repository, "all", default=None)
    add_prompt_character(repository, "base", "a photo of a person", default=True)
    done.touch()
    return repository, plain


def _characters(repository: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """``--characters`` random LoRA characters per rank (kohya layout, every slot), and one full fine-tune."""
    from isekai import constants as C  # noqa: PLC0415
    from isekai.ensemble.characters import CharacterStore  # noqa: PLC0415
    from isekai.export.characters import Base, add_full_character, add_lora_character  # noqa: PLC0415
    from isekai.export.make_lora import random_factors, write_lora  # noqa: PLC0415

    store, base = CharacterStore(repository), Base.load(repository)
    names: dict[str, list[str]] = {}
    for rank in args.ranks:
        names[f"rank {rank}"] = [f"r{rank}-{i}" for i in range(args.characters + 1)]
        for i, name in enumerate(names[f"rank {rank}"]):
            if name in store.names():
                continue
            say(f"registering LoRA character {name}")
            path = args.cache / "characters" / "loras" / f"{name}.safetensors"
            write_lora(path, random_factors(base.slots[C.UNET_MODEL], rank, seed=rank * 100 + i),
                       layout="kohya")
            add_lora_character(repository, name, path, "a photo of sks girl")
            path.unlink()
    if "full" not in store.names():
        say("registering a full fine-tune character (its UNet exported as its own graph)")
        add_full_character(repository, "full", _fine_tune(args), "a photo of sks girl")
    names["full"] = ["full"]
    return names


def _fine_tune(args: argparse.Namespace) -> Path:
    """The base folder with other UNet weights: what a full DreamBooth run writes."""
    import torch  # noqa: PLC0415
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    base = sd_folder(args.size, args.cache)
    target = args.cache / "characters" / f"{args.size}-fine-tune"
    if not (target / "model_index.json").is_file():
        shutil.copytree(base, target, ignore=shutil.ignore_patterns("unet"))
        unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet", local_files_only=True)
        with torch.no_grad():
            for p in unet.parameters():
                p.mul_(1.01)
        unet.save_pretrained(str(target / "unet"), safe_serialization=True)
    return target


def _rss(pid: int, field: str = "VmRSS") -> int:
    """A resident-memory field of /proc/PID/status in bytes: VmRSS (all), RssAnon (the process's own memory),
    RssFile (mapped files' pages, which the page cache shares and the kernel may drop)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def _served(repository: Path, args: argparse.Namespace, names: dict[str, list[str]]) -> dict[str, object]:
    import tritonclient.grpc as grpc  # noqa: PLC0415

    from isekai import constants as C  # noqa: PLC0415
    from isekai.ensemble.characters import CharacterStore  # noqa: PLC0415
    from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415
    from isekai.serving.stubs import server_stubs  # noqa: PLC0415

    store = CharacterStore(repository)
    hidden = store.config.text_hidden_size
    options = ServerOptions(repository=repository, grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port())
    server = TritonServer(options, log_path=args.cache / "characters" / "server.log")
    server.start()
    try:
        server.wait_ready(timeout_s=900)
        client = grpc.InferenceServerClient(server.grpc_url)
        stub = next(
            s.pid for s in server_stubs(server.process.pid) if s.model == C.UNET_MODEL and not s.zombie
        )
        rng = np.random.default_rng(0)
        side = args.latent
        arrays = {
            C.UNET_IN_SAMPLE: rng.standard_normal((2, 4, side, side), dtype=np.float32),
            C.UNET_IN_TIMESTEP: np.full((2, 1), 500.0, np.float32),
            C.UNET_IN_HIDDEN: rng.standard_normal((2, 77, hidden), dtype=np.float32),
        }

        def step(name: str | None) -> float:
            key = store.get(name).key if name else ""
            inputs = []
            for tensor_name, value in arrays.items():
                t = grpc.InferInput(tensor_name, list(value.shape), "FP32")
                t.set_data_from_numpy(value)
                inputs.append(t)
            t = grpc.InferInput(C.SD_IN_CHARACTER, [2, 1], "BYTES")
            t.set_data_from_numpy(np.array([[key.encode()]] * 2, dtype=np.object_))
            inputs.append(t)
            started = time.perf_counter()
            client.infer(C.UNET_MODEL, inputs, client_timeout=3600)
            return time.perf_counter() - started

        def adapter_bytes(name: str) -> int:
            return (store.directory / name / f"{C.UNET_MODEL}.onnx_adapter").stat().st_size

        say("warm-up: the base graph")
        step(None)
        result: dict[str, object] = {"memory": {}, "time": {}, "full": {}}
        # The full fine-tune first, on the warm base alone: measured after the adapters' rows, its growth hid
        # in memory the allocator had freed meanwhile (0.38 GiB for its 3.2 GiB graph in one run).
        before = {f: _rss(stub, f) for f in ("VmRSS", "RssAnon", "RssFile")}
        first = step("full")
        seconds = [step("full") for _ in range(args.runs)]
        result["full"] = {
            "first_call_s": first,
            "steps": seconds,
            "rss_growth": _rss(stub) - before["VmRSS"],
            "anon_growth": _rss(stub, "RssAnon") - before["RssAnon"],
            "file_growth": _rss(stub, "RssFile") - before["RssFile"],
            "graph_bytes": sum(f.stat().st_size for f in (store.directory / "full" / "unet").iterdir()),
        }
        for rank in args.ranks:
            first, *others = names[f"rank {rank}"]
            step(first)
            before = _rss(stub)
            for name in others:
                step(name)
            grown = _rss(stub) - before
            loaded = sum(adapter_bytes(n) for n in others)
            result["memory"][f"rank {rank}"] = {"characters": len(others), "adapter_bytes": loaded,
                                                 "rss_growth": grown, "ratio": grown / loaded}
            say(f"rank {rank}: {len(others)} more characters grew the unet process by {grown / 2**20:.0f} "
                f"MiB for {loaded / 2**20:.0f} MiB of adapters")
        for label, name in [("no adapter", None),
                            *((f"rank {r}", names[f"rank {r}"][0]) for r in args.ranks)]:
            step(name)  # warm
            seconds = [step(name) for _ in range(args.runs)]
            result["time"][label] = seconds
            say(f"UNet step, {label}: median {statistics.median(seconds):.2f} s")
        result["unet_rss"] = _rss(stub)
        return result
    finally:
        server.stop(grace_s=30)


def _in_process(repository: Path, plain: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """The slots' own cost: the slotted graph without an adapter against the graph exported without slots,
    each session on its own, with the served configuration's options."""
    import onnxruntime as ort  # noqa: PLC0415

    from isekai import constants as C  # noqa: PLC0415
    from isekai.ensemble.characters import PipelineConfig  # noqa: PLC0415
    from isekai.serving.ort_options import session_options  # noqa: PLC0415

    hidden = PipelineConfig.load(repository).text_hidden_size
    rng = np.random.default_rng(0)
    feeds = {
        C.UNET_IN_SAMPLE: rng.standard_normal((2, 4, args.latent, args.latent), dtype=np.float32),
        C.UNET_IN_TIMESTEP: np.full((2,), 500.0, np.float32),
        C.UNET_IN_HIDDEN: rng.standard_normal((2, 77, hidden), dtype=np.float32),
    }
    out = {}
    for label, path in (
        ("without slots", plain),
        ("with slots, no adapter", repository / C.UNET_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME),
    ):
        session = ort.InferenceSession(str(path), session_options({"cpu_mem_arena": "false"}),
                                       providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        out[label] = []
        for _ in range(args.runs):
            started = time.perf_counter()
            session.run(None, feeds)
            out[label].append(time.perf_counter() - started)
        say(f"in-process UNet step, {label}: median {statistics.median(out[label]):.2f} s")
        del session
    return out


def markdown(result: dict, args: argparse.Namespace, command: str) -> str:
    from bench.cli import _machine, _software  # noqa: PLC0415

    med = statistics.median
    lines = [
        f"# Characters on the served UNet: {args.size}",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {_machine()[0]}  ",
        f"Software: {_software()}",
        "",
        f"UNet step: batch 2 (the guidance pair), latent {args.latent}x{args.latent} "
        f"({args.latent * 8}x{args.latent * 8} pixels), float32, onnxruntime CPU; median of {args.runs} "
        "after a warm-up. LoRA characters: random kohya-layout LoRAs on every Linear and Conv2d of the UNet. "
        f"The bench's unet holds up to {BENCH_ADAPTER_BYTES // 2**30} GiB of adapters "
        "(character_adapter_bytes; 2 GiB by default), so none is unloaded while the memory rows are "
        "measured.",
        "",
        "| memory | characters | adapters loaded | unet process growth | growth / adapters | goal <= 1.05 |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, m in result["served"]["memory"].items():
        lines.append(f"| {label} | {m['characters']} | {m['adapter_bytes'] / 2**20:.0f} MiB | "
                     f"{m['rss_growth'] / 2**20:.0f} MiB | {m['ratio']:.2f} | "
                     f"{'met' if m['ratio'] <= 1.05 else 'missed'} |")
    base = med(result["served"]["time"]["no adapter"])
    lines += ["", "| UNet step (served) | median | vs no adapter | goal <= +10 % |",
              "| --- | ---: | ---: | --- |"]
    for label, seconds in result["served"]["time"].items():
        ratio = med(seconds) / base
        verdict = "" if label == "no adapter" else ("met" if ratio <= 1.10 else "missed")
        lines.append(f"| {label} | {med(seconds):.2f} s | {ratio - 1:+.1%} | {verdict} |")
    plain = med(result["in_process"]["without slots"])
    slotted = med(result["in_process"]["with slots, no adapter"])
    full = result["served"]["full"]
    lines += [
        "",
        "| in-process UNet step | median | vs without slots |",
        "| --- | ---: | ---: |",
        f"| exported without slots | {plain:.2f} s | |",
        f"| with slots, no adapter | {slotted:.2f} s | {slotted / plain - 1:+.1%} |",
        "",
        "| full fine-tune character | value |",
        "| --- | ---: |",
        f"| its graph on disk | {full['graph_bytes'] / 2**30:.2f} GiB |",
        f"| first call (loads the graph, then one step) | {full['first_call_s']:.1f} s |",
        f"| steady step | {med(full['steps']):.2f} s |",
        f"| unet process growth when loaded (VmRSS) | {full['rss_growth'] / 2**30:.2f} GiB |",
        *(f"| of which {label} | {full[key] / 2**30:.2f} GiB |" for key, label in (
            ("anon_growth", "the process's own memory (RssAnon)"),
            ("file_growth", "mapped files' pages (RssFile)")) if key in full),
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("tiny", "sd15"), default="sd15",
                        help="SD architecture (tiny: smoke run)")
    parser.add_argument("--characters", type=int, default=10, help="LoRA characters per rank (default 10)")
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[4, 64],
                        help="LoRA ranks, comma-separated (default 4,64)")
    parser.add_argument("--runs", type=int, default=3, help="timed UNet steps per configuration (default 3)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (default 64: a 512x512 crop)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="cache folder (default .cache/bench)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for characters-<size>.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.characters", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    repository, plain = _repository(args)
    names = _characters(repository, args)
    result = {"served": _served(repository, args, names), "in_process": _in_process(repository, plain, args)}
    text = markdown(result, args, " ".join(["python -m bench.characters", *map(shlex.quote, argv)]))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"characters-{args.size}.md").write_text(text, encoding="utf-8")
    (args.output / f"characters-{args.size}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(text)
    say(f"written to {args.output / f'characters-{args.size}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

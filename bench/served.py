"""Configuration 3: the ``isekai`` ensemble on the embedded Triton (default profile), over gRPC.

Also measures what only a server has: the click-look-click rows (issue 8: first click cold, further clicks
from the embedding cache, the generate call after the clicks), dynamic batching of ``unet`` across two
concurrent requests, a bounded load run (:func:`isekai.client.load.run_load`) with Triton's own queue vs
compute time per model, and the server's peak memory against the bytes of weights it loaded.

Per-stage times come from Triton's statistics extension (compute time per execution); a BLS caller's time
includes its callees': ``diffusion`` is the whole img2img with its UNet and VAE calls, and ``compose`` is its
own work with compose's default silhouette (the person's mask) but includes SAM's calls with silhouette "sam".

The fast path (configuration 4: MobileSAM and an LCM-LoRA repository) runs the swaps and the click rows only
(``swaps_and_clicks_only``): batching, concurrency and load describe the server, which configuration 3
measures.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from bench.report import COMPOSE_WITH_SAM_CALLS
from bench.timing import median, say
from isekai import constants as C

# Models a swap runs, with the per-stage row each one feeds.
STAGE_MODELS = {
    "sam_encoder": C.SAM_ENCODER_MODEL,
    "sam_decoder": C.SAM_DECODER_MODEL,
    "lama": C.LAMA_MODEL,
    "unet_step": C.UNET_MODEL,
    "vae_encoder": C.VAE_ENCODER_MODEL,
    "vae_decoder": C.VAE_DECODER_MODEL,
    "diffusion": C.DIFFUSION_MODEL,  # with its BLS calls: the whole img2img
    "compose": C.COMPOSE_MODEL,  # COMPOSE_WITH_SAM_CALLS instead when compose runs SAM (see stage_ms)
}


def silhouette_source(repository: Path) -> str:
    """compose's ``silhouette`` parameter in ``repository`` (its default when the config names none)."""
    from bench.onnx_pipeline import config_parameters  # noqa: PLC0415

    return config_parameters(repository, C.COMPOSE_MODEL).get("silhouette", C.DEFAULT_SILHOUETTE)


def _per_call_ms(delta, model: str) -> float | None:
    d = delta.get(model)
    return d.compute_ns / d.inferences / 1e6 if d is not None and d.inferences else None


def stage_ms(delta, sam_in_compose: bool = False) -> dict[str, float]:
    """Per-call compute ms of each stage in one swap's statistics delta.

    With ``sam_in_compose`` (silhouette "sam"), Triton counts the silhouette's SAM encoder and decoder calls
    inside compose's compute time, and a swap's two encoder calls differ by more than compose's own work (~0.1
    s), so no subtraction resolves it: compose's time is kept as ``compose_with_sam_calls`` instead of
    ``compose``."""
    out = {stage: ms for stage, model in STAGE_MODELS.items()
           if (ms := _per_call_ms(delta, model)) is not None}
    if sam_in_compose and "compose" in out:
        out[COMPOSE_WITH_SAM_CALLS] = out.pop("compose")
    return out


def process_memory(pid: int) -> tuple[int, int]:
    """(peak RSS, current RSS) in bytes of one process, from /proc (VmHWM, VmRSS)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmHWM", 0), fields.get("VmRSS", 0)


def _server_pids(server_pid: int) -> list[int]:
    from isekai.serving.stubs import server_stubs  # noqa: PLC0415

    return [server_pid] + [s.pid for s in server_stubs(server_pid) if not s.zombie]


def server_memory(server_pid: int) -> dict[str, int]:
    """Current RSS of tritonserver plus its Python-backend stubs, and the sum of each one's own peak (VmHWM):
    an upper bound of the server's peak, since the processes peak at different moments."""
    peaks = current = 0
    pids = _server_pids(server_pid)
    for pid in pids:
        try:
            p, c = process_memory(pid)
        except OSError:
            continue
        peaks, current = peaks + p, current + c
    return {"rss_bytes": current, "sum_of_process_peaks_bytes": peaks, "processes": len(pids)}


def process_pss(pid: int) -> int:
    """Proportional set size in bytes: RSS with each shared page split between the processes mapping it.
    Exact, but the kernel walks the page tables for it: read it once, not in a loop (0.2 cores for 14
    processes at 2 Hz)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_parts(pid: int) -> tuple[int, int, int]:
    """(anonymous, file-backed, shared-memory) resident bytes of one process: /proc/PID/status, cheap to
    read."""
    parts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            parts[key] = int(value.split()[0]) * 1024
    return parts.get("RssAnon", 0), parts.get("RssFile", 0), parts.get("RssShmem", 0)


class MemorySampler(threading.Thread):
    """The server's memory every ``interval_s``; ``peak`` is the largest total seen.

    Total = every process's anonymous memory (weights, activations, Python heaps) + half of their shared
    memory (the Python backend's tensors: each region is mapped by its stub and by tritonserver) + the largest
    file-backed set (shared libraries, mapped by every stub alike). Plain RSS summed would count those shared
    pages several times.
    """

    def __init__(self, server_pid: int, interval_s: float = 0.5) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.pids = _server_pids(server_pid)  # the stubs exist once the server is ready
        self.interval_s = interval_s
        self.peak = 0
        self._done = threading.Event()

    def total(self) -> int:
        anon = shmem = files = 0
        for pid in self.pids:
            try:
                a, f, s = rss_parts(pid)
            except OSError:
                continue
            anon, shmem, files = anon + a, shmem + s, max(files, f)
        return anon + shmem // 2 + files

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.peak = max(self.peak, self.total())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


class Served:
    """A running server plus the clients the measurements use."""

    def __init__(self, server) -> None:
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        from isekai.client.client import IsekaiClient  # noqa: PLC0415

        self.server = server
        self.client = IsekaiClient(server.grpc_url, timeout_s=3600)
        self.raw = grpcclient.InferenceServerClient(server.grpc_url)
        self.grpc = grpcclient

    def stats(self):
        from isekai.client.stats import model_stats  # noqa: PLC0415

        return model_stats(self.raw)

    def timed(self, fn, *args, **kwargs):
        """(seconds, statistics delta, result) of one call."""
        from isekai.client.stats import stats_delta  # noqa: PLC0415

        before = self.stats()
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        elapsed = time.perf_counter() - started
        return elapsed, stats_delta(before, self.stats()), result

    def close(self) -> None:
        self.client.close()
        self.raw.close()


def swap_runs(served: Served, scene, runs: int, options: dict, nonce: str, sam_in_compose: bool = False
              ) -> dict:
    """``runs`` cold swaps (new bytes each: the embedding cache misses, as for a new photo)."""
    e2e, stages, encodes, steps = [], {}, [], []
    for i in range(runs):
        say(f"served {scene.name}: swap {i + 1}/{runs} (cold: new image bytes)")
        seconds, delta, _ = served.timed(served.client.swap, scene.png(f"{nonce}-cold-{i}"), [scene.click],
                                         **options)
        e2e.append(seconds)
        for stage, ms in stage_ms(delta, sam_in_compose).items():
            stages.setdefault(stage, []).append(ms)
        encodes.append(delta[C.SAM_ENCODER_MODEL].inferences)
        steps.append(delta[C.UNET_MODEL].inferences)
        say(f"served {scene.name}: swap {i + 1}/{runs} took {seconds:.1f} s ({encodes[-1]} SAM encodes, "
            f"{steps[-1]} UNet steps)")
    return {"e2e_s": e2e, "e2e_p50_s": median(e2e), "stages_ms": {k: median(v) for k, v in stages.items()},
            "encoder_runs": max(encodes), "unet_steps": max(steps)}


def click_session(served: Served, scene, options: dict, nonce: str) -> dict:
    """Issue 8's rows: first click (cold), further clicks (cached embedding), the generate call after them."""
    image = scene.png(f"{nonce}-clicks")
    session = served.client.segment_session(image)
    seconds, delta, _ = served.timed(session.click, scene.click)
    first = {"s": seconds, "encoder_runs": delta[C.SAM_ENCODER_MODEL].inferences}
    say(f"served {scene.name}: first click {seconds * 1e3:.0f} ms (encoder runs: {first['encoder_runs']})")
    further, encoder_runs = [], 0
    for x, y, label in scene.more_clicks:
        seconds, delta, _ = served.timed(session.click, (x, y), positive=bool(label))
        further.append(seconds)
        encoder_runs += delta.get(C.SAM_ENCODER_MODEL).inferences if C.SAM_ENCODER_MODEL in delta else 0
    say(f"served {scene.name}: further clicks {', '.join(f'{s * 1e3:.0f}' for s in further)} ms "
        f"(encoder runs: {encoder_runs})")
    # The generate call: the same photo (its embedding cached) with the swap's own click, so it does the same
    # work as the cold swaps but the photo's encoding (further clicks may leave random-weight SAM finding
    # nobody).
    say(f"served {scene.name}: generate after the clicks")
    seconds, delta, _ = served.timed(served.client.swap, image, [scene.click], **options)
    generate = {"s": seconds, "encoder_runs": delta[C.SAM_ENCODER_MODEL].inferences}
    say(f"served {scene.name}: generate after clicks {seconds:.1f} s (encoder runs: "
        f"{generate['encoder_runs']}, the generated crop's silhouette)")
    return {"first_click_s": first["s"], "first_click_encoder_runs": first["encoder_runs"],
            "further_click_s": further, "further_click_p50_s": median(further),
            "further_click_encoder_runs": encoder_runs,
            "generate_after_clicks_s": generate["s"],
            "generate_after_clicks_encoder_runs": generate["encoder_runs"]}


def unet_batching(served: Served, latent: tuple[int, int], hidden_size: int, repeats: int) -> dict:
    """Two batch-2 ``unet`` requests (one denoising step of two swaps) sent at the same instant, against the
    same two one after the other. With dynamic batching Triton runs the simultaneous pair as one batch-4
    execution."""
    rng = np.random.default_rng(0)
    h, w = latent
    arrays = {
        C.UNET_IN_SAMPLE: rng.standard_normal((2, C.SD_LATENT_CHANNELS, h, w), dtype=np.float32),
        C.UNET_IN_TIMESTEP: np.full((2, 1), 500.0, np.float32),
        C.UNET_IN_HIDDEN: rng.standard_normal((2, C.SD_TOKEN_LENGTH, hidden_size), dtype=np.float32),
    }
    clients = [served.grpc.InferenceServerClient(served.server.grpc_url) for _ in range(2)]
    inputs = []
    for name, value in arrays.items():
        tensor = served.grpc.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    outputs = [served.grpc.InferRequestedOutput(C.UNET_OUT_SAMPLE)]

    def one(k: int, barrier: threading.Barrier | None = None) -> None:
        if barrier is not None:
            barrier.wait()
        clients[k].infer(C.UNET_MODEL, inputs, outputs=outputs, client_timeout=3600)

    def sequential() -> None:
        one(0)
        one(1)

    def concurrent() -> None:
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=one, args=(k, barrier)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    one(0)  # warm
    out = {}
    try:
        for name, fn in (("sequential", sequential), ("concurrent", concurrent)):
            times, executions = [], []
            for _ in range(repeats):
                seconds, delta, _ = served.timed(fn)
                times.append(seconds)
                executions.append(delta[C.UNET_MODEL].executions)
            out[name] = {"s": median(times), "executions": min(executions)}
            say(f"served unet batching: two requests {name}: {median(times):.2f} s, {min(executions)} "
                "execution(s)")
    finally:
        for client in clients:
            client.close()
    return out


def concurrent_swaps(served: Served, scene, options: dict, nonce: str) -> dict:
    """Two swaps of one (already encoded) photo at once, different seeds: do their UNet steps batch
    together?"""
    image = scene.png(f"{nonce}-clicks")  # the click session encoded it
    say(f"served: two concurrent swaps ({options})")

    def both() -> None:
        threads = [threading.Thread(target=served.client.swap, args=(image, [scene.click]),
                                    kwargs={**options, "seed": options.get("seed", 0) + k}) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    seconds, delta, _ = served.timed(both)
    unet = delta[C.UNET_MODEL]
    say(f"served: two concurrent swaps took {seconds:.1f} s; unet ran {unet.inferences} steps in "
        f"{unet.executions} executions")
    return {"s": seconds, "unet_requests": unet.inferences, "unet_executions": unet.executions}


def load_run(served: Served, scenes, concurrency: tuple[int, ...], requests: int, nonce: str) -> list[dict]:
    """Mask requests (``isekai_segment``) from concurrent clients over the scenes with repeated clicks.

    Uses the project's load generator (:func:`isekai.client.load.run_load`); each photo is clicked once first
    so the run measures the interactive loop (cached embeddings), and Triton's queue vs compute per model is
    read from the metrics endpoint around each run.
    """
    from isekai.client.load import LoadMix, Photo, run_load  # noqa: PLC0415
    from isekai.client.stats import metrics_delta, model_metrics, settled_model_metrics  # noqa: PLC0415

    photos = []
    for scene in scenes:
        image = scene.png(f"{nonce}-load")
        clicks = (scene.click, *((x, y) for x, y, label in scene.more_clicks if label))
        served.client.segment(image, [scene.click])  # the photo's first click: encodes it
        photos.append(Photo(image, tuple(clicks)))
    mix = LoadMix(tuple(photos), swap_fraction=0.0, max_clicks=2)
    rows = []
    for c in concurrency:
        before = model_metrics(served.server.metrics_url)
        report = run_load(served.server.grpc_url, requests, c, None, mix)
        models = metrics_delta(before, settled_model_metrics(served.server.metrics_url))
        say(f"served load: concurrency {c}: {report.throughput:.2f} req/s, {report.failed} failed")
        latencies = {
            "p50_ms": report.percentile_ms(C.SEGMENT_MODEL, 50),
            "p95_ms": report.percentile_ms(C.SEGMENT_MODEL, 95),
            "p99_ms": report.percentile_ms(C.SEGMENT_MODEL, 99),
        }
        rows.append({"concurrency": c, "sent": report.sent, "failed": report.failed,
                     "throughput_rps": report.throughput, **latencies,
                     "models": [m.__dict__ for m in models]})
    return rows


def run(models, scenes, options: dict, runs: int, *, log: Path, warmup_options: dict, latent: tuple[int, int],
        batching_repeats: int, concurrent_options: dict, load_requests: int,
        load_concurrency: tuple[int, ...], nonce: str, swaps_and_clicks_only: bool = False) -> dict:
    from isekai.ensemble.characters import PipelineConfig  # noqa: PLC0415
    from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

    opts = ServerOptions(repository=models.repository, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port())
    say(f"served: starting the embedded Triton on {models.repository} (log: {log})")
    started = time.perf_counter()
    silhouette = silhouette_source(models.repository)
    result: dict = {"scenes": {}, "silhouette": silhouette, "sam": models.sam_type}
    with TritonServer(opts, log_path=log) as server:
        result["server_start_s"] = time.perf_counter() - started
        say(f"served: ready in {result['server_start_s']:.0f} s")
        served = Served(server)
        sampler = MemorySampler(server.process.pid)
        sampler.start()
        try:
            say(f"served: warm-up swap ({warmup_options})")
            served.client.swap(scenes[0].png(f"{nonce}-warmup"), [scenes[0].click], **warmup_options)
            for scene in scenes:
                entry = swap_runs(served, scene, runs, options, nonce, sam_in_compose=silhouette == "sam")
                entry["clicks"] = click_session(served, scene, options, nonce)
                result["scenes"][scene.name] = entry
            config = PipelineConfig.load(models.repository)
            result["scheduler"] = config.scheduler
            result["sampling"] = {"steps": options.get("steps", config.sampling_defaults[0]),
                                  "guidance": options.get("guidance", config.sampling_defaults[1])}
            if not swaps_and_clicks_only:
                hidden = config.text_hidden_size
                result["unet_batching"] = unet_batching(served, latent, hidden, batching_repeats)
                result["concurrent_swaps"] = concurrent_swaps(served, scenes[0], concurrent_options, nonce)
                result["load"] = load_run(served, scenes, load_concurrency, load_requests, nonce)
            result["memory"] = server_memory(server.process.pid)
            result["memory"]["pss_bytes"] = sum(process_pss(pid) for pid in sampler.pids)
        finally:
            result.setdefault("memory", {})["peak_rss_bytes"] = sampler.stop()
            served.close()
    result["memory"]["weight_bytes"] = models.weight_bytes()
    return result

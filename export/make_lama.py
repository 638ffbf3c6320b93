"""A random-weight LaMa checkpoint folder in the official big-lama layout (tests, the demo, benchmarks).

The official download is a folder::

    big-lama/config.yaml        the Hydra-composed training config (OmegaConf interpolations left in it)
    big-lama/models/best.ckpt   a PyTorch-Lightning checkpoint of the whole training module

:func:`make_lama_checkpoint` writes the same: the config with the same sections and ``${...}`` interpolations
(including ``${env:...}`` ones outside the generator section, which must stay unresolved), and a
Lightning-style checkpoint whose ``state_dict`` holds ``generator.*`` beside discriminator and loss-network
tensors, whose ``hyper_parameters`` are an OmegaConf ``DictConfig`` (so, as with the real file,
``torch.load(weights_only=True)`` refuses it), and which carries optimizer state. Defaults are small; with
``ngf=64, n_blocks=18`` the generator is big-lama's size (51M parameters, ~200 MB).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from isekai.export.ffc import generator_from_config
from isekai.export.lama import load_lama_config

CONFIG_NAME = "config.yaml"
LAMA_INPUT_CHANNELS = 4  # the template's generator.input_nc: RGB with the hole zeroed + the mask
CHECKPOINT_PATH = Path("models") / "best.ckpt"
LIGHTNING_VERSION = "1.2.9"  # what the released big-lama checkpoint was written with

# The official big-lama config.yaml, trimmed of dataset details; {ngf}, {n_blocks}, {n_downsampling} are
# filled in.
# The generator's ratios are interpolations exactly as in the real file.
CONFIG_TEMPLATE = """\
run_title: isekai_random_{ngf}_b{n_blocks}
training_model:
  kind: default
  visualize_each_iters: 1000
  concat_mask: true
  store_discr_outputs_for_vis: true
losses:
  l1:
    weight_missing: 0
    weight_known: 10
  perceptual:
    weight: 0
  adversarial:
    kind: r1
    weight: 10
    gp_coef: 0.001
    mask_as_fake_target: true
    allow_scale_mask: true
  feature_matching:
    weight: 100
  resnet_pl:
    weight: 30
    weights_path: ${{env:TORCH_HOME}}
optimizers:
  generator:
    kind: adam
    lr: 0.001
  discriminator:
    kind: adam
    lr: 0.0001
visualizer:
  kind: directory
  outdir: ${{location.out_root_dir}}/samples
location:
  data_root_dir: /data/inpainting
  out_root_dir: /experiments/${{env:USER}}/inpainting
  tb_dir: /experiments/${{env:USER}}/tb_logs
data:
  batch_size: 15
  val_batch_size: 2
  num_workers: 3
  train:
    indir: ${{location.data_root_dir}}/train
    out_size: 256
generator:
  kind: ffc_resnet
  input_nc: 4
  output_nc: 3
  ngf: {ngf}
  n_downsampling: {n_downsampling}
  n_blocks: {n_blocks}
  add_out_act: sigmoid
  init_conv_kwargs:
    ratio_gin: 0
    ratio_gout: 0
    enable_lfu: false
  downsample_conv_kwargs:
    ratio_gin: ${{generator.init_conv_kwargs.ratio_gout}}
    ratio_gout: ${{generator.downsample_conv_kwargs.ratio_gin}}
    enable_lfu: false
  resnet_conv_kwargs:
    ratio_gin: 0.75
    ratio_gout: ${{generator.resnet_conv_kwargs.ratio_gin}}
    enable_lfu: false
discriminator:
  kind: pix2pixhd_nlayer
  input_nc: 3
  ndf: 64
  n_layers: 4
evaluator:
  kind: default
  inpainted_key: inpainted
  integral_kind: ssim_fid100_f1
trainer:
  kwargs:
    gpus: -1
    accelerator: ddp
    max_epochs: 200
    gradient_clip_val: 1
    limit_train_batches: 25000
    val_check_interval: ${{trainer.kwargs.limit_train_batches}}
    precision: 32
  checkpoint_kwargs:
    verbose: true
    save_top_k: 5
    save_last: true
    monitor: val_ssim_fid100_f1_total_mean
    mode: max
"""


def randomize_batchnorm(module: nn.Module, rng: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    A freshly built BatchNorm is the identity in eval mode (mean 0, var 1, weight 1, bias 0), which would let
    an exporter that drops or misplaces BN layers pass parity. The ranges keep an 18-block network's
    activations bounded (measured at big-lama's size).
    """
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d) and bn.num_features:
            n = bn.num_features
            bn.weight.data = 0.5 + torch.rand(n, generator=rng)
            bn.bias.data = 0.1 * torch.randn(n, generator=rng)
            bn.running_mean.data = 0.1 * torch.randn(n, generator=rng)
            bn.running_var.data = 0.5 + torch.rand(n, generator=rng)
            bn.num_batches_tracked.fill_(1000)


def _spread_output(model: nn.Module, rng: torch.Generator, target_std: float = 1.5) -> None:
    """Scale the last convolution so the output activation's input has ``target_std`` on a random input.

    With default initialisation the 7x7 output convolution's values are tiny, so sigmoid answers ~0.5
    everywhere and a parity check on the output could not tell a broken graph from a good one. A trained
    LaMa's predictions span 0..1; this makes the random one's do too.
    """
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    probe = torch.rand((1, LAMA_INPUT_CHANNELS, 64, 64), generator=rng)
    outputs: list[torch.Tensor] = []
    handle = last_conv.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    with torch.no_grad():
        model.eval()(probe)
    handle.remove()
    std = float(outputs[0].std())
    if std > 0:
        last_conv.weight.data *= target_std / std
        last_conv.bias.data *= target_std / std


def _other_module_tensors(rng: torch.Generator) -> dict[str, torch.Tensor]:
    """A few tensors named as the training module's other parts (discriminator, ResNet perceptual loss)."""
    def t(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=rng) * 0.02

    return {
        "discriminator.model0.0.weight": t(64, 3, 4, 4),
        "discriminator.model0.0.bias": t(64),
        "discriminator.model1.0.weight": t(128, 64, 4, 4),
        "discriminator.model1.1.weight": t(128),
        "discriminator.model1.1.bias": t(128),
        "discriminator.model1.1.running_mean": t(128),
        "discriminator.model1.1.running_var": t(128).abs() + 1,
        "discriminator.model1.1.num_batches_tracked": torch.tensor(1000),
        "loss_resnet_pl.impl.encoder.conv1.weight": t(64, 3, 3, 3),
        "loss_resnet_pl.impl.encoder.bn1.weight": t(64),
        "loss_resnet_pl.impl.encoder.bn1.bias": t(64),
    }


def make_lama_checkpoint(
    directory: str | Path,
    *,
    ngf: int = 16,
    n_blocks: int = 2,
    n_downsampling: int = 3,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``<directory>/config.yaml`` and ``<directory>/models/best.ckpt``; return (checkpoint, config).

    Args:
        directory: the folder to create (the equivalent of the downloaded ``big-lama/``).
        ngf: generator width (big-lama: 64). The bottleneck has ``ngf * 2**n_downsampling`` channels, 3/4 of
            them global.
        n_blocks: FFC resnet blocks (big-lama: 18).
        n_downsampling: stride-2 stages (big-lama: 3; the exported graph needs H, W multiples of 2**this).
        seed: the same seed writes the same tensors.
    """
    if ngf < 4 or n_blocks < 0 or n_downsampling < 1:
        raise ValueError(
            f"need ngf >= 4, n_blocks >= 0, n_downsampling >= 1; got {ngf}, {n_blocks}, {n_downsampling}"
        )
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    checkpoint_path = directory / CHECKPOINT_PATH
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(CONFIG_TEMPLATE.format(ngf=ngf, n_blocks=n_blocks, n_downsampling=n_downsampling))

    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the modules' default init draws from the global RNG: keep the caller's
        torch.manual_seed(seed)
        model = generator_from_config(load_lama_config(config_path))
    randomize_batchnorm(model, rng)
    _spread_output(model, rng)
    state = {f"generator.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update(_other_module_tensors(rng))

    # Lightning stores the module's hyper-parameters as given: LaMa passes its whole OmegaConf config.
    full_config = OmegaConf.load(config_path)
    first = next(iter(model.parameters()))
    adam_state = {"step": 1000, "exp_avg": torch.zeros_like(first), "exp_avg_sq": torch.zeros_like(first)}
    adam_group = {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "params": [0]}
    checkpoint = {
        "epoch": 39,
        "global_step": 1_000_000,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": state,
        "callbacks": {"ModelCheckpoint": {"monitor": "val_ssim_fid100_f1_total_mean", "save_top_k": 5}},
        # One parameter's Adam state: the structure of the real file without tripling its size.
        "optimizer_states": [{"state": {0: adam_state}, "param_groups": [adam_group]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": full_config, "use_ddp": True, "predict_only": False},
    }
    torch.save(checkpoint, checkpoint_path)
    return checkpoint_path, config_path

"""Train the shapes text-to-image pipelines from scratch, on the CPU, deterministically.

    python -m tgate_fx.shapes.train --out DIR                  # UNet: StableDiffusionPipeline
    python -m tgate_fx.shapes.train --out DIR --model dit      # DiT: PixArtAlphaPipeline
    python -m tgate_fx.shapes.train --out DIR --model flux --vae-from VAE_DIR --decoder-steps 0  # FluxPipeline

Stages (progress is printed as it goes):

1. render the training pictures (:func:`tgate_fx.shapes.data.generate`,
   training combinations only; the held-out ones are never seen);
2. train the VAE (reconstruction L1 + L2, with pixels of the shape weighted
   up because they are a tenth of the picture, plus a small KL term), or
   reuse one (``--vae-from``), then set its ``scaling_factor`` so that
   latents have unit standard deviation;
3. encode the pictures once, and train the text encoder and the denoiser
   together (CLIP text encoder + UNet, :mod:`tgate_fx.shapes.model`; or T5
   encoder + PixArt transformer, :mod:`tgate_fx.shapes.dit`) on the
   v-prediction objective over the scheduler's ``linear`` betas, with an EMA
   of the weights and caption dropout (an empty caption 10% of the time) so
   that classifier-free guidance works. ``--model flux`` (CLIP and T5
   encoders + FLUX transformer, :mod:`tgate_fx.shapes.flux`) trains on
   FLUX's rectified-flow objective instead: ``t`` uniform in [0, 1],
   ``x_t = (1 - t) x0 + t noise``, the target the velocity ``noise - x0``,
   the transformer called as FluxPipeline calls it (latents packed into 2x2
   patches, ``timestep`` = ``t``, i.e. the scheduler's timestep / 1000, the
   pipeline's text and image RoPE ids, no T5 padding mask, both captions
   dropped together), with the same EMA and caption dropout (for true CFG
   with ``negative_prompt=""``). The v loss is not reweighted
   (``--loss-weight uniform``, the default): at high noise it is close to a
   loss on the picture, and the first sampling steps, where the shape's place
   and outline are decided, get their share of training. min-SNR weighting
   (``--loss-weight min_snr``, what the first shipped UNet used) scales the
   v loss by ~SNR there, i.e. almost zero; that model drew the caption's
   position 33-42% of the time. ``--checkpoint-every N`` writes the EMA
   pipeline to ``DIR/checkpoint`` and prints a short accuracy check (seen
   and held-out captions) every N steps;
4. write the pipeline (EMA weights) with ``save_pretrained`` to ``DIR``, plus
   ``training_log.json`` (settings, losses, checkpoint accuracies, times) and
   ``training_samples.png`` (a few held-out captions at the family's usual
   settings: 25 steps and guidance 7.5 for the UNet, 20 steps and 4.5 for
   PixArt, 20 steps and true CFG 4.0 for FLUX).

Everything is seeded: the same command on the same machine and thread count
writes the same weights. How the shipped weights were made, and how long it
took, is in each pipeline's ``training_log.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from . import data, model

__all__ = ["main", "train"]

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
# An EMA horizon of ~200 steps: long enough to smooth the noise of batch-64
# steps, short enough that a ~2000-step run does not average in the weights of
# its early, high learning-rate phase.
EMA_DECAY = 0.998


class _Progress:
    def __init__(self, stage: str, total: int, every: int):
        self.stage, self.total, self.every, self.start = stage, total, every, time.time()

    def __call__(self, step: int, **values: float) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.time() - self.start
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"[{self.stage}] {step}/{self.total} {shown} | {elapsed:.0f}s, "
              f"eta {elapsed / step * (self.total - step):.0f}s", flush=True)


def _lr_lambda(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


class _FluxText(torch.nn.Module):
    """FLUX's two text encoders trained as one module: the CLIP pooled output and the T5 token states."""

    def __init__(self, clip, t5):
        super().__init__()
        self.clip, self.t5 = clip, t5

    def forward(self, ids: torch.Tensor, ids_2: torch.Tensor):
        return self.clip(ids).pooler_output, self.t5(ids_2)[0]


def _train_vae(images: torch.Tensor, *, steps: int, batch_size: int, seed: int, log: dict):
    vae = model.make_vae(seed=seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, steps // 20))
    g = torch.Generator().manual_seed(seed)
    progress = _Progress("vae", steps, 100)
    losses = []
    vae.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)].float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        err = vae.decode(posterior.sample(g)).sample - x
        # The top-left pixel is always background (shapes stay inside the
        # picture's central area): weight the pixels that differ from it.
        shape_mask = (x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.3
        weight = 1 + 4 * shape_mask.float()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = (weight * err.pow(2)).mean() + (weight * err.abs()).mean() + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(err.pow(2).mean().item())
        progress(step, mse=sum(losses[-100:]) / len(losses[-100:]), kl=kl.item())
    log["vae_mse_last100"] = sum(losses[-100:]) / len(losses[-100:])
    return vae.eval()


def _finetune_decoder(vae, images: torch.Tensor, *, steps: int, batch_size: int, seed: int, log: dict):
    """Train the VAE's decoder further on its frozen encoder's latents (the same loss as :func:`_train_vae`).

    The latent space (and so any denoiser trained on it) stays the same; only
    how latents are drawn improves. The first VAE's 1000 steps left blue and
    green shapes on grey soft enough that the evaluator read 9% of their
    reconstructions as another shape.
    """
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 20)))
    g = torch.Generator().manual_seed(seed + 100)
    progress = _Progress("decoder", steps, 100)
    losses = []
    vae.eval()
    vae.decoder.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)].float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(g)
        err = vae.decode(z).sample - x
        shape_mask = (x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.3
        weight = 1 + 4 * shape_mask.float()
        loss = (weight * err.pow(2)).mean() + (weight * err.abs()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(err.pow(2).mean().item())
        progress(step, mse=sum(losses[-100:]) / len(losses[-100:]))
    for p in vae.parameters():
        p.requires_grad_(True)
    log["decoder_mse_last100"] = sum(losses[-100:]) / len(losses[-100:])
    return vae.eval()


@torch.no_grad()
def _encode(vae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(chunk.float() / 127.5 - 1).latent_dist.mode() for chunk in images.split(500)])


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=model.MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def _loss_weights(noise_schedule, loss_weight: str) -> torch.Tensor:
    """Per-timestep weight of the squared error of the prediction target."""
    alphas_cumprod = noise_schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    v_prediction = noise_schedule.config.prediction_type == "v_prediction"
    if loss_weight == "uniform":
        return torch.ones_like(snr)
    if loss_weight == "min_snr":
        # min-SNR-gamma in the form for each prediction target. With
        # v-prediction it is ~snr at high noise, so the first sampling steps
        # (where position and shape are decided) are barely trained.
        return snr.clamp(max=MIN_SNR_GAMMA) / (snr + 1 if v_prediction else snr)
    raise ValueError(f"loss_weight must be 'uniform' or 'min_snr', got {loss_weight!r}")


def _train_denoiser(latents: torch.Tensor, captions: list[str], tokenizer, *, steps: int, batch_size: int,
                    lr: float, seed: int, log: dict, kind: str = "unet", loss_weight: str = "uniform",
                    ema_decay: float = EMA_DECAY, checkpoint=None, checkpoint_every: int = 0,
                    denoiser_kwargs: dict | None = None, init_from: str | os.PathLike | None = None):
    """Train a text encoder and a denoiser together; returns their EMA copies.

    ``kind``: ``"unet"`` (CLIP text encoder + UNet2DConditionModel), ``"dit"``
    (T5 encoder + PixArtTransformer2DModel, see :mod:`tgate_fx.shapes.dit`) or
    ``"flux"`` (CLIP and T5 encoders + FluxTransformer2DModel, see
    :mod:`tgate_fx.shapes.flux`; ``tokenizer`` is then the pair
    ``(tokenizer, tokenizer_2)`` and the text encoder returned a module with
    both, ``.clip`` and ``.t5``).
    ``checkpoint(step, text_encoder, denoiser)`` is called with the EMA weights
    every ``checkpoint_every`` steps. ``denoiser_kwargs`` go to
    :func:`tgate_fx.shapes.model.make_unet`, :func:`tgate_fx.shapes.dit.make_transformer`
    or :func:`tgate_fx.shapes.flux.make_transformer`.
    ``init_from``: a pipeline directory whose text encoder and denoiser to
    start from, instead of random weights (to train a shipped model further).
    """
    from diffusers import DDPMScheduler

    if kind == "unet":
        text_encoder = model.make_text_encoder(tokenizer, seed=seed + 1)
        denoiser = model.make_unet(seed=seed + 2, **(denoiser_kwargs or {}))
        scheduler_config = model.make_scheduler().config
    elif kind == "dit":
        from . import dit

        text_encoder = dit.make_text_encoder(tokenizer, seed=seed + 1)
        denoiser = dit.make_transformer(seed=seed + 2, **(denoiser_kwargs or {}))
        scheduler_config = dit.make_scheduler().config
    elif kind == "flux":
        from . import flux

        if loss_weight != "uniform":
            raise ValueError(f"--model flux trains rectified flow with loss_weight 'uniform' only, got {loss_weight!r}")
        text_encoder = _FluxText(*flux.make_text_encoders(*tokenizer, seed=seed + 1))
        denoiser = flux.make_transformer(seed=seed + 2, **(denoiser_kwargs or {}))
    else:
        raise ValueError(f"kind must be 'unet', 'dit' or 'flux', got {kind!r}")
    if init_from is not None:
        if kind == "flux":
            text_encoder = _FluxText(type(text_encoder.clip).from_pretrained(Path(init_from) / "text_encoder"),
                                     type(text_encoder.t5).from_pretrained(Path(init_from) / "text_encoder_2"))
        else:
            text_encoder = type(text_encoder).from_pretrained(Path(init_from) / "text_encoder")
        denoiser = type(denoiser).from_pretrained(Path(init_from) / ("unet" if kind == "unet" else "transformer"))
    if kind != "flux":
        noise_schedule = DDPMScheduler.from_config(scheduler_config)
        v_prediction = noise_schedule.config.prediction_type == "v_prediction"
        weights = _loss_weights(noise_schedule, loss_weight)

    ids_2 = empty_2 = None
    if kind == "flux":
        ids, ids_2 = (_tokenize(tok, captions) for tok in tokenizer)
        empty, empty_2 = (_tokenize(tok, [""])[0] for tok in tokenizer)
        masks = empty_mask = None
        img_ids, txt_ids = flux.latent_image_ids(), flux.text_ids()
    elif kind == "unet":
        ids = _tokenize(tokenizer, captions)
        empty = _tokenize(tokenizer, [""])[0]
        masks = empty_mask = None
    else:
        enc = tokenizer(captions, padding="max_length", max_length=model.MAX_LENGTH, truncation=True,
                        return_tensors="pt")
        ids, masks = enc.input_ids, enc.attention_mask
        enc = tokenizer([""], padding="max_length", max_length=model.MAX_LENGTH, return_tensors="pt")
        empty, empty_mask = enc.input_ids[0], enc.attention_mask[0]

    def forward(net, te, noisy, t, tokens, mask, tokens_2=None):
        if kind == "flux":
            pooled, states = te(tokens, tokens_2)
            return net(hidden_states=flux.pack_latents(noisy), timestep=t, pooled_projections=pooled,
                       encoder_hidden_states=states, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        if kind == "unet":
            return net(noisy, t, te(tokens)[0]).sample
        states = te(tokens, attention_mask=mask)[0]
        return net(noisy, encoder_hidden_states=states, timestep=t, encoder_attention_mask=mask,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    params = list(denoiser.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 30)))
    ema_net, ema_text = copy.deepcopy(denoiser).eval(), copy.deepcopy(text_encoder).eval()
    ema_pairs = list(zip(list(ema_net.parameters()) + list(ema_text.parameters()), params))
    g = torch.Generator().manual_seed(seed + 3)
    progress = _Progress(kind, steps, 50)
    losses = []
    denoiser.train()
    text_encoder.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(batch_size, generator=g) < CAPTION_DROPOUT
        tokens[drop] = empty
        mask = tokens_2 = None
        if masks is not None:
            mask = masks[idx].clone()
            mask[drop] = empty_mask
        if kind == "flux":
            tokens_2 = ids_2[idx].clone()
            tokens_2[drop] = empty_2
            # Rectified flow, as FlowMatchEulerDiscreteScheduler integrates it:
            # sigma = t, x_t = (1 - t) x0 + t noise, velocity dx_t/dt = noise - x0.
            t = torch.rand(batch_size, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            noisy = flux.noisy_latents(x0, noise, t)
            prediction = forward(denoiser, text_encoder, noisy, t, tokens, None, tokens_2)
            per_sample = (prediction - flux.pack_latents(flux.velocity(x0, noise))).pow(2).mean((1, 2))
            loss = per_sample.mean()
        else:
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            noisy = noise_schedule.add_noise(x0, noise, t)
            prediction = forward(denoiser, text_encoder, noisy, t, tokens, mask)
            target = noise_schedule.get_velocity(x0, noise, t) if v_prediction else noise
            per_sample = (prediction - target).pow(2).mean((1, 2, 3))
            loss = (per_sample * weights[t]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, p in ema_pairs:
                ema.lerp_(p, 1 - decay)
        losses.append(per_sample.mean().item())
        progress(step, mse=sum(losses[-50:]) / len(losses[-50:]))
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            checkpoint(step, ema_text, ema_net)
    log["denoiser_mse_last200"] = sum(losses[-200:]) / len(losses[-200:])
    log["denoiser_mse_curve"] = [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                                 for i in range(0, len(losses), 100)]
    return ema_text, ema_net


def _sample_grid(pipe, path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    combos = data.combinations("held_out")[:: max(1, len(data.combinations("held_out")) // 8)][:8]
    from .evaluate import call_kwargs

    out = pipe([c.caption for c in combos], **call_kwargs(pipe), output_type="np",
               generator=torch.Generator().manual_seed(seed)).images
    row = (np.concatenate(list(out), axis=1) * 255).round().astype("uint8")
    Image.fromarray(row).resize((row.shape[1] * 4, row.shape[0] * 4), Image.NEAREST).save(path)


def _build_pipeline(kind: str, vae, text_encoder, tokenizer, denoiser):
    if kind == "unet":
        return model.make_pipeline(vae, text_encoder, tokenizer, denoiser)
    if kind == "flux":
        from . import flux

        return flux.make_pipeline(vae, text_encoder.clip, tokenizer[0], text_encoder.t5, tokenizer[1], denoiser)
    from . import dit

    return dit.make_pipeline(vae, text_encoder, tokenizer, denoiser)


def train(out: str | os.PathLike, *, seed: int = 0, n_images: int = 20000, vae_steps: int = 1000,
          vae_batch: int = 32, steps: int = 6000, batch_size: int = 64, lr: float = 1e-3,
          vae_from: str | None = None, kind: str = "unet", loss_weight: str = "uniform",
          ema_decay: float = EMA_DECAY, checkpoint_every: int = 0, denoiser_kwargs: dict | None = None,
          decoder_steps: int = 1500, init_from: str | os.PathLike | None = None) -> Path:
    """Train the pipeline and write it to ``out``; returns the path. See the module docstring."""
    out = Path(out)
    start = time.time()
    torch.manual_seed(seed)
    log: dict = {"command": "python -m tgate_fx.shapes.train " + " ".join(sys.argv[1:]), "kind": kind,
                 "seed": seed, "n_images": n_images, "vae_steps": vae_steps, "vae_batch": vae_batch,
                 "steps": steps, "batch_size": batch_size, "lr": lr, "threads": torch.get_num_threads(),
                 "caption_dropout": CAPTION_DROPOUT, "loss_weight": loss_weight, "ema_decay": ema_decay,
                 "denoiser_kwargs": denoiser_kwargs or {}, "decoder_steps": decoder_steps,
                 "init_from": None if init_from is None else str(init_from)}
    if loss_weight == "min_snr":
        log["min_snr_gamma"] = MIN_SNR_GAMMA
    print(f"[data] rendering {n_images} training pictures", flush=True)
    train_set = data.generate(n_images, seed=seed, split="train")

    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_from).eval()
        log["vae_from"] = str(vae_from)
    else:
        vae = _train_vae(train_set.images, steps=vae_steps, batch_size=vae_batch, seed=seed, log=log)
    if decoder_steps:
        vae = _finetune_decoder(vae, train_set.images, steps=decoder_steps, batch_size=vae_batch, seed=seed,
                                log=log)
    latents = _encode(vae, train_set.images)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    if kind == "flux":
        # FluxPipeline decodes latents / scaling_factor + shift_factor.
        vae.register_to_config(shift_factor=0.0)
    log["vae_seconds"] = round(time.time() - t, 1)
    log["vae_scaling_factor"] = scaling
    # Written now so that the VAE can be checked (or reused with --vae-from)
    # while the denoiser trains.
    vae.save_pretrained(out / "vae", safe_serialization=True)
    print(f"[vae] done in {log['vae_seconds']:.0f}s; scaling_factor {scaling:.4f}", flush=True)
    if steps == 0:
        (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
        print(f"[done] --steps 0: wrote only {out / 'vae'}", flush=True)
        return out

    t = time.time()
    if kind == "unet":
        tokenizer = model.make_tokenizer()
    elif kind == "flux":
        from . import flux

        tokenizer = flux.make_tokenizers()
    else:
        from . import dit

        tokenizer = dit.make_tokenizer()
    log["checkpoints"] = []

    def checkpoint(step, text_encoder, denoiser):
        # A short look at the EMA weights: a few pictures per split.
        from . import evaluate

        was = time.time()
        pipe = _build_pipeline(kind, vae, text_encoder, tokenizer, denoiser)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(out / "checkpoint", safe_serialization=True)
        record = {"step": step}
        for split, every, per_combo in (("train", 5, 1), ("held_out", 1, 1)):
            record[split] = evaluate.baseline_accuracy(pipe, split=split, every=every, per_combo=per_combo)
        print(f"[checkpoint] step {step}: seen {_fmt(record['train'])} | held-out {_fmt(record['held_out'])} "
              f"({time.time() - was:.0f}s)", flush=True)
        log["checkpoints"].append(record)
        denoiser.eval()
        text_encoder.eval()

    text_encoder, denoiser = _train_denoiser(latents * scaling, train_set.captions, tokenizer, steps=steps,
                                             batch_size=batch_size, lr=lr, seed=seed, log=log, kind=kind,
                                             loss_weight=loss_weight, ema_decay=ema_decay,
                                             checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                                             denoiser_kwargs=denoiser_kwargs, init_from=init_from)
    log["denoiser_seconds"] = round(time.time() - t, 1)

    pipe = _build_pipeline(kind, vae, text_encoder, tokenizer, denoiser)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    if (out / "checkpoint").is_dir():
        shutil.rmtree(out / "checkpoint")
    log["total_seconds"] = round(time.time() - start, 1)
    log["parameters"] = {name: sum(p.numel() for p in m.parameters())
                         for name, m in ((kind, denoiser), ("text_encoder", text_encoder), ("vae", vae))}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    _sample_grid(pipe, out / "training_samples.png", seed)
    print(f"[done] wrote {out} in {log['total_seconds']:.0f}s", flush=True)
    return out


def _fmt(accuracy: dict) -> str:
    return " ".join(f"{k} {100 * v:.0f}" for k, v in accuracy.items() if k in data.ATTRIBUTES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shapes text-to-image pipeline.")
    parser.add_argument("--out", required=True, help="directory to write the pipeline to")
    parser.add_argument("--model", choices=("unet", "dit", "flux"), default="unet",
                        help="unet: StableDiffusionPipeline (default); dit: PixArtAlphaPipeline; flux: FluxPipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=20000, help="training pictures rendered")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--decoder-steps", type=int, default=1500,
                        help="steps of further training of the VAE decoder on its frozen encoder (0: none)")
    parser.add_argument("--steps", type=int, default=6000,
                        help="text encoder + denoiser training steps (0: write only the VAE, to DIR/vae)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss-weight", choices=("uniform", "min_snr"), default="uniform",
                        help="per-timestep weight of the v (or epsilon) loss")
    parser.add_argument("--ema-decay", type=float, default=EMA_DECAY)
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="write DIR/checkpoint and print a short accuracy check every N steps (0: never)")
    parser.add_argument("--unet-channels", default=None,
                        help="UNet block_out_channels, comma-separated (default: 32,64,64)")
    parser.add_argument("--dit-width", type=int, default=None, help="PixArt transformer width (default: 128)")
    parser.add_argument("--dit-layers", type=int, default=None, help="PixArt transformer blocks (default: 8)")
    parser.add_argument("--flux-width", type=int, default=None, help="FLUX transformer width (default: 128)")
    parser.add_argument("--flux-layers", default=None,
                        help="FLUX double-stream and single-stream blocks, D,S (default: 3,3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vae-from", default=None, help="reuse the VAE of a trained pipeline's vae/ folder")
    parser.add_argument("--init-from", default=None,
                        help="start the text encoder and denoiser from a trained pipeline directory of the same --model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    denoiser_kwargs = {}
    if args.unet_channels:
        denoiser_kwargs["channels"] = tuple(int(c) for c in args.unet_channels.split(","))
    if args.dit_width:
        denoiser_kwargs["width"] = args.dit_width
    if args.dit_layers:
        denoiser_kwargs["layers"] = args.dit_layers
    if args.flux_width:
        denoiser_kwargs["width"] = args.flux_width
    if args.flux_layers:
        try:
            denoiser_kwargs["double_layers"], denoiser_kwargs["single_layers"] = (
                int(n) for n in args.flux_layers.split(","))
        except ValueError:
            parser.error(f"--flux-layers must be two integers D,S, got {args.flux_layers!r}")
    if (args.unet_channels and args.model != "unet" or (args.dit_width or args.dit_layers) and args.model != "dit"
            or (args.flux_width or args.flux_layers) and args.model != "flux"):
        parser.error("--unet-channels is for --model unet; --dit-width/--dit-layers for --model dit; "
                     "--flux-width/--flux-layers for --model flux")
    train(args.out, seed=args.seed, n_images=args.images, vae_steps=args.vae_steps, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, vae_from=args.vae_from, kind=args.model,
          loss_weight=args.loss_weight, ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
          denoiser_kwargs=denoiser_kwargs or None, decoder_steps=args.decoder_steps,
          init_from=args.init_from)


if __name__ == "__main__":
    # libgomp's worker threads spin while they wait; on a CPU shared with other
    # jobs that makes each step several times slower. The policy is read when
    # torch loads, so it is set by starting again with it.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "tgate_fx.shapes.train", *sys.argv[1:]])
    main()

"""Train the shapes text-to-image pipeline from scratch, on the CPU, deterministically.

    python -m tgate_fx.shapes.train --out DIR

Stages (progress is printed as it goes):

1. render the training pictures (:func:`tgate_fx.shapes.data.generate`,
   training combinations only; the held-out ones are never seen);
2. train the VAE (reconstruction L1 + L2, with pixels of the shape weighted
   up because they are a tenth of the picture, plus a small KL term), then set
   its ``scaling_factor`` so that latents have unit standard deviation;
3. encode the pictures once, and train the text encoder and the UNet together
   on the v-prediction objective over the scheduler's ``linear`` betas, with min-SNR
   loss weighting (gamma 5), an EMA of the weights, and caption dropout (an
   empty caption 10% of the time) so that classifier-free guidance works;
4. write the pipeline (EMA weights) with ``save_pretrained`` to ``DIR``, plus
   ``training_log.json`` (settings, losses, times) and
   ``training_samples.png`` (a few captions, guidance 7.5, 25 steps).

Everything is seeded: the same command on the same machine and thread count
writes the same weights. The defaults took about 22 minutes on 2 CPU cores
shared with other jobs (VAE, 1000 steps: 5 min; text encoder + UNet, 3000
steps of 64: 15-19 min); a busier CPU makes it longer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
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
EMA_DECAY = 0.995


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


@torch.no_grad()
def _encode(vae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(chunk.float() / 127.5 - 1).latent_dist.mode() for chunk in images.split(500)])


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=model.MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def _train_denoiser(latents: torch.Tensor, captions: list[str], tokenizer, *, steps: int, batch_size: int,
                    lr: float, seed: int, log: dict):
    from diffusers import DDPMScheduler

    text_encoder = model.make_text_encoder(tokenizer, seed=seed + 1)
    unet = model.make_unet(seed=seed + 2)
    noise_schedule = DDPMScheduler.from_config(model.make_scheduler().config)
    alphas_cumprod = noise_schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # min-SNR-gamma weighting, in the form for each prediction target.
    v_prediction = noise_schedule.config.prediction_type == "v_prediction"
    loss_weight = snr.clamp(max=MIN_SNR_GAMMA) / (snr + 1 if v_prediction else snr)

    ids = _tokenize(tokenizer, captions)
    empty = _tokenize(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 30)))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    g = torch.Generator().manual_seed(seed + 3)
    progress = _Progress("denoiser", steps, 50)
    losses = []
    unet.train()
    text_encoder.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        tokens[torch.rand(batch_size, generator=g) < CAPTION_DROPOUT] = empty
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = noise_schedule.add_noise(x0, noise, t)
        prediction = unet(noisy, t, text_encoder(tokens)[0]).sample
        target = noise_schedule.get_velocity(x0, noise, t) if v_prediction else noise
        per_sample = (prediction - target).pow(2).mean((1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, p in ema_pairs:
                ema.lerp_(p, 1 - decay)
        losses.append(per_sample.mean().item())
        progress(step, mse=sum(losses[-50:]) / len(losses[-50:]))
    log["denoiser_mse_last200"] = sum(losses[-200:]) / len(losses[-200:])
    log["denoiser_mse_curve"] = [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                                 for i in range(0, len(losses), 100)]
    return ema_text, ema_unet


def _sample_grid(pipe, path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    combos = data.combinations("held_out")[:: max(1, len(data.combinations("held_out")) // 8)][:8]
    out = pipe([c.caption for c in combos], num_inference_steps=25, guidance_scale=7.5, output_type="np",
               generator=torch.Generator().manual_seed(seed)).images
    row = (np.concatenate(list(out), axis=1) * 255).round().astype("uint8")
    Image.fromarray(row).resize((row.shape[1] * 4, row.shape[0] * 4), Image.NEAREST).save(path)


def train(out: str | os.PathLike, *, seed: int = 0, n_images: int = 20000, vae_steps: int = 1000,
          vae_batch: int = 32, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3,
          vae_from: str | None = None) -> Path:
    """Train the pipeline and write it to ``out``; returns the path. See the module docstring."""
    out = Path(out)
    start = time.time()
    torch.manual_seed(seed)
    log: dict = {"seed": seed, "n_images": n_images, "vae_steps": vae_steps, "vae_batch": vae_batch,
                 "steps": steps, "batch_size": batch_size, "lr": lr, "threads": torch.get_num_threads(),
                 "caption_dropout": CAPTION_DROPOUT, "min_snr_gamma": MIN_SNR_GAMMA, "ema_decay": EMA_DECAY}
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
    latents = _encode(vae, train_set.images)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    log["vae_seconds"] = round(time.time() - t, 1)
    log["vae_scaling_factor"] = scaling
    # Written now so that the VAE can be checked (or reused with --vae-from)
    # while the denoiser trains.
    vae.save_pretrained(out / "vae", safe_serialization=True)
    print(f"[vae] done in {log['vae_seconds']:.0f}s; scaling_factor {scaling:.4f}", flush=True)

    t = time.time()
    tokenizer = model.make_tokenizer()
    text_encoder, unet = _train_denoiser(latents * scaling, train_set.captions, tokenizer, steps=steps,
                                         batch_size=batch_size, lr=lr, seed=seed, log=log)
    log["denoiser_seconds"] = round(time.time() - t, 1)

    pipe = model.make_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    log["total_seconds"] = round(time.time() - start, 1)
    log["parameters"] = {name: sum(p.numel() for p in m.parameters())
                         for name, m in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae))}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    _sample_grid(pipe, out / "training_samples.png", seed)
    print(f"[done] wrote {out} in {log['total_seconds']:.0f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shapes text-to-image pipeline.")
    parser.add_argument("--out", required=True, help="directory to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=20000, help="training pictures rendered")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000, help="text encoder + UNet training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vae-from", default=None, help="reuse the VAE of a trained pipeline's vae/ folder")
    args = parser.parse_args(argv)
    train(args.out, seed=args.seed, n_images=args.images, vae_steps=args.vae_steps, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, vae_from=args.vae_from)


if __name__ == "__main__":
    # libgomp's worker threads spin while they wait; on a CPU shared with other
    # jobs that makes each step several times slower. The policy is read when
    # torch loads, so it is set by starting again with it.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "tgate_fx.shapes.train", *sys.argv[1:]])
    main()

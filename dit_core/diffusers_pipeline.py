"""A class-conditional DiT pipeline for plain diffusers, shipped as ``pipeline.py`` inside every
folder ``dit export`` writes, so that the folder loads in a Python that has only torch and
diffusers (this file imports nothing of the project)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)   # folder/pipeline.py
    images = pipe(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=20).images

What it does that diffusers' ``DiTPipeline`` does not:
- the null class of classifier-free guidance is the model's own (``num_embeds_ada_norm``, the
  number of classes), not the hard-coded 1000, so guidance works for any number of classes;
- both training objectives: ``DDIMScheduler`` folders are the paper's epsilon models (a learned
  variance's half of the output is dropped), ``FlowMatchEulerDiscreteScheduler`` folders are flow
  models (velocity v = eps - x_0 along x_t = (1 - t) x_0 + t eps, Euler from t = 1 to 0 on a uniform
  grid, network time t * num_train_timesteps): the project's ``euler`` sampler;
- the official DiT's timestep features (frequencies 10000^(-i/128); diffusers hard-codes -i/127);
- guidance on every latent channel (the project's default, ``guided_channels: null``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer, vae, scheduler, id2label: dict[str, str] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        for block in transformer.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0   # the official DiT's timestep features
        self.labels: dict[str, int] = {}
        for key, names in (id2label or {}).items():
            for name in str(names).split(","):
                self.labels[name.strip()] = int(key)

    @property
    def num_classes(self) -> int:
        """The model's classes; its null class (the unconditional label) is this number."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def objective(self) -> str:
        return "flow" if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler) else "eps"

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids of class names (the folder's ``id2label``)."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise ValueError(f"{unknown} are not class names of this model; known: {sorted(self.labels)}")
        return [self.labels[n] for n in names]

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int], guidance_scale: float = 2.0, generator=None,
                 num_inference_steps: int = 20, output_type: str = "pil", return_dict: bool = True,
                 latents: torch.Tensor | None = None):
        """Images of ``class_labels``; ``latents``: the initial noise (N, C, H, W), else drawn with ``generator``."""
        device = self._execution_device
        labels = torch.as_tensor(list(class_labels), device=device, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class_labels {list(class_labels)} must be class ids 0..{self.num_classes - 1}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1")
        config = self.transformer.config
        channels, size = int(config.in_channels), int(config.sample_size)
        shape = (len(labels), channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this model and these labels need {shape}")
        latents = latents.to(device=device, dtype=self.transformer.dtype)
        guided = guidance_scale > 1
        y = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        if self.objective == "flow":   # t from 1 (noise) down to 0, uniform; the scheduler appends t = 0
            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1], device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if guided else latents
            x = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
            timesteps = t.reshape(1).expand(x.shape[0]).to(device)
            out = self.transformer(x, timestep=timesteps, class_labels=y).sample[:, :channels]  # eps or v (no variance half)
            if guided:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents).prev_sample
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

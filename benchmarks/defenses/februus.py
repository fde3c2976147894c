"""Februus-style input purification: find the trigger with Grad-CAM, cut it out, inpaint, classify (2 passes).

Doan, Abbasnejad, Ranasinghe, "Februus: Input Purification Defense Against Trojan Attacks on Deep
Neural Network Systems" (ACSAC 2020). For every input: Grad-CAM (Selvaraju et al., ICCV 2017) of
the predicted class at the last convolutional stage locates the region the decision rests on;
pixels whose normalised heat exceeds ``cam_threshold`` are removed and filled in; the restored
image is classified.

How ours differs: Februus fills the hole with a GAN inpainter trained on the task's clean data;
here no generative model is trained, so the hole is filled by OpenCV's Telea inpainting
(``cv2.inpaint``), a classical method that propagates the surrounding pixels. It restores texture
less faithfully on large holes, so the clean-accuracy cost can be higher than the paper's.
Cost: two forward passes (and one backward pass for Grad-CAM) per input.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from fire_adapters.preprocess import to_tensor, to_uint8
from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, register_defense
from fire_bench.defenses.gradcam import grad_cam
from fire_defense import FireDefenseError

__all__ = ["Februus"]


@register_defense
class Februus(RuntimeDefense):
    """Grad-CAM mask above ``cam_threshold``, OpenCV inpainting of radius ``inpaint_radius``, then classify.

    Args:
        layer: The layer for Grad-CAM (a convolutional map, or a transformer block's tokens): a name, ``'last'``
            for the last stage output, or an integer, the stage's position (``2``: the third stage).
        cam_threshold: Heat (Grad-CAM normalised to [0, 1] per image) above which pixels are removed.
        inpaint_radius: Neighbourhood of Telea's inpainting, in pixels.
    """

    name = "februus"
    source = "Doan et al., Februus, ACSAC 2020 (GAN inpainting replaced by OpenCV Telea)"

    def __init__(
        self, *, layer: str | int = "last", cam_threshold: float = 0.7, inpaint_radius: int = 3, **common: int
    ) -> None:
        super().__init__(**common)
        self.layer = layer
        self.cam_threshold = cam_threshold
        self.inpaint_radius = inpaint_radius

    @property
    def forward_passes(self) -> float:
        return 2.0

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if not 0 < self.cam_threshold < 1 or self.inpaint_radius < 1:
            raise FireDefenseError("februus: cam_threshold must be in (0, 1) and inpaint_radius >= 1.")
        self.layer_ = self._layer(self.layer)

    def heatmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grad-CAM of the predicted class, ``(N, H, W)`` in [0, 1] at the input's size, and the predictions."""
        return grad_cam(self.model_, self.layer_, x, self.name)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its high-heat region removed and inpainted."""
        heat, _ = self.heatmap(x)
        masks = (heat > self.cam_threshold).cpu().numpy().astype(np.uint8)
        images = to_uint8(x)
        restored = np.stack(
            [
                cv2.inpaint(np.ascontiguousarray(image), mask, self.inpaint_radius, cv2.INPAINT_TELEA).reshape(
                    image.shape
                )
                for image, mask in zip(images, masks, strict=True)
            ]
        )
        return to_tensor(restored, x.device, x.dtype)

    def _decide(self, x: torch.Tensor) -> Decision:
        return Decision(self._logits(self.purify(x)).argmax(1), None)

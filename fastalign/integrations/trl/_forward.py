"""The policy forward GRPO's and RLOO's `_compute_loss` start with, as TRL writes it: prompt and
completion joined, the trainer's own `_get_per_token_logps_and_entropies` (whose fused LM head
fastalign serves once patched), the multimodal inputs passed through."""

from __future__ import annotations

import torch

# The multimodal inputs TRL's forward takes, passed on as TRL passes them.
FORWARD_EXTRAS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                  "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def completion_logps_and_entropies(trainer, model, inputs):
    """(per-token log-probs [B, T], entropies [B, T], aux loss or None) over the completion tokens."""
    completion_ids = inputs["completion_ids"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled, **{key: inputs.get(key) for key in FORWARD_EXTRAS},
    )

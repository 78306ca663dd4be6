"""Hugging Face Trainer and a routed model: each checkpoint the Trainer writes is a sparsify checkpoint too.

    trainer = Trainer(model=routed, args=args, train_dataset=ds,     # rows carry input_ids, labels, modality_ids
                      callbacks=[sparsify.trainer.RoutedCheckpoints()])
    trainer.train(); trainer.train(resume_from_checkpoint=True)      # Trainer's own resume: weights, optimizer, rng
    sparsify.load("out/checkpoint-3")                                # the same directory, as a routed model

The Trainer saves a model that is not a PreTrainedModel as its state dict (model.safetensors under the
dense FQNs, routed parameters stacked [M, *S]): sparsify's tensor layout already. This callback adds what
the Trainer cannot know: sparsify.json (the plan) and the model's config.json.
"""
from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sparsify.errors import SparsifyError
from sparsify.routed_model import RoutedModel


def routed_model_of(model) -> RoutedModel:
    """The RoutedModel inside what the Trainer holds (itself, or under PEFT's / accelerate's wrappers)."""
    seen = model
    while not isinstance(seen, RoutedModel):
        inner = getattr(seen, "module", None) or getattr(seen, "base_model", None) or getattr(seen, "model", None)
        if inner is None or inner is seen:
            raise SparsifyError(f"RoutedCheckpoints is for a Trainer training a sparsify routed model; "
                                f"{type(model).__name__} holds none")
        seen = inner
    return seen


class RoutedCheckpoints(TrainerCallback):
    """Writes sparsify.json and config.json into every checkpoint directory the Trainer saves."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        from sparsify.api import write_description
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        write_description(routed_model_of(model), directory)

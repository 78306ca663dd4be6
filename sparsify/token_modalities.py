"""Modality ids from the tokens themselves, for models whose vocabulary marks the other modalities.

A Hugging Face vision-language or speech-text model puts a placeholder token where each image patch, video
frame or audio frame goes (`image_token_id`, `video_token_id`, `audio_token_id`, begin/end markers such as
Gemma's `boi_token_index`), and its config names them. Those positions are the image / audio tokens a
Mixture-of-Transformers routes apart from text:

    ids = sparsify.modality_ids_from_tokens(model, input_ids)          # text 0, image and video 1, audio 2
    routed(input_ids, modality_ids=ids, pixel_values=...)
    routed.generate(input_ids, modality_ids=ids, next_modality=sparsify.token_modalities(model))

This reads the config's token-id names (a frontend's knowledge of transformers' conventions); routing itself
never does.
"""
from __future__ import annotations

import torch

from sparsify.errors import SparsifyError
from sparsify.frontends.huggingface import placeholder_token_fields

DEFAULT_MODALITIES = {"text": 0, "image": 1, "video": 1, "audio": 2}
# Words in a config's token-id names, by the modality they mark ("boi": begin of image, "boa": begin of audio).
KIND_WORDS = {"image": ("image", "boi", "eoi", "vision"), "video": ("video",), "audio": ("audio", "boa", "eoa", "speech")}


def placeholder_tokens(model_or_config) -> dict[str, set[int]]:
    """{"image": {token ids}, "video": ..., "audio": ...}: the placeholder token ids the config (and its
    sub-configs: text, vision, audio) names, by kind; kinds the model has none of are left out. A RoutedModel
    shows its dense model's config."""
    found: dict[str, set[int]] = {}
    for name, ids in placeholder_token_fields(getattr(model_or_config, "config", model_or_config)):
        kind = next((k for k, words in KIND_WORDS.items() if any(w in name for w in words)), None)
        if kind and ids:
            found.setdefault(kind, set()).update(ids)
    return found


def token_modalities(model, modalities: dict[str, int] | None = None) -> dict:
    """The model's placeholder tokens as a `next_modality` mapping for `routed.generate`:
    {range(t, t + 1): modality, ..., "default": the text modality}. `modalities` maps "text", "image",
    "video", "audio" to modality ids (default: text 0, image and video 1, audio 2)."""
    chosen = {**DEFAULT_MODALITIES, **(modalities or {})}
    unknown = set(chosen) - set(DEFAULT_MODALITIES)
    if unknown:
        raise SparsifyError(f"modalities= names {sorted(unknown)}; the kinds are {sorted(DEFAULT_MODALITIES)}")
    count = getattr(getattr(model, "plan", None), "modalities", None)
    for kind, modality in chosen.items():
        if isinstance(modality, bool) or not isinstance(modality, int) or modality < 0 \
                or (count is not None and modality >= count):
            raise SparsifyError(f"modalities[{kind!r}]={modality!r} is not a modality id of this model"
                                + (f" (ids lie in [0, {count}))" if count is not None else ""))
    placeholders = placeholder_tokens(model)
    if not placeholders:
        raise SparsifyError(f"{type(getattr(model, '_dense', model)).__name__}'s config names no image, video or "
                            "audio placeholder token ids (image_token_id, ...): build modality_ids yourself, one id "
                            "per token")
    mapping: dict = {range(t, t + 1): chosen[kind] for kind, ids in placeholders.items() for t in sorted(ids)}
    mapping["default"] = chosen["text"]
    return mapping


def modality_ids_from_tokens(model, input_ids: torch.Tensor, modalities: dict[str, int] | None = None) -> torch.Tensor:
    """LongTensor like `input_ids`: each placeholder token's modality (image, video, audio), the text modality
    elsewhere. See `token_modalities` for `modalities`."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise SparsifyError(f"input_ids must be an integer tensor of token ids, got {type(input_ids).__name__} "
                            f"{getattr(input_ids, 'dtype', '')}")
    mapping = token_modalities(model, modalities)
    ids = torch.full_like(input_ids, mapping.pop("default"), dtype=torch.long)
    for tokens, modality in mapping.items():
        ids[input_ids == tokens.start] = modality
    return ids

"""What ``fp8coat train`` does differently for a vision-language model (LLaVA, Qwen2-VL, Qwen2.5-VL).

The trainer (:mod:`fp8coat.train.loop`) calls this module through a few explicit branches: the model and its data
(:func:`setup_vlm`), a step's loss (:func:`vlm_step_loss`), the validation loss, the bytes saved for backward split
into the vision side and the LM (:func:`saved_bytes`) and the captioning accuracy (:func:`caption_exact_match`).

* Model: a preset of :data:`~fp8coat.train.vlm_presets.VLM_PRESETS` (random init, its processor around a tokenizer
  made for the data), or a checkpoint folder of a VLM (``from_pretrained`` with the processor saved next to it:
  fine-tuning, or the checkpoint of a run resumed). A model is a VLM when it is such a preset or its
  ``config.json`` names a ``model_type`` of :data:`VLM_MODEL_TYPES`.
* Tokenizer: ``--tokenizer bpe`` trains the family's byte-level BPE on the records' texts (at most
  ``--vocab-size`` tokens; cached), ``bytes`` takes the family's byte-level one; a tokenizer.json path is refused
  (a VLM's tokenizer needs the family's special tokens). A resumed run or a fine-tune of a checkpoint reuses the
  checkpoint's processor (tokenizer, image processor, chat template).
* Data: ``--data`` is an image-text source (``synthetic``, ``synthetic:N``, ``digits``, a JSONL file or folder:
  ``docs/vlm_data.md``); every batch is padded and cut to exactly ``--seq-len`` tokens, so a step has
  ``batch_size × grad_accum × seq_len`` token positions (image tokens and padding included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

import torch

from ..compiling import compile_layers
from .data import ImageTextData, batch_to, load_image_text, prepare_image_text, record_texts, vlm_tokenizer
from .data.corpus import MIXES, NAMED_CORPORA
from .data.image_sources import IMAGE_SOURCES, describe_image_source
from .data.vlm_encode import load_rgb
from .presets import model_config
from .vlm_loss import vlm_loss
from .vlm_presets import VLM_PRESETS, build_vlm, preset_family

__all__ = [
    "VLM_MODEL_TYPES",
    "VlmData",
    "caption_exact_match",
    "check_vlm_options",
    "compile_vlm",
    "is_image_text_source",
    "is_vlm",
    "saved_bytes",
    "setup_vlm",
    "vlm_step_loss",
    "vlm_val_loss",
]

VLM_MODEL_TYPES = {"llava": "llava", "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl"}  # model_type -> family
TEXT_CORPORA = (*NAMED_CORPORA, *MIXES)
CAPTION_TOKENS = 16  # max_new_tokens of the captioning evaluation


def _model_type(model: str) -> str | None:
    """The ``model_type`` of ``--model``'s config, None where it names none (the text path names the problem)."""
    try:
        return model_config(model)["model_type"]
    except ValueError:
        return None


def is_vlm(model: str) -> bool:
    """Whether ``--model`` is a vision-language model: a VLM preset, or a config JSON / checkpoint folder whose
    ``model_type`` is in :data:`VLM_MODEL_TYPES`. ValueError for another image-text-to-text model type."""
    if model in VLM_PRESETS:
        return True
    kind = _model_type(model)
    if kind in VLM_MODEL_TYPES:
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--model {model} is a {kind} vision-language model, which fp8coat train does not support "
                         f"(it trains model types {', '.join(VLM_MODEL_TYPES)} and the presets "
                         f"{', '.join(VLM_PRESETS)})")
    return False


def is_image_text_source(data: str) -> bool:
    """Whether ``--data`` names image-text data: ``synthetic``, ``synthetic:N``, ``digits``, a ``.jsonl`` file or
    a folder holding ``data.jsonl``."""
    if data in IMAGE_SOURCES or data.startswith("synthetic:"):
        return True
    return data.endswith(".jsonl") or os.path.isfile(os.path.join(data, "data.jsonl"))


def check_vlm_options(cfg, model: str, sharded: bool) -> None:
    """ValueError for options a VLM run does not take."""
    if sharded or cfg.fsdp == "on":
        raise ValueError(f"--model {model} is a vision-language model: fp8coat train runs it in one process "
                         "(FSDP of VLMs is not supported); pass --fsdp off and start it without torchrun")
    if cfg.fp8_all_gather:
        raise ValueError("--fp8-all-gather needs FSDP, which vision-language models do not support")
    if cfg.tokenizer not in ("bpe", "bytes"):
        raise ValueError(f"--tokenizer {cfg.tokenizer}: a vision-language model takes --tokenizer bpe (the family's "
                         "BPE trained on the records' texts) or bytes (the family's byte-level tokenizer); a "
                         "tokenizer.json lacks the image and chat tokens of the model's family")
    if "," in cfg.data or not is_image_text_source(cfg.data):
        raise ValueError(f"--model {model} is a vision-language model: --data must be image-text data (synthetic, "
                         f"synthetic:N, digits, a JSONL file or a folder holding data.jsonl; docs/vlm_data.md), "
                         f"got {cfg.data!r}" + (" (a text corpus)" if cfg.data in TEXT_CORPORA else ""))


@dataclass(frozen=True)
class VlmData:
    """A VLM run's data: the records with the processor that encodes them."""

    images: ImageTextData
    processor: object

    @property
    def source(self) -> str:
        return self.images.source

    def identity(self) -> dict:
        """What identifies the training data (checked on resume, :func:`fp8coat.train.runs.check_same_data`): the
        source, the tokenizer's sha256, the records' sha256 and the split."""
        tokenizer = self.processor.tokenizer.backend_tokenizer.to_str()
        return {"source": self.images.source, "tokenizer": hashlib.sha256(tokenizer.encode()).hexdigest()[:16],
                "records_sha256": self.images.records_sha256[:16], "train_records": len(self.images.train),
                "val_records": len(self.images.val)}


def _load_processor(folder: str, family: str):
    """The processor saved in ``folder`` (``processor.save_pretrained``); ValueError if there is none."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise ValueError(f"{folder} holds no processor (tokenizer.json, preprocessor_config.json): a vision-language "
                         "checkpoint is trained with the processor saved next to it")
    if family == "qwen2-vl":
        from .vlm_processors import Qwen2VLImageOnlyProcessor

        return Qwen2VLImageOnlyProcessor.from_pretrained(folder)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def setup_vlm(cfg, model_source: str, ckpt: str | None, dtype: torch.dtype, device: torch.device
              ) -> tuple[torch.nn.Module, VlmData, str]:
    """``(model, data, description)`` of a VLM run (see the module docstring): the model unconverted, in
    ``dtype`` on ``device``; the processor of checkpoint ``ckpt`` (a resumed run) or of ``model_source`` when
    it is a checkpoint folder, else one made for the data."""
    try:
        records = load_image_text(cfg.data)
    except ValueError as err:
        raise ValueError(f"--data {cfg.data} is not image-text data for the vision-language model {cfg.model}: "
                         f"{err}") from None
    if model_source in VLM_PRESETS:
        family = preset_family(model_source)
        if ckpt is not None:
            tokenizer = _load_processor(ckpt, family).tokenizer
        else:
            texts = record_texts(records) if cfg.tokenizer == "bpe" else None
            tokenizer = vlm_tokenizer(family, texts, cfg.vocab_size)
        model, processor = build_vlm(model_source, tokenizer, dtype=dtype, device=device, seed=cfg.seed)
        source = f"preset {model_source}"
    elif os.path.isdir(model_source):
        import transformers

        family = VLM_MODEL_TYPES[_model_type(model_source)]
        processor = _load_processor(ckpt or model_source, family)
        model = transformers.AutoModelForImageTextToText.from_pretrained(model_source, dtype=dtype,
                                                                         attn_implementation="sdpa").to(device)
        rows = model.get_input_embeddings().num_embeddings
        if len(processor.tokenizer) > rows:
            raise ValueError(f"the tokenizer of {model_source} has {len(processor.tokenizer)} tokens but the model "
                             f"embeds only {rows}")
        source = f"pretrained {model_source}"
    else:
        raise ValueError(f"--model {model_source}: fp8coat train takes a vision-language model as a preset "
                         f"({', '.join(VLM_PRESETS)}) or a checkpoint folder with its processor; an HF config "
                         "JSON of a VLM names no processor (start from a preset)")
    images = prepare_image_text(records, processor, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                                seed=cfg.seed)
    images = dataclasses.replace(images, source=describe_image_source(cfg.data))
    return model, VlmData(images, processor), source


def vlm_step_loss(model, batch: dict[str, torch.Tensor], autocast: bool, chunked: bool) -> torch.Tensor:
    """The loss of ``batch`` (on the model's device): :func:`~fp8coat.train.vlm_loss.vlm_loss`, under bf16
    autocast when ``autocast``."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        return vlm_loss(model, batch, chunked=chunked)


def to_model(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """``batch`` on the model's device, ``pixel_values`` in the dtype of its parameters."""
    p = next(model.parameters())
    return batch_to(batch, p.device, p.dtype)


@torch.no_grad()
def vlm_val_loss(model, val: list[dict], autocast: bool) -> float:
    """Mean loss over the validation batches ``val``, in eval mode (unquantized forward)."""
    was_training = model.training
    model.eval()
    total = sum(vlm_step_loss(model, to_model(b, model), autocast, chunked=False).item() for b in val) / len(val)
    model.train(was_training)
    return total


def _is_vision(name: str) -> bool:
    """Modules of the vision side: the tower (Qwen's patch merger included) and LLaVA's projector."""
    return name.startswith(("model.vision_tower", "model.visual", "model.multi_modal_projector"))


def saved_bytes(model, batch: dict[str, torch.Tensor], autocast: bool) -> dict:
    """Bytes the model's body (``model.model``: no LM head, no loss) keeps for backward for ``batch``, counted on
    the model's device: ``saved_vision_bytes`` (the vision tower and the projector / merger), ``saved_lm_bytes``
    (the rest: the LM's embedding and decoder layers, and what no module claims) and ``saved_activation_bytes``,
    their sum."""
    from ..memory import measure_saved_tensors

    inputs = {k: v for k, v in to_model(batch, model).items() if k != "labels"}
    model.train()

    def body():
        with torch.autocast(inputs["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
            return model.model(**inputs, use_cache=False).last_hidden_state

    _, saved = measure_saved_tensors(body, modules=model)
    vision = sum(n for name, n in saved.by_module.items() if _is_vision(name))
    return {"saved_activation_bytes": saved.total_bytes, "saved_vision_bytes": vision,
            "saved_lm_bytes": saved.total_bytes - vision}


@torch.no_grad()
def caption_exact_match(model, data: VlmData, n: int) -> float | None:
    """Share of the first ``n`` held-out records whose answer greedy generation reproduces exactly: the prompt is
    the record's text up to its first learned span (image and question), at most :data:`CAPTION_TOKENS` new
    tokens, compared with that span (the caption, or the first answer) without its end token, both stripped.
    In eval mode (unquantized forward); None when ``n`` is 0."""
    records = data.images.val[:n]
    if not records:
        return None
    fmt, processor = data.images.chat_format, data.processor
    tokenizer = processor.tokenizer
    stops = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
    was_training = model.training
    model.eval()
    hits = 0
    for record in records:
        text, spans = fmt.render(record)
        start, end = spans[0]
        ending = fmt.caption_end if record.caption else fmt.answer_end
        target = text[start:end].removesuffix(ending).strip()
        inputs = processor(images=[load_rgb(record.image)], text=[text[:start]], return_tensors="pt")
        inputs = to_model(dict(inputs), model)
        out = model.generate(**inputs, max_new_tokens=CAPTION_TOKENS, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[-1] if stops else None)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += answer.strip() == target
    model.train(was_training)
    return hits / len(records)


def compile_vlm(model) -> int:
    """``--compile`` for a VLM: each decoder layer of the LM and each block of the vision tower compiled in place
    (:func:`fp8coat.compiling.compile_layers`); returns the number of layers compiled."""
    inner = model.model
    layers = list(inner.language_model.layers)
    visual = getattr(inner, "visual", None)
    if visual is not None:  # Qwen2-VL / Qwen2.5-VL
        layers += list(visual.blocks)
    else:  # LLaVA: a CLIP or SigLIP vision model (its encoder under .vision_model, or directly)
        tower = inner.vision_tower
        layers += list(getattr(tower, "vision_model", tower).encoder.layers)
    return compile_layers(layers)


def data_workers(requested: int, device: torch.device) -> int:
    """Processes that encode image-text batches ahead: ``requested`` when >= 0; for -1 (auto), on a GPU
    ``min(4, CPUs // 2)`` (at least 1), on the CPU none (the training process would compete with them)."""
    if requested >= 0:
        return requested
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


def train_batches(data: VlmData, batch_size: int, start_step: int, workers: int = 0):
    """The run's training batches (on the CPU) from micro-batch ``start_step`` on; ``workers`` > 0 encodes them
    ahead in that many processes (the same batches, in the same order)."""
    return data.images.train_batches(batch_size, start_step=start_step, workers=workers)

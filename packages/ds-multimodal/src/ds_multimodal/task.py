"""`AlignTask`: the aligner as a ds-trainer task, so `ds-train align.yaml` trains it.

ds-trainer owns the loop (optimizer, schedule, precision, checkpoints, resume, metrics, progress);
this module supplies what is specific to alignment: the model, the built-in dataset, batching, the
cross-modal loss with its named terms, evaluation and the model directory. Registered under the
entry point group ``ds_trainer.tasks`` as ``align`` (see pyproject.toml).

``task_options`` (every key optional; an unknown key or a bad value is an error naming
``task_options.<field>``):

  alpha, beta, gamma, delta_audio   weights of L_text, L_image, L_video, L_audio (default 1.0)
  audio            use spoken digits when espeak-ng is available (default true)
  encoder          EncoderConfig fields, e.g. {hidden_dim: 64, n_layers: 2}
  max_train_items  0 = the whole train split
  cache_dir        where synthesised audio is cached ("" = ~/.cache/ds-multimodal)
  calibrate        fit CrossModalCalibration on the calibration split before each save (default true)
  num_threads      torch intra-op threads for the process (default 1: tiny ops; 0 = leave as is)

Batches use ds-trainer's ``data.micro_batch_size`` as the contrastive batch; ``seed`` picks the split.
The eval dataset is the calibration split (held out from training; the test split stays untouched
for `ds-multimodal eval`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ds_multimodal.data import CLASS_CAPTIONS, DigitsDataset, load_digits_multimodal
from ds_multimodal.encoders import EncoderConfig, tokenize
from ds_multimodal.errors import DsMultimodalError
from ds_multimodal.losses import cross_modal_loss
from ds_multimodal.model import AlignerConfig, MultimodalAligner
from ds_multimodal.retrieval import recall_at_k
from ds_multimodal.train import fit_calibration
from ds_trainer.errors import TrainerError
from ds_trainer.tasks import Task


class AlignOptionsError(DsMultimodalError, TrainerError):
    """Bad ``task_options``: caught as ds-trainer's bad-input error (one line, exit 2)."""


@dataclasses.dataclass
class AlignOptions:
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    delta_audio: float = 1.0
    audio: bool = True
    encoder: dict = dataclasses.field(default_factory=dict)
    max_train_items: int = 0
    cache_dir: str = ""
    calibrate: bool = True
    num_threads: int = 1  # torch intra-op threads on CPU (see TrainConfig.num_threads); 0 = leave as is

    @classmethod
    def from_dict(cls, options: dict | None) -> AlignOptions:
        if not isinstance(options or {}, dict):
            raise AlignOptionsError(f"task_options: expected a mapping, got {type(options).__name__}")
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in options.items():
            if key not in fields:
                raise AlignOptionsError(
                    f"task_options.{key}: unknown option; expected one of {', '.join(fields)}"
                )
            want = {"float": (int, float), "bool": (bool,), "dict": (dict,), "int": (int,), "str": (str,)}
            kind = fields[key].type
            if not isinstance(value, want[kind]) or (kind in ("float", "int") and isinstance(value, bool)):
                raise AlignOptionsError(f"task_options.{key}: expected {kind}, got {value!r}")
            if kind in ("float", "int") and value < 0:
                raise AlignOptionsError(f"task_options.{key}: expected a number >= 0, got {value!r}")
        out = cls(**options)
        try:
            out.encoder_config()
        except (DsMultimodalError, TypeError) as e:
            raise AlignOptionsError(f"task_options.encoder: {e}") from None
        return out

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(**self.encoder)


def collate_items(items: list[dict], max_text_len: int) -> dict[str, torch.Tensor]:
    """Items of `DigitsDataset` -> a batch dict of tensors (captions tokenized, left-padded).

    A modality is kept only if every item has it (a batch trains on what is there).
    """
    ids, mask = tokenize([it["caption"] for it in items], max_text_len)
    batch = {"text_ids": ids, "text_mask": mask, "labels": torch.tensor([it["label"] for it in items])}
    for m in ("image", "video", "audio"):
        if all(it.get(m) is not None for it in items):
            batch[m] = torch.stack([it[m] for it in items])
    return batch


class AlignTask(Task):
    """Contrastive text-image-video-audio alignment on the built-in digits dataset."""

    name = "align"

    def __init__(self, options: dict, cfg: Any) -> None:
        self.options = AlignOptions.from_dict(options)
        self.cfg = cfg
        self.seed = int(getattr(cfg, "seed", 0))
        self._calibration_split: DigitsDataset | None = None

    # ---- model ----

    def build_model(self) -> nn.Module:
        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        with_audio = self.options.audio and self._split("calibration").audio is not None
        return MultimodalAligner(AlignerConfig(encoder=self.options.encoder_config(), audio=with_audio))

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model = getattr(model, "module", model)  # a DDP wrapper, if the trainer passes one
        was_training = model.training
        if self.options.calibrate:
            # The calibration is fitted after the encoders, on held-out data (see calibration.py);
            # it never touches the encoder weights or the global RNG, so training continues unchanged.
            fit_calibration(model, self._split("calibration"), seed=self.seed)
        model.save_pretrained(
            directory, provenance={"task": "align", "task_options": dataclasses.asdict(self.options)}
        )
        model.train(was_training)

    @classmethod
    def load_model(cls, directory: Path) -> nn.Module:
        return MultimodalAligner.from_pretrained(directory)

    # ---- data ----

    def _split(self, split: str) -> DigitsDataset:
        if split == "calibration" and self._calibration_split is not None:
            return self._calibration_split
        data = load_digits_multimodal(
            split,
            seed=self.seed,
            audio=self.options.audio,
            cache_dir=self.options.cache_dir or None,
            limit=self.options.max_train_items if split == "train" else 0,
        )
        if split == "calibration":
            self._calibration_split = data
        return data

    def build_datasets(self) -> tuple[DigitsDataset, DigitsDataset]:
        return self._split("train"), self._split("calibration")

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        return collate_items(items, self.options.encoder_config().max_text_len)

    # ---- loss and evaluation ----

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = self._loss(*model(batch), batch["labels"])
        terms = out.log_dict()
        terms.pop("loss")
        return out.total, terms

    def _loss(self, emb: dict, logit_scale: torch.Tensor, labels: torch.Tensor):
        o = self.options
        return cross_modal_loss(
            emb, o.alpha, o.beta, o.gamma, o.delta_audio, logit_scale=logit_scale, labels=labels
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]:
        """Mean loss, class-level text->x Recall@1 and zero-shot accuracy on `dataset` (the calibration split)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        emb: dict[str, list[torch.Tensor]] = {}
        losses = []
        for i in range(0, len(dataset), 128):
            batch = self.collate([dataset[j] for j in range(i, min(i + 128, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            batch_emb, logit_scale = model(batch)
            losses.append(float(self._loss(batch_emb, logit_scale, batch["labels"]).total))
            for m, e in batch_emb.items():
                emb.setdefault(m, []).append(e)
        ids, mask = tokenize(list(CLASS_CAPTIONS), self.options.encoder_config().max_text_len)
        classes = model({"text_ids": ids.to(device), "text_mask": mask.to(device)})[0]["text"]  # (10, E)
        model.train(was_training)
        labels = torch.as_tensor([dataset[j]["label"] for j in range(len(dataset))], device=device)
        full = {m: torch.cat(v) for m, v in emb.items()}
        out = {"loss": sum(losses) / len(losses)}
        for m in full:
            if m != "text":
                out[f"R@1/text->{m}"] = recall_at_k(full["text"] @ full[m].T, labels, labels, 1)
                out[f"zero_shot/{m}"] = float(((full[m] @ classes.T).argmax(1) == labels).float().mean())
        return out

"""Image-text plugins: the ``captions`` data stage, the ``clip`` dual encoder and the
``captioner`` (BLIP-style) architectures, and their ``clip_report`` and
``caption_report`` evaluation stages.

Implementations live in :mod:`dlpipe.datasets.captions`, :mod:`dlpipe.models.clip.model`,
:mod:`dlpipe.models.captioner.model`, :mod:`dlpipe.stages.reports.clip` and
:mod:`dlpipe.stages.reports.caption`; nothing heavy is imported here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dlpipe import hookimpl
from dlpipe.params import Params
from dlpipe.stages.data import SplitParams


class CaptionsParams(SplitParams):
    """Image-caption pairs generated from a seed: captioned digits or shapes."""

    source: Literal["digits", "shapes"] = Field(
        "digits", description="digits: scikit-learn's 8x8 digits ('a handwritten seven', "
        "'the number 7'); shapes: procedural coloured shapes ('a red circle')."
    )
    templates: list[str] | None = Field(
        None, min_length=1, description="Caption templates, one drawn per image (per object "
        "for shapes). Placeholders: {label}; digits {digit} {word}; shapes {color} {shape}. "
        "Default: digits 'a handwritten {word}', 'the number {digit}', 'a picture of a "
        "{digit}'; shapes 'a {color} {shape}'."
    )
    tokenizer: Literal["word", "char"] = Field(
        "word", description="Caption tokens: words (split on spaces) or characters."
    )
    caption_length: int | None = Field(
        None, ge=2, description="Token positions per caption, END included (default: the "
        "longest caption's). Models read at most this many, so leave room for longer "
        "zero-shot prompts."
    )
    image_size: tuple[int, int] | None = Field(
        None, description="digits: resize the 8x8 images to [height, width] (e.g. [16, 16])."
    )
    n: int = Field(2000, ge=10, description="shapes: number of images generated.")
    size: int = Field(32, ge=8, le=256, description="shapes: image side in pixels (RGB).")
    label: Literal["shape", "color", "shape_color"] = Field(
        "shape_color", description="shapes: the class of an image (its first object), for "
        "zero-shot evaluation and label-matched contrastive positives."
    )
    max_objects: int = Field(
        1, ge=1, le=4, description="shapes: 1..N objects per image; several make captions "
        "like 'a red circle and a blue square'."
    )
    min_size: float = Field(0.3, gt=0.0, le=1.0, description="shapes: smallest shape side, "
                            "as a share of the image.")
    max_size: float = Field(0.6, gt=0.0, le=1.0, description="shapes: largest shape side.")
    noise: float = Field(0.02, ge=0.0, description="shapes: std of Gaussian pixel noise.")
    background: Literal["dark", "light", "random"] = Field("dark", description="shapes: "
                                                           "background grey level.")

    @model_validator(mode="after")
    def _sizes(self) -> CaptionsParams:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


class _HeadsParams(Params):
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide the width.")
    ff_dim: int = Field(128, ge=1, description="Hidden size of the feed-forward networks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Embedding and residual dropout.")
    positional: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="Caption positions: fixed sinusoids or learned embeddings."
    )
    filters: list[int] = Field(
        default_factory=lambda: [32, 64], min_length=1,
        description="Image encoder: filters per stride-2 CNN stage (each halves the grid).",
    )


class CLIPParams(_HeadsParams):
    """CLIP-style dual encoder trained with the symmetric InfoNCE loss."""

    embed_dim: int = Field(64, ge=2, description="Size of the shared embedding space.")
    width: int = Field(64, ge=2, description="Text encoder width (and image token width).")
    text_layers: int = Field(2, ge=1, description="Transformer encoder blocks over captions.")
    temperature: Literal["learnable"] | float = Field(
        "learnable", description="learnable: a trained log(1/T) (CLIP); a number: fixed T > 0."
    )
    init_temperature: float = Field(0.07, gt=0.0, description="Starting T when learnable.")
    max_logit_scale: float = Field(100.0, gt=1.0, description="Upper clip of 1/T (learnable).")
    positives: Literal["label", "caption", "pair"] = Field(
        "label", description="Which in-batch pairs count as matches: same class (label), "
        "identical caption ids (caption), or only each image's own caption (pair)."
    )

    @model_validator(mode="after")
    def _check(self) -> CLIPParams:
        if not isinstance(self.temperature, str) and self.temperature <= 0:
            raise ValueError("temperature must be 'learnable' or a number above 0")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        return self


class CaptionerParams(_HeadsParams):
    """CNN image tokens + transformer caption decoder with cross-attention."""

    d_model: int = Field(64, ge=2, description="Decoder width (and image token width).")
    decoder_layers: int = Field(2, ge=1, description="Transformer decoder blocks.")

    @model_validator(mode="after")
    def _check(self) -> CaptionerParams:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads "
                             f"{self.num_heads}")
        return self


class ClipReportParams(Params):
    """Zero-shot classification, retrieval recall@k and a similarity matrix."""

    split: Literal["test", "val", "train"] = Field("test", description="Held-out split.")
    batch_size: int = Field(256, ge=1, description="Embedding batch size.")
    prompts: list[str] | None = Field(
        None, min_length=1, description="Zero-shot prompt templates, averaged per class, e.g. "
        "['a photo of the number {digit}', 'a {word}']; placeholders are the data's class "
        "fields. Default: the data's caption templates."
    )
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1,
                          description="Recall@k cut-offs.")
    match: Literal["label", "caption", "pair"] = Field(
        "label", description="Relevant in retrieval: same class, same caption text, or only "
        "the own pair."
    )
    matrix_size: int = Field(10, ge=0, le=40, description="Pairs in the similarity-matrix "
                             "plot, one per class first (0: no plot).")
    confusion_matrix: bool = Field(True, description="Log the zero-shot confusion matrix.")
    learning_curves: bool = Field(True, description="Log learning curves of the train stage.")

    @model_validator(mode="after")
    def _ks(self) -> ClipReportParams:
        if any(k < 1 for k in self.ks):
            raise ValueError("every k must be at least 1")
        return self


class CaptionReportParams(Params):
    """Greedy (and beam) captions of a held-out split."""

    split: Literal["test", "val", "train"] = Field("test", description="Held-out split.")
    batch_size: int = Field(256, ge=1, description="Decoding batch size.")
    beam_width: int = Field(0, ge=0, description="Also decode with beam search of this width "
                            "(> 1; 0: skip).")
    examples: int = Field(16, ge=0, description="Images in the caption grid (0: none).")
    learning_curves: bool = Field(True, description="Log learning curves of the train stage.")


@hookimpl
def register_stages(register):
    register("data", "captions", "dlpipe.datasets.captions:captions", CaptionsParams,
             "Image-caption pairs (captioned digits or shapes), word tokens, class labels.")
    register("evaluate", "clip_report", "dlpipe.stages.reports.clip:clip_report",
             ClipReportParams,
             "Dual encoder: zero-shot accuracy, retrieval recall@k, similarity matrix.")
    register("evaluate", "caption_report", "dlpipe.stages.reports.caption:caption_report",
             CaptionReportParams,
             "Captioner: exact match and token accuracy of generated captions, caption grid.")


_TINY = {"filters": [4], "num_heads": 2, "ff_dim": 16, "dropout": 0.0}


@hookimpl
def register_models(register):
    register(
        "clip",
        build="dlpipe.models.clip.model:build",
        params=CLIPParams,
        description="CLIP-style dual encoder (CNN image, transformer text), symmetric "
        "InfoNCE with a learnable or fixed temperature.",
        task="contrastive",
        loss_weights=("image_to_text", "text_to_image"),
        plots="dlpipe.models.clip.model:plots",
        example_params={**_TINY, "embed_dim": 8, "width": 8, "text_layers": 1},
        example_data="dlpipe.datasets.captions:example_bundle",
    )
    register(
        "captioner",
        build="dlpipe.models.captioner.model:build",
        params=CaptionerParams,
        description="BLIP-style captioner: CNN image tokens, transformer decoder with "
        "cross-attention; greedy or beam captions.",
        task="seq2seq",
        plots="dlpipe.models.captioner.model:plots",
        example_params={**_TINY, "d_model": 8, "decoder_layers": 1},
        example_data="dlpipe.datasets.captions:example_bundle",
    )

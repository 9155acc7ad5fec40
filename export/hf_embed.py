"""Embedding and zero-shot models imported from Hugging Face checkpoints (`python -m export.hf DIR --name
NAME` hands such a folder here): a bare `ViTModel` or `Dinov2Model` (no head) serves `embedding`;
`CLIPModel` and `SiglipModel` serve `zero-shot`, and `embedding` besides (the manifest's `also_serves`).

The image graph gives every pooling at once, `pooled` (the vector transformers gives: CLIP's and SigLIP's
`get_image_features`, ViT's and DINOv2's `pooler_output`), `cls` (the CLS token's last hidden state; SigLIP
has no CLS token) and `mean` (of the patch tokens' last hidden states), so one run serves any option. A
zero-shot model adds a `text` graph (input_ids, and attention_mask where its tokenizer gives one ->
`get_text_features`), and its tokenizer as the `tokenizers` library's tokenizer.json.

Published only past the gates: the service's preprocessing equals the image processor's; every output
agrees with PyTorch (max abs diff); on real photos each pooling has cosine similarity at least
COSINE_GATE with transformers' own vector (from the image processor's pixels); the `tokenizers` library,
set up as the manifest says, gives the transformers tokenizer's ids as the zero-shot pipeline calls it;
and the text graph's embeddings have that cosine with `get_text_features`'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.hf import (
    PREPROCESSING_TOLERANCE,
    Checkpoint,
    f32,
    hf_versions,
    load,
    preprocessing_error,
    preprocessing_of,
    sample_photos,
)
from export.onnx_export import (
    BATCH,
    OPSET,
    PARITY_BATCH,
    Compared,
    ExportError,
    check_parity,
    export_image_graph,
    library_versions,
    publish,
    require_parity,
    staging,
    to_onnx,
    torch_outputs,
)
from service.imaging import Decoded, preprocess_batch
from service.manifest import (
    EMBEDDING,
    POOLINGS,
    ZERO_SHOT,
    GraphSpec,
    Manifest,
    Preprocessing,
    ScoreActivation,
    TensorSpec,
    TextTower,
)
from service.text_tower import TextEncoder, cosine

COSINE_GATE = 0.9999
TOKENIZER_FILE = "tokenizer.json"
# transformers' zero-shot pipeline pads SigLIP's labels to 64 tokens (truncating), CLIP's to the longest
SIGLIP_LENGTH = 64
LABEL_SETS = [["cat", "dog"], ["a photo of a temple", "sea", "a red car on a city street at night", "x"]]
TEMPLATES = ["This is a photo of {}.", "{}"]


def dual(ckpt: Checkpoint) -> bool:
    """CLIP or SigLIP: an image tower beside a text tower."""
    return ckpt.family.task == ZERO_SHOT


def activation(ckpt: Checkpoint) -> ScoreActivation:
    """As transformers' zero-shot pipeline scores labels: a sigmoid each (SigLIP), else a softmax over them."""
    return "sigmoid" if "siglip" in ckpt.model.config.model_type else "softmax"


def has_cls(ckpt: Checkpoint) -> bool:
    return "siglip" not in ckpt.model.config.model_type  # SigLIP pools by attention: it has no CLS token


class Embedder(torch.nn.Module):
    """pixel_values -> pooled, cls (where there is one), mean of the patch tokens, each `[batch, dimensions]`."""

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__()
        self.model, self.dual, self.cls, self.prefix = ckpt.model, dual(ckpt), has_cls(ckpt), ckpt.prefix_tokens

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.dual:
            out = self.model.vision_model(pixel_values=pixel_values)
            projection = getattr(self.model, "visual_projection", None)  # CLIP projects; SigLIP does not
            pooled = out.pooler_output if projection is None else projection(out.pooler_output)
        else:
            out = self.model(pixel_values=pixel_values)
            pooled = out.pooler_output
        hidden = out.last_hidden_state
        mean = hidden[:, self.prefix :].mean(1)
        return (pooled, hidden[:, 0], mean) if self.cls else (pooled, mean)


class TextFeatures(torch.nn.Module):
    """input_ids (and attention_mask) -> get_text_features `[batch, dimensions]`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out.pooler_output if hasattr(out, "pooler_output") else out


# transformers' own vectors --------------------------------------------------------------------------


@torch.no_grad()
def reference_vectors(ckpt: Checkpoint, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    """Each pooling as transformers gives it, from its own calls (not the graph's module)."""
    if dual(ckpt):
        out = ckpt.model.get_image_features(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        pooled = out.pooler_output
    else:
        out = ckpt.model(pixel_values=pixel_values)
        hidden, pooled = out.last_hidden_state, out.pooler_output
    vectors = {"pooled": pooled, "cls": hidden[:, 0], "mean": hidden[:, ckpt.prefix_tokens :].mean(1)}
    return {name: v.numpy() for name, v in vectors.items() if name != "cls" or has_cls(ckpt)}


def image_cosines(ckpt: Checkpoint, spec: Preprocessing, session: ort.InferenceSession) -> dict[str, float]:
    """Per pooling, the least cosine similarity over the photos between the graph's vector (the service's
    preprocessing) and transformers' (its image processor's pixels)."""
    worst: dict[str, float] = {}
    for photo in sample_photos():
        ours = session.run(None, {"pixel_values": preprocess_batch([Decoded(photo, photo.size)], spec)})
        pixels = torch.from_numpy(np.asarray(ckpt.processor(images=photo, return_tensors="np")["pixel_values"]))
        theirs = reference_vectors(ckpt, pixels.float())
        for (name, vector), mine in zip(theirs.items(), ours, strict=True):
            worst[name] = min(worst.get(name, 1.0), float(cosine(mine, vector).min()))
    return worst


def require_cosines(cosines: dict[str, float]) -> None:
    failed = {name: c for name, c in cosines.items() if not c >= COSINE_GATE}
    if failed:
        raise ExportError(f"cosine similarity with transformers' vectors below {COSINE_GATE}: {failed}; "
                          "nothing was written")  # fmt: skip


# the graphs ---------------------------------------------------------------------------------------


def image_graph(
    ckpt: Checkpoint, spec: Preprocessing, staged: Path
) -> tuple[GraphSpec, list[Compared], dict[str, float]]:
    """The image graph, its outputs beside PyTorch's, and its cosines against transformers' vectors."""
    module = Embedder(ckpt).eval()
    photos = sample_photos()
    inputs = preprocess_batch([Decoded(p, p.size) for p in photos], spec)
    inputs = np.concatenate([inputs, inputs[:, :, ::-1].copy()])  # flipped: more cases
    single, double = torch_outputs(module, inputs), torch_outputs(module, inputs, double=True)
    names = [p for p in POOLINGS if p != "cls" or has_cls(ckpt)]
    outputs = [f32(name, "batch", out.shape[-1]) for name, out in zip(names, single, strict=True)]
    graph = GraphSpec(file="model.onnx", inputs=[f32("pixel_values", "batch", 3, *spec.size)], outputs=outputs)
    onnx_outputs = export_image_graph(module, inputs, staged, graph)
    compared = [Compared(f"main.{n}", *arrays) for n, *arrays in zip(names, onnx_outputs, single, double, strict=True)]
    session = ort.InferenceSession(str(staged / graph.file), providers=["CPUExecutionProvider"])
    return graph, compared, image_cosines(ckpt, spec, session)


def text_tower(ckpt: Checkpoint, tokenizer: Any) -> TextTower:
    """How the service tokenizes labels: as transformers' zero-shot pipeline calls the tokenizer."""
    model = ckpt.model
    siglip = "siglip" in model.config.model_type
    positions = model.config.text_config.max_position_embeddings
    scale, bias = model.logit_scale.exp().item(), getattr(model, "logit_bias", torch.zeros(1)).item()
    return TextTower(tokenizer=TOKENIZER_FILE, padding="max_length" if siglip else "longest",
                     max_length=SIGLIP_LENGTH if siglip else positions, pad_id=int(tokenizer.pad_token_id or 0),
                     logit_scale=scale, logit_bias=bias)  # fmt: skip


def pipeline_tokens(ckpt: Checkpoint, tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    """The tokenizer called as transformers' zero-shot pipeline calls it."""
    siglip = "siglip" in ckpt.model.config.model_type
    kwargs = {"padding": "max_length", "max_length": SIGLIP_LENGTH, "truncation": True} if siglip else {"padding": True}
    found = tokenizer(texts, return_tensors="np", **kwargs)
    return {name: np.asarray(found[name], dtype=np.int64) for name in tokenizer.model_input_names if name in found}


def text_graph(ckpt: Checkpoint, tokenizer: Any, tower: TextTower, staged: Path) -> tuple[GraphSpec, Any, float]:
    """The text graph (checked: the service's tokenizer against transformers', the graph against
    get_text_features), its parity and its least cosine."""
    tokenizer.backend_tokenizer.save(str(staged / TOKENIZER_FILE))
    encoder = TextEncoder(staged / TOKENIZER_FILE, tower)
    texts = [template.format(label) for labels in LABEL_SETS for template in TEMPLATES for label in labels]
    theirs = pipeline_tokens(ckpt, tokenizer, texts)
    ours = encoder.tokenize(texts, list(theirs))
    if any(ours[name].shape != ids.shape or (ours[name] != ids).any() for name, ids in theirs.items()):
        raise ExportError("the tokenizer.json, as the service runs it, gives other ids than transformers' tokenizer")
    names, module = list(theirs), TextFeatures(ckpt.model).eval()
    tokens = torch.export.Dim("tokens", min=2, max=tower.max_length)
    dims = {name: {0: BATCH, 1: tokens} for name in names}
    example = tuple(torch.from_numpy(np.concatenate([theirs[n][:2], theirs[n][:2]], 1)[:, : tower.max_length])
                    for n in names)  # fmt: skip
    to_onnx(module, example, staged / "text.onnx", names, ["text_embeds"], dynamic_shapes=dims)
    session = ort.InferenceSession(str(staged / "text.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, theirs)
    single = torch_outputs(module, *theirs.values())[0]
    double = torch_outputs(module, *theirs.values(), double=True)[0]
    dimension = single.shape[-1]
    spec = GraphSpec(file="text.onnx",
                     inputs=[TensorSpec(name=n, dtype="int64", shape=["batch", "tokens"]) for n in names],
                     outputs=[f32("text_embeds", "batch", dimension)])  # fmt: skip
    return spec, Compared("text.text_embeds", onnx_out, single, double), float(cosine(onnx_out, single).min())


# the import ---------------------------------------------------------------------------------------


def import_checkpoint(folder: Path, repository: Path, name: str, version: int = 1, force: bool = False) -> Manifest:
    ckpt = load(folder)
    spec = preprocessing_of(ckpt.processor, ckpt.family.task)
    prep_error = preprocessing_error(ckpt.processor, spec, sample_photos())
    if prep_error > PREPROCESSING_TOLERANCE:
        raise ExportError(f"the service's preprocessing differs from {type(ckpt.processor).__name__}'s by "
                          f"{prep_error:.3g}; nothing was written")  # fmt: skip
    with staging(name, version) as staged:
        main, compared, cosines = image_graph(ckpt, spec, staged)
        graphs, tower = {"main": main}, None
        if dual(ckpt):
            tokenizer = load_tokenizer(folder)
            tower = text_tower(ckpt, tokenizer)
            graphs["text"], text, cosines["text"] = text_graph(ckpt, tokenizer, tower, staged)
            compared.append(text)
        parity = check_parity(compared, PARITY_BATCH)
        require_parity(parity)
        require_cosines(cosines)
        manifest = Manifest(
            name=name, version=version, task=ckpt.family.task, architecture=ckpt.architecture, graphs=graphs,
            preprocessing=spec, labels=[],
            data={"source": "hugging face checkpoint", "folder": folder.resolve().name,
                  "image_processor": type(ckpt.processor).__name__, "preprocessing_max_abs_diff": prep_error,
                  "parity_images": "scikit-learn sample photos and crops of them"},
            quality={f"cosine_{p}": c for p, c in cosines.items()}, parity=parity, opset=OPSET,
            versions={**library_versions(), **hf_versions()}, config=ckpt.config, prefix_tokens=ckpt.prefix_tokens,
            also_serves=[EMBEDDING] if dual(ckpt) else [], text=tower, score_activation=activation(ckpt),
        )  # fmt: skip
        publish(manifest, staged, repository, force)
    return manifest


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ExportError(f"{folder}'s tokenizer could not be loaded: {type(exc).__name__}: {exc}") from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        name = type(tokenizer).__name__
        raise ExportError(f"{name} is no fast (tokenizers) tokenizer: the service runs its tokenizer.json")
    return tokenizer

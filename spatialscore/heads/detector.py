"""An open-vocabulary detector (OWLv2, from transformers) that counts what text queries name, for the `counting`
head beyond the shapes world. Images stay tensors: preprocessing runs in torch, and so does the NMS (no
torchvision). transformers is imported when a detector is built; `tiny_owlv2` builds a random one in code, for
offline tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from spatialscore.errors import SpatialScoreError
from spatialscore.heads.learned import tiny_clip_tokenizer, tiny_towers
from spatialscore.io import local_model_dir

NMS_IOU = 0.3  # OWLv2's own post-processing default


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in a [N, 4] with every box in b [M, 4], both (x0, y0, x1, y1): [N, M]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    corner_lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    corner_hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (corner_hi - corner_lo).clamp(min=0).prod(dim=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best first; a box goes when it overlaps a kept,
    better one by more than `iou`. Ties keep the earlier box, so the result does not depend on the sort."""
    order = torch.argsort(scores, descending=True, stable=True)
    overlaps = box_iou(boxes[order], boxes[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i] > iou
    return order[keep]


def count_boxes(boxes: torch.Tensor, probs: torch.Tensor, threshold: float, iou: float = NMS_IOU) -> list[int]:
    """Per query, the boxes [P, 4] whose best query it is, with probability above `threshold` [P, Q], left after
    NMS. Each box counts for one query only, so one object is not found twice under two phrases."""
    if not probs.shape[-1]:
        return []
    best, label = probs.max(dim=-1)
    counts = []
    for q in range(probs.shape[-1]):
        mine = (label == q) & (best > threshold)
        counts.append(len(nms(boxes[mine], best[mine], iou)))
    return counts


def owlv2_pixels(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Owlv2ImageProcessor's steps in torch: pad to a square at the bottom and right (with 0, as transformers 5
    does), resize to `size` (bilinear, antialiased), normalise."""
    h, w = images.shape[-2:]
    side = max(h, w)
    images = F.pad(images, (0, side - w, 0, side - h))
    if side != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True).clamp(0, 1)
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def corners(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


class OpenVocabDetector:
    """OWLv2 queried with text: per image, how many objects each of its phrases finds."""

    def __init__(self, model, processor, threshold: float = 0.3, nms_iou: float = NMS_IOU):
        self.model = model.eval()
        self.tokenizer = processor.tokenizer
        self.mean, self.std = processor.image_processor.image_mean, processor.image_processor.image_std
        self.threshold, self.nms_iou = threshold, nms_iou

    @torch.no_grad()
    def count(self, images: torch.Tensor, queries: list[list[str]]) -> list[list[int]]:
        """images: FloatTensor[B, 3, H, W] in [0, 1]; queries: B lists of phrases -> B lists of counts."""
        width = max((len(q) for q in queries), default=0)
        if not width:
            return [[] for _ in queries]
        config, device = self.model.config, self.model.device
        phrases = [p for q in queries for p in q + [""] * (width - len(q))]
        text = self.tokenizer(phrases, padding="max_length", truncation=True,
                              max_length=config.text_config.max_position_embeddings, return_tensors="pt")
        pixels = owlv2_pixels(images.to(device).float(), config.vision_config.image_size, self.mean, self.std)
        out = self.model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                         pixel_values=pixels)
        boxes = corners(out.pred_boxes).float().cpu()
        probs = out.logits.sigmoid().float().cpu()  # padding queries are sliced off, not scored
        return [count_boxes(boxes[i], probs[i, :, :len(q)], self.threshold, self.nms_iou)
                for i, q in enumerate(queries)]


def load_owlv2(path: str, field: str):
    """An OWLv2 model and its processor from a local from_pretrained directory, or an error naming `field`."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    directory = local_model_dir(path, field, "an OWLv2 detector and its processor")
    try:
        model, info = Owlv2ForObjectDetection.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                              output_loading_info=True)
        processor = Owlv2Processor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SpatialScoreError(f"{field}={path}: not a loadable OWLv2 directory: {err}") from err
    missing = sorted(info["missing_keys"])  # from_pretrained fills them with random weights and only warns
    if missing:
        raise SpatialScoreError(f"{field}={path}: not an OWLv2 detector checkpoint: {len(missing)} weights missing "
                                f"(e.g. {missing[0]})")
    return model, processor


def tiny_owlv2():
    """A random OWLv2 (vision: 64 px images in 8 px patches, so 64 boxes; text: 32 positions; one layer of width 32
    each) and its processor, over the tiny CLIP tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    tokenizer = tiny_clip_tokenizer(specials_last=True)
    text, vision = tiny_towers(tokenizer, 64)
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32,
                                                initializer_range=0.02))
    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})  # its settings only: mean and std
    return model, Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)

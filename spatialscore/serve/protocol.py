"""The reward server's typed JSON protocol (pydantic models, which FastAPI turns into the OpenAPI spec), and the
decoding of one request's images into the float tensors a head takes. Images travel as PNG bytes or raw arrays
with an explicit shape and dtype, base64-encoded; nothing is ever unpickled."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from spatialscore.data.formats import validate_prompt_record

BASE64 = r"^[A-Za-z0-9+/]*={0,2}$"
MIN_SIDE = 8


class PngImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    png: str = Field(description="a PNG file (8-bit RGB, RGBA or grey), base64", pattern=BASE64)


class ArrayImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    array: str = Field(description="the raw pixels, C order [H, W, 3], little-endian, base64. uint8: 0..255; "
                                   "float32: 0..1 (lossless for float images, 4x the bytes)", pattern=BASE64)
    shape: list[int] = Field(description="[H, W, 3]", min_length=3, max_length=3)
    dtype: Literal["uint8", "float32"] = "uint8"


def _image_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "png" if "png" in value else "array"
    if isinstance(value, BaseModel):
        return "png" if isinstance(value, PngImage) else "array"
    return None


ImagePayload = Annotated[Union[Annotated[PngImage, Tag("png")], Annotated[ArrayImage, Tag("array")]],
                         Discriminator(_image_kind)]


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=4000)
    meta: dict[str, Any] | None = Field(None, description="the prompt's metadata (GenEval format, with 'include'); "
                                                          "heads that judge clauses need it")
    image: ImagePayload


class ScoreRequest(BaseModel):
    """`head` is one of the heads this server hosts; the OpenAPI spec lists them as an enum."""

    model_config = ConfigDict(extra="forbid")
    head: str
    items: list[ScoreItem] = Field(min_length=1)
    id: str | None = Field(None, max_length=200, description="echoed back in the response")


class ScoreResponse(BaseModel):
    head: str
    id: str | None = None
    scores: list[float | None] = Field(description="one per item, in order; null where the head gave NaN or inf")
    extras: dict[str, list[float | None]] = Field(default_factory=dict, description="per-item extras, e.g. sigma")
    batch_size: int = Field(description="images in the head call(s) that scored this request (> items: batched "
                                        "with other requests)")


class ErrorResponse(BaseModel):
    error: str


class HeadInfo(BaseModel):
    name: str
    needs_meta: bool
    bounded: bool
    image_size: int | None = Field(None, description="the input size a trained model resizes to, if it has one")


class Limits(BaseModel):
    max_request_bytes: int
    max_items: int
    max_side: int
    max_pixels: int
    max_batch: int
    max_wait_ms: float


class HeadsResponse(BaseModel):
    heads: list[HeadInfo]
    limits: Limits


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str
    heads: list[str]


class RequestError(Exception):
    """A request the protocol admits but whose content is wrong; `field` in the `items[3].image.shape` form."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


class PayloadTooLarge(RequestError):
    """A request over a size limit (413)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


@dataclass
class DecodedItem:
    image: torch.Tensor  # [3, H, W] float32 in [0, 1]
    prompt: str
    meta: dict


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(where, f"not valid base64 ({err})") from None


def _check_side(h: int, w: int, where: str, max_side: int) -> None:
    if not (MIN_SIDE <= h <= max_side and MIN_SIDE <= w <= max_side):
        raise RequestError(where, f"image sides must lie in {MIN_SIDE}..{max_side} pixels, got {h}x{w}")


def decode_image(payload: PngImage | ArrayImage, where: str, max_side: int) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1]: uint8 pixels / 255, float32 pixels as sent."""
    if isinstance(payload, PngImage):
        data = _b64(payload.png, f"{where}.png")
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "PNG":
                    raise RequestError(f"{where}.png", f"expected a PNG file, got {img.format}")
                _check_side(img.height, img.width, f"{where}.png", max_side)
                if img.mode not in ("RGB", "RGBA", "L", "P"):
                    raise RequestError(f"{where}.png", f"expected an 8-bit RGB, RGBA or grey PNG, got mode {img.mode}")
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except RequestError:
            raise
        except Exception as err:  # PIL raises many kinds on damaged files
            raise RequestError(f"{where}.png", f"not a readable PNG ({err})") from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)
    h, w, c = payload.shape
    if c != 3 or h < 1 or w < 1:
        raise RequestError(f"{where}.shape", f"expected [H, W, 3] (RGB, channels last), got {payload.shape}")
    _check_side(h, w, f"{where}.shape", max_side)
    data = _b64(payload.array, f"{where}.array")
    dtype = np.dtype("<f4") if payload.dtype == "float32" else np.dtype(np.uint8)
    if len(data) != h * w * c * dtype.itemsize:
        raise RequestError(f"{where}.array", f"holds {len(data)} bytes; shape {payload.shape} of {payload.dtype} "
                                             f"needs {h * w * c * dtype.itemsize}")
    pixels = np.frombuffer(data, dtype=dtype).reshape(h, w, c)
    if payload.dtype == "uint8":
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)
    image = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1).contiguous()
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise RequestError(f"{where}.array", "float32 pixels must be finite and lie in [0, 1]")
    return image


def _pixels(payload: PngImage | ArrayImage, where: str) -> int:
    """H x W of an image from its PNG header or its declared shape, without decoding it."""
    if isinstance(payload, ArrayImage):
        return payload.shape[0] * payload.shape[1]
    try:
        with Image.open(io.BytesIO(_b64(payload.png, f"{where}.png"))) as img:  # reads the header only
            return img.width * img.height
    except RequestError:
        raise
    except Exception as err:
        raise RequestError(f"{where}.png", f"not a readable PNG ({err})") from None


def decode_items(request: ScoreRequest, needs_meta: bool, max_side: int,
                 max_pixels: int | None = None) -> list[DecodedItem]:
    """The request's images as tensors and their metadata checked; with `max_pixels`, all images together may hold at
    most that many pixels (checked on headers and shapes before anything is decoded: a small PNG can be huge)."""
    if max_pixels is not None:
        total = sum(_pixels(item.image, f"items[{i}].image") for i, item in enumerate(request.items))
        if total > max_pixels:
            raise PayloadTooLarge(f"items: the request's images hold {total} pixels together; this server takes "
                                  f"at most {max_pixels} per request (--max-pixels): send fewer or smaller images")
    out = []
    for i, item in enumerate(request.items):
        where = f"items[{i}]"
        meta = dict(item.meta or {})
        if needs_meta:
            if item.meta is None:
                raise RequestError(f"{where}.meta", f"head {request.head!r} judges prompt clauses and needs the "
                                                    f"prompt's metadata (GenEval format, with 'include')")
            record = {"tag": "-", **meta, "prompt": item.prompt}  # a tag is optional here
            problems = validate_prompt_record(record, "request", None)
            if problems:
                first = problems[0]
                raise RequestError(f"{where}.meta.{first.field}", first.message)
        out.append(DecodedItem(decode_image(item.image, f"{where}.image", max_side), item.prompt, meta))
    return out


# --- encoding, for clients ---------------------------------------------------------------------------------------

def encode_array(image: torch.Tensor, dtype: str = "uint8") -> dict:
    """A [3, H, W] float image in [0, 1] as an `ArrayImage` payload. uint8 rounds exactly as the shapes-world heads
    do when they read an image (round(x * 255)), so those heads score it as they score the float image."""
    hwc = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    if dtype == "uint8":
        raw = (hwc * 255).round().astype(np.uint8).tobytes()
    elif dtype == "float32":
        raw = np.ascontiguousarray(hwc, dtype="<f4").tobytes()
    else:
        raise ValueError(f"dtype must be uint8 or float32, got {dtype!r}")
    return {"array": base64.b64encode(raw).decode("ascii"), "shape": list(hwc.shape), "dtype": dtype}


def encode_png(pixels: np.ndarray) -> dict:
    """A [H, W, 3] uint8 array as a `PngImage` payload."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return {"png": base64.b64encode(buffer.getvalue()).decode("ascii")}

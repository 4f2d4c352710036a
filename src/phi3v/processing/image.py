"""Phi-3(.5)-vision image processing: load an image safely, HD-transform it into CLIP crops, count its image tokens.

Reproduces the reference `Phi3VImageProcessor` (Hugging Face remote code) exactly, quirks included: see the fixtures
README, items 5 and 6. Shapes: n images, K = num_crops, S = crop side (336), H x W the padded HD image.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError, InputError
from ..models.clip import CROP_SIZE, PATCH_SIZE
from ..models.config import read_json
from ..models.phi3_v import MERGE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, the reference's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_VALUE = 255  # the HD image is padded with white
DEFAULT_NUM_CROPS = 16  # Phi-3-vision's preprocessor_config.json (Phi-3.5-vision ships 4)
DEFAULT_MAX_PIXELS = 8192 * 8192  # larger images are refused before their pixels are decoded (decompression bombs)
PREPROCESSOR_CONFIG = "preprocessor_config.json"

ImageSource = Image.Image | str | Path | bytes | bytearray | memoryview | np.ndarray


# --------------------------------------------------------------------------- sizes and token counts (no pixels)

def tokens_per_side(crop_size: int = CROP_SIZE, patch_size: int = PATCH_SIZE) -> int:
    """Merged image tokens along one side of a crop (12 for 336 / 14 / 2)."""
    return crop_size // patch_size // MERGE


def num_image_tokens(hd_height: int, hd_width: int, crop_size: int = CROP_SIZE, patch_size: int = PATCH_SIZE) -> int:
    """Image tokens (= projected feature rows) of an image whose padded HD size is (hd_height, hd_width)."""
    if min(hd_height, hd_width) <= 0 or hd_height % crop_size or hd_width % crop_size:
        raise InputError(f"HD image size {hd_height}x{hd_width} is not a positive multiple of the crop size {crop_size}")
    h_c, w_c, side = hd_height // crop_size, hd_width // crop_size, tokens_per_side(crop_size, patch_size)
    # grid crops + global crop, one separator, then a newline token after every token row (grid rows + global rows)
    return (h_c * w_c + 1) * side * side + 1 + (h_c + 1) * side


def _check_num_crops(num_crops: int) -> int:
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise InputError(f"num_crops must be a positive integer, got {num_crops!r}")
    return num_crops


def _resized_size(width: int, height: int, num_crops: int, crop_size: int) -> tuple[int, int]:
    """(width, height) a landscape (width >= height) image is resized to before padding, as the reference computes it."""
    ratio = width / height  # float arithmetic kept exactly as the reference's: int(new_w / ratio), not new_w*h // w
    scale = 1  # the widest grid (scale crops across) whose rows still fit: scale * ceil(scale / ratio) <= num_crops
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_width = scale * crop_size
    new_height = int(new_width / ratio)
    if new_height < 1:
        raise InputError(f"a {width}x{height} image is too elongated for num_crops={num_crops}: its short side would "
                         f"shrink to 0 pixels; crop it or raise num_crops")
    return new_width, new_height


def hd_size(width: int, height: int, num_crops: int = DEFAULT_NUM_CROPS, crop_size: int = CROP_SIZE) -> tuple[int, int]:
    """(height, width) of the padded HD image for a width x height original, i.e. its `image_sizes` row; no pixels
    needed, so `num_image_tokens(*hd_size(w, h, k))` is an image's token count before processing it."""
    if min(width, height) < 1:
        raise InputError(f"image size {width}x{height} is empty")
    _check_num_crops(num_crops)
    new_w, new_h = _resized_size(max(width, height), min(width, height), num_crops, crop_size)
    padded_h = -(-new_h // crop_size) * crop_size
    return (padded_h, new_w) if width >= height else (new_w, padded_h)


# --------------------------------------------------------------------------- loading

def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a PIL image, file path, raw bytes, `data:image/...;base64,` URL or uint8 array (HxW, HxWx3/4) into a
    fully loaded RGB PIL image; raises InputError naming the source if it is missing, unreadable, truncated or too big."""
    if isinstance(src, Image.Image):
        return _decode(src, f"PIL image ({src.mode} {src.width}x{src.height})", max_pixels)
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(src)), f"image bytes ({len(src)} bytes)", max_pixels)
    if isinstance(src, str) and src.startswith("data:"):
        return _decode(io.BytesIO(decode_data_url(src)), f"data URL {src[:32]!r}...", max_pixels)
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        raise InputError(f"image URLs are not fetched ({src[:80]}); download the image and pass its path or bytes")
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        return _decode(path, f"image file {path}", max_pixels)
    raise InputError(f"unsupported image source of type {type(src).__name__}: pass a PIL image, a file path, bytes, "
                     f"a base64 data:image URL or a uint8 numpy array")


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if min(width, height) < 1:
        raise InputError(f"{name} is empty ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"{name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                         f"(a decompression bomb?); downscale it or raise max_pixels")


def _decode(src: Image.Image | io.BytesIO | Path, name: str, max_pixels: int) -> Image.Image:
    """Open `src` if needed, check its size from the header, decode every pixel, convert('RGB') as the reference."""
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice its limit: make that an error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                return _load_rgb(src, name, max_pixels)
            with Image.open(src) as image:  # reads the header only; closing the file leaves the RGB copy intact
                return _load_rgb(image, name, max_pixels)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} exceeds PIL's decompression-bomb limit ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise InputError(f"{name} is not an image PIL can read") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name} is truncated or corrupt ({e}); re-export or re-download it") from e


def _load_rgb(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    _check_pixels(image.width, image.height, name, max_pixels)  # before any pixel is decoded
    image.load()  # decodes everything now, so a truncated file fails here (LOAD_TRUNCATED_IMAGES is left off)
    # RGBA drops alpha (no compositing), L is copied to R, G, B, P and CMYK use PIL's own conversions (quirk 6)
    return image.convert("RGB")


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    name = f"numpy array of shape {array.shape} and dtype {array.dtype}"
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(f"{name}: expected uint8 of shape (H, W), (H, W, 3) or (H, W, 4)")
    _check_pixels(array.shape[1], array.shape[0], name, max_pixels)
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")  # (H, W) -> L, (H, W, 4) -> RGBA


def decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InputError(f"bad data URL {url[:40]!r}: expected 'data:image/<type>;base64,<data>'")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"data URL {header!r} holds invalid base64 ({e})") from e


# --------------------------------------------------------------------------- HD transform and tensors

def hd_transform(image: Image.Image, num_crops: int, crop_size: int = CROP_SIZE) -> Image.Image:
    """Resize an RGB image to fill the largest crop grid of <= num_crops crops and pad it with centred white bands to
    crop multiples; portrait images are transposed first and back after, so their bands are left and right."""
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = _resized_size(image.width, image.height, num_crops, crop_size)
    if image.size != (new_w, new_h):  # torchvision's resize (PIL bilinear with antialias) is a no-op at the target size
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = -(-new_h // crop_size) * crop_size
    canvas = Image.new("RGB", (new_w, padded_h), (PAD_VALUE,) * 3)
    canvas.paste(image, (0, (padded_h - new_h) // 2))  # top band = floor(pad / 2), the rest at the bottom
    return canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas


def to_normalized_tensor(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(3, H, W) float32 as torchvision's ToTensor then Normalize: (x / 255 - mean) / std, each step in float32."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
    return x.sub_(mean).div_(std)


def crops_with_global_view(hd: torch.Tensor, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """(1 + h_c * w_c, 3, S, S): the bicubic global view of the normalized HD image, then its crops in row-major order."""
    _, h, w = hd.shape  # (3, H, W)
    glb = F.interpolate(hd[None], size=(crop_size, crop_size), mode="bicubic", align_corners=False)  # no antialias
    crops = hd.reshape(3, h // crop_size, crop_size, w // crop_size, crop_size).permute(1, 3, 0, 2, 4)
    return torch.cat([glb, crops.reshape(-1, 3, crop_size, crop_size)])


def _crop_and_patch(folder: Path) -> tuple[int, int]:
    """(crop size, patch size) of a checkpoint: its CLIP `image_size` / `patch_size`, CLIP ViT-L/14-336's if unset."""
    file = folder / "config.json"
    config = read_json(file, "config.json") if file.is_file() else {}
    vision = (config.get("img_processor") or {}).get("vision_config") or {}
    crop_size, patch_size = vision.get("image_size", CROP_SIZE), vision.get("patch_size", PATCH_SIZE)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (crop_size, patch_size))
    if not ok or crop_size % (patch_size * MERGE):
        raise CheckpointError(f"{file}: CLIP image_size {crop_size!r} must be a positive multiple of 2 x patch_size "
                              f"{patch_size!r}; fix img_processor.vision_config")
    return crop_size, patch_size


@dataclass(frozen=True)
class ImageProcessor:
    """Images -> `pixel_values`, `image_sizes`, `num_img_tokens` exactly as the reference Phi3VImageProcessor."""

    num_crops: int = DEFAULT_NUM_CROPS
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    crop_size: int = CROP_SIZE
    patch_size: int = PATCH_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        _check_num_crops(self.num_crops)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise InputError(f"image_mean and image_std need 3 values, std nonzero: {self.image_mean}, {self.image_std}")

    @classmethod
    def from_dir(cls, path: str | Path, num_crops: int | None = None) -> ImageProcessor:
        """Read `preprocessor_config.json` of a checkpoint folder (CLIP defaults if the file is absent) and the crop and
        patch size from its config.json (`img_processor.vision_config`); an explicit `num_crops` overrides the file's."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {folder}")
        file = folder / PREPROCESSOR_CONFIG
        config = read_json(file, PREPROCESSOR_CONFIG) if file.is_file() else {}
        crop_size, patch_size = _crop_and_patch(folder)
        return cls(num_crops=num_crops if num_crops is not None else config.get("num_crops", DEFAULT_NUM_CROPS),
                   image_mean=tuple(config.get("image_mean", CLIP_MEAN)),
                   image_std=tuple(config.get("image_std", CLIP_STD)),
                   crop_size=crop_size, patch_size=patch_size)

    def num_tokens_for_size(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Image tokens a width x height image will take, without decoding it (e.g. to budget video frames)."""
        hd_h, hd_w = hd_size(width, height, self.num_crops if num_crops is None else num_crops, self.crop_size)
        return num_image_tokens(hd_h, hd_w, self.crop_size, self.patch_size)

    def __call__(self, images: ImageSource | list[ImageSource], num_crops: int | None = None) -> dict:
        """One image or a list (any `load_image` source) -> pixel_values float32 (n, K+1, 3, S, S) (global view, crops,
        zero padding), image_sizes int64 (n, 2) padded HD (height, width), num_img_tokens list[int]."""
        num_crops = self.num_crops if num_crops is None else _check_num_crops(num_crops)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise InputError("no images to process: pass at least one image")
        s = self.crop_size
        pixel_values = torch.zeros(len(images), num_crops + 1, 3, s, s, dtype=torch.float32)  # (n, K+1, 3, S, S)
        sizes, tokens = [], []
        for i, src in enumerate(images):
            hd = to_normalized_tensor(hd_transform(load_image(src, self.max_pixels), num_crops, s),
                                      self.image_mean, self.image_std)  # (3, H, W)
            crops = crops_with_global_view(hd, s)
            pixel_values[i, : len(crops)] = crops
            sizes.append(tuple(hd.shape[1:]))
            tokens.append(num_image_tokens(*sizes[-1], s, self.patch_size))
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.int64),
                "num_img_tokens": tokens}

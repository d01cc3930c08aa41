# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2 image processor (SigLIP anyres tiles and Hiera pixels of images) and the release's pixel recipes, bit for bit,
which the video processor applies to frames: SigLIP is PIL bicubic (no tensor op reproduces it), Hiera a float
bilinear resize without antialiasing (torchvision 0.16, which the release ran)."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature, get_patch_output_size, select_best_resolution
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    load_image,
)
from transformers.processing_utils import ImagesKwargs

from .configuration_vica2 import DEFAULT_IMAGE_GRID_PINPOINTS


# Frames per chunk of the Hiera resize: bounds the float copy of full-resolution frames (4 x 1080p ~ 100 MB).
HIERA_CHUNK_FRAMES = 4

# Channel counts an image array may have (grayscale, RGB, RGBA).
CHANNEL_COUNTS = (1, 3, 4)

# A media string of the form `scheme:...` (two or more letters, so a Windows drive `C:` is not one): http(s), rtsp,
# rtmp, ftp, data, ... Such a string names something to fetch, not a local file.
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")


class Vica2ImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    hiera_size (`int`, defaults to 1024): side of the square Hiera input (`config.hiera_config.image_size[0]`).
    hiera_image_mean, hiera_image_std (`list[float]`, default ImageNet's): the Hiera normalisation.
    hiera_antialias (`bool`, defaults to `False`): antialias the Hiera resize (the release did not).
    image_grid_pinpoints (`list[list[int]]`): `[height, width]` resolutions of the anyres tiling.
    """

    hiera_size: int
    hiera_image_mean: list[float] | tuple[float, ...]
    hiera_image_std: list[float] | tuple[float, ...]
    hiera_antialias: bool
    image_grid_pinpoints: list[list[int]]


class Vica2ImageProcessor(PilBackend):
    r"""
    Prepares images for ViCA2's two vision towers (no torchvision needed; videos: `Vica2VideoProcessor`).

    `__call__(images)` returns, for single images, `pixel_values` (num_images, max_tiles, 3, S, S) zero-padded past
    each image's tiles, `image_sizes` (num_images, 2) = original (height, width) and `hiera_pixel_values`
    (num_images, 3, Hs, Hs). Inputs: PIL images, or uint8 arrays / tensors (H, W, 3); grayscale and RGBA are
    converted to RGB the way the release's `Image.convert("RGB")` does (alpha is dropped, not composited).
    """

    model_input_names = ["pixel_values", "image_sizes", "hiera_pixel_values"]
    valid_kwargs = Vica2ImageProcessorKwargs

    resample = PILImageResampling.BICUBIC
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    size = {"height": 384, "width": 384}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    hiera_size = 1024
    hiera_image_mean = tuple(IMAGENET_DEFAULT_MEAN)
    hiera_image_std = tuple(IMAGENET_DEFAULT_STD)
    hiera_antialias = False
    image_grid_pinpoints = DEFAULT_IMAGE_GRID_PINPOINTS

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        return flatten_images(images)

    def process_image(self, image, input_data_format=None, **kwargs) -> np.ndarray:
        return to_rgb_uint8(image, what="image", input_data_format=input_data_format)

    def _preprocess(
        self, images: list[np.ndarray], do_resize: bool = True, size=None, resample=None, do_rescale: bool = True,
        rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean=None, image_std=None,
        hiera_size: int | None = None, hiera_image_mean=None, hiera_image_std=None, hiera_antialias: bool | None = None,
        image_grid_pinpoints=None, return_tensors=None, **kwargs,
    ) -> BatchFeature:
        if do_resize is False:
            raise ValueError("do_resize=False is not supported: the SigLIP tower needs S x S inputs.")
        side = square_side(size)
        _check_pinpoints(image_grid_pinpoints, side)
        siglip_norm = (rescale_factor if do_rescale else 1.0, tuple(image_mean) if do_normalize else (0.0, 0.0, 0.0),
                       tuple(image_std) if do_normalize else (1.0, 1.0, 1.0))
        tiles = [anyres_tiles(image, side, image_grid_pinpoints, resample) for image in images]
        pixel_values = torch.zeros(len(images), max(len(t) for t in tiles), 3, side, side)
        for i, image_tiles in enumerate(tiles):
            pixel_values[i, : len(image_tiles)] = normalize_uint8(np.stack(image_tiles), *siglip_norm)
        antialias = self.hiera_antialias if hiera_antialias is None else hiera_antialias
        hiera = [hiera_pixels(image[None], hiera_size, hiera_image_mean, hiera_image_std, antialias) for image in images]
        sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.long)
        data = {"pixel_values": pixel_values, "image_sizes": sizes, "hiera_pixel_values": torch.cat(hiera)}
        return BatchFeature(_as_return_type(data, return_tensors))


# ----------------------------------------------------------------------------------------------- pixel recipes
def pil_resize(frame: np.ndarray, side: int, resample=PILImageResampling.BICUBIC) -> np.ndarray:
    """The release's SigLIP resize: uint8 RGB to side x side with PIL (bicubic), aspect ratio not kept."""
    return np.asarray(Image.fromarray(frame).resize((side, side), resample=_pil_filter(resample)))


def anyres_tiles(image: np.ndarray, side: int, grid_pinpoints, resample=PILImageResampling.BICUBIC) -> list:
    """The release's anyres views of one image (uint8 (H, W, 3)): the whole image squashed to side x side, then the
    side x side tiles, row by row, of the image fitted (aspect kept) and centred on black in its best grid."""
    height, width = image.shape[:2]
    best_height, best_width = select_best_resolution((height, width), grid_pinpoints)
    # The image resized into the grid keeping its aspect ratio (the release's `resize_and_pad_image`), centred.
    new_height, new_width = get_patch_output_size(image, (best_height, best_width), ChannelDimension.LAST)
    canvas = Image.new("RGB", (best_width, best_height), (0, 0, 0))
    resized = Image.fromarray(image).resize((new_width, new_height), resample=_pil_filter(resample))
    canvas.paste(resized, ((best_width - new_width) // 2, (best_height - new_height) // 2))
    grid = np.asarray(canvas)
    tiles = [grid[y : y + side, x : x + side] for y in range(0, best_height, side) for x in range(0, best_width, side)]
    return [pil_resize(image, side, resample)] + tiles


def hiera_pixels(frames: np.ndarray, size: int, mean, std, antialias: bool = False, out=None) -> torch.Tensor:
    """The release's SAM2 recipe on uint8 RGB frames (N, H, W, 3) -> float32 (N, 3, size, size): /255 (float, as
    ToTensor), bilinear resize on the float tensor (align_corners=False), (x - mean) / std. A uint8 tensor is
    processed on its device; `out`: a float32 tensor there to write into."""
    frames = _as_tensor(frames)
    out = torch.empty(len(frames), 3, size, size, device=frames.device) if out is None else out
    for start in range(0, len(frames), HIERA_CHUNK_FRAMES):
        chunk = frames[start : start + HIERA_CHUNK_FRAMES].permute(0, 3, 1, 2).contiguous().float().div_(255)
        out[start : start + len(chunk)] = F.interpolate(chunk, size=(size, size), mode="bilinear",
                                                        align_corners=False, antialias=antialias)
    return out.sub_(_per_channel(mean, frames.device)).div_(_per_channel(std, frames.device))


def _as_tensor(pixels) -> torch.Tensor:  # a tensor stays on its device; a numpy array becomes a CPU tensor
    return pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))


def _per_channel(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def normalize_uint8(pixels, rescale_factor: float, mean, std, channels_first=False, out=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) (or (N, 3, H, W) with `channels_first`) -> float32 (N, 3, H, W) =
    (x * rescale_factor - mean) / std, bit-identical to the release: each output depends on one uint8 value, so the
    release's result is a 256-entry table (float types of transformers' `rescale`: float64 product cast to float32,
    and `normalize`: float32). Batched float32 ops reproduce it for the recipes used here (checked on all 256 values,
    every call, where it runs), else the table is gathered."""
    scaled = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    lut = (scaled[None, :] - np.float32(mean).reshape(3, 1)) / np.float32(std).reshape(3, 1)
    pixels = _as_tensor(pixels)  # a uint8 tensor on another device is normalised there
    device = pixels.device
    if out is None:
        out = torch.empty(pixels.shape[0], 3, *pixels.shape[2:4] if channels_first else pixels.shape[1:3], device=device)
    # one pass that converts (and transposes, channels last): cheaper than transposing the float copy
    out.copy_(pixels if channels_first else pixels.permute(0, 3, 1, 2))
    divisor = 1.0 / rescale_factor
    mean, std = _per_channel(mean, device), _per_channel(std, device)
    values = torch.arange(256, dtype=torch.float32, device=device).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    table = torch.from_numpy(lut.astype(np.float32)).to(device)
    if torch.equal(((values / divisor - mean) / std).view(3, 256), table):  # checked where it runs
        return out.div_(divisor).sub_(mean).div_(std)
    for channel in range(3):
        out[:, channel] = table[channel][out[:, channel].long()]
    return out


def _pil_filter(resample):
    return Image.Resampling(int(resample) if resample is not None else Image.Resampling.BICUBIC)


def square_side(size) -> int:
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    if height != width:
        raise ValueError(f"ViCA2's SigLIP input is square; got size height={height}, width={width}.")
    return height


def _check_pinpoints(grid_pinpoints, side: int) -> None:
    if any(len(p) != 2 or p[0] % side or p[1] % side for p in grid_pinpoints):
        raise ValueError(
            f"image_grid_pinpoints must be [height, width] multiples of the SigLIP size {side} (anyres tiles are "
            f"{side} x {side}); got {grid_pinpoints}. Build the image processor from the model config "
            "(Vica2Processor.from_model_config)."
        )


def _as_return_type(data: dict, return_tensors) -> dict:
    numpy = str(return_tensors) in ("np", "TensorType.NUMPY")
    return {key: value.numpy() for key, value in data.items()} if numpy else data


# ----------------------------------------------------------------------------------------------- input checks
def flatten_images(images) -> list:
    """A flat list of single images from an image, a (nested) list of images, or an (N, H, W, C) array."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def to_rgb_uint8(image, what: str = "image", input_data_format=None) -> np.ndarray:
    """A PIL image, an array / tensor ((H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4) or a path / URL as a uint8
    RGB (H, W, 3) array. Grayscale is replicated, alpha dropped (as PIL's `convert("RGB")`); 16- and 32-bit integer
    pixels are scaled to 0..255 (see `as_uint8`)."""
    if isinstance(image, (str, os.PathLike)):
        image = _load_image_file(os.fspath(image))
    if isinstance(image, Image.Image):
        if not image.mode.startswith(("I", "F")):
            return check_not_empty(np.array(image if image.mode == "RGB" else image.convert("RGB")), what)
        # 16/32-bit integer and float modes: PIL's convert("RGB") would clip them at 255; scale them as arrays.
        image, input_data_format = np.array(image), ChannelDimension.LAST
    image = as_array(image, f"{what} type", "a PIL image, a uint8 numpy array or torch tensor of shape (height, "
                     "width, 3), or a path")
    if image.ndim == 2:
        image, input_data_format = image[..., None], ChannelDimension.LAST
    if image.ndim != 3:
        raise ValueError(
            f"The {what} array has shape {tuple(image.shape)}; expected (height, width, 3) RGB (also accepted: "
            "(height, width) grayscale, 4-channel RGBA, or channels first)."
        )
    return rgb_uint8(image, what, input_data_format)


def as_array(value, what: str, expected: str) -> np.ndarray:
    """A numpy array or a tensor (moved to the CPU) as a numpy array, else a TypeError saying what was expected."""
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
    if not isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported {what} {type(value).__name__}: pass {expected}.")
    return value


def rgb_uint8(pixels: np.ndarray, what: str, input_data_format=None) -> np.ndarray:
    """(..., H, W, C) or (..., C, H, W) pixels, C in 1, 3, 4, as uint8 RGB (..., H, W, 3): grayscale replicated,
    alpha dropped (as PIL's `convert("RGB")`), 16- and 32-bit integers scaled to 0..255 (see `as_uint8`)."""
    if channel_dimension(pixels.shape[-3:], what, input_data_format) == ChannelDimension.FIRST:
        pixels = np.moveaxis(pixels, -3, -1)
    return check_not_empty(as_rgb_channels(as_uint8(pixels, what), what), what)


def as_uint8(pixels: np.ndarray, what: str = "image") -> np.ndarray:
    """Pixels as uint8: uint8 as is, bool as 0 / 255, 16- and 32-bit integers scaled by their dtype's range (65535 is
    white, as in a 16-bit PNG). Refused: floats (their range is the caller's convention) and 8- / 64-bit signed
    integers (an int64 array is nearly always 0..255 values, which scaling by 2**63 would turn black)."""
    dtype = pixels.dtype
    if dtype == np.uint8:
        return pixels
    if dtype == np.bool_:
        return pixels.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(dtype, np.integer) and dtype.itemsize not in (2, 4):
        raise ValueError(
            f"The {what} array has dtype {dtype}; ViCA2 takes uint8 RGB (0..255), bool masks, or 16- / 32-bit integer "
            "pixels (scaled by their range). For 0..255 values use `.astype(np.uint8)` (torch: `.to(torch.uint8)`)."
        )
    if np.issubdtype(dtype, np.integer):
        if np.issubdtype(dtype, np.signedinteger) and pixels.size and pixels.min() < 0:
            raise ValueError(
                f"The {what} array ({dtype}) has negative values; integer pixels must be 0 (black) to the dtype's "
                f"maximum {np.iinfo(dtype).max} (white). Convert it to uint8 yourself if it uses another range."
            )
        return np.rint(pixels * (255 / np.iinfo(dtype).max)).astype(np.uint8)
    raise ValueError(
        f"The {what} array has dtype {dtype}; ViCA2's preprocessing is defined on uint8 RGB (0..255) (integer types "
        "are scaled by their range). Convert floats first, e.g. `(x * 255).round().clip(0, 255).astype(np.uint8)` "
        "for floats in [0, 1]."
    )


def channel_dimension(shape: tuple, what: str, input_data_format) -> ChannelDimension:
    """Where the channels of an (A, B, C) image are: `input_data_format` when given, else the one end that can hold
    1, 3 or 4 channels; when both can (tiny images such as (3, 4, 4)) the caller is asked rather than guessed for."""
    if input_data_format is not None:
        try:
            return ChannelDimension(input_data_format)
        except ValueError:
            raise ValueError(
                f"input_data_format must be 'channels_last' or 'channels_first' (a ChannelDimension), got "
                f"{input_data_format!r}."
            ) from None
    first, last = shape[0] in CHANNEL_COUNTS, shape[-1] in CHANNEL_COUNTS
    if first and last:
        raise ValueError(
            f"Cannot tell where the channels of the {what} of shape {tuple(shape)} are: both its first and its last "
            "dimension could be channels. Pass input_data_format='channels_last' (height, width, channels) or "
            "input_data_format='channels_first' (channels, height, width)."
        )
    if not (first or last):
        raise ValueError(
            f"The {what} has shape {tuple(shape)}; expected (height, width, 3) RGB (also accepted: (height, width) "
            "grayscale, 1- or 4-channel frames, or channels first)."
        )
    return ChannelDimension.LAST if last else ChannelDimension.FIRST


def check_not_empty(image: np.ndarray, what: str) -> np.ndarray:
    if 0 in image.shape[-3:-1]:
        height, width = image.shape[-3:-1]
        raise ValueError(f"The {what} is empty (height {height}, width {width}); pass a picture of at least 1 x 1 pixels.")
    return image


def as_rgb_channels(image: np.ndarray, what: str) -> np.ndarray:
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels in (3, 4):  # alpha dropped, as PIL's convert("RGB")
        return image if channels == 3 else np.ascontiguousarray(image[..., :3])
    raise ValueError(f"The {what} has {channels} channels; expected 3 (RGB), 1 (grayscale) or 4 (RGBA).")


def is_remote_media(source) -> bool:
    """Whether a media string is a URL to fetch (http(s), rtsp, ftp, data, ...); an existing local file never is."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = os.fspath(source)
    return isinstance(path, str) and bool(URL_SCHEME.match(path)) and not os.path.exists(path)


def _load_image_file(path: str) -> Image.Image:
    is_url = path.startswith(("http://", "https://", "data:"))
    if not is_url and not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: '{path}'. Check the path, or pass a PIL image or an array.")
    source = path if len(path) <= 200 else path[:200] + "..."  # a data: URL can be megabytes long
    try:  # decode now, so that a truncated file or an error page fails here, naming its source
        if path.startswith(("http://", "https://")):  # an error page says its HTTP status, not "not an image"
            import httpx  # a dependency of huggingface_hub; only URLs need it

            response = httpx.get(path, timeout=30, follow_redirects=True)
            if response.is_error:
                raise OSError(f"the server answered HTTP {response.status_code} {response.reason_phrase}")
            path = Image.open(io.BytesIO(response.content))
        image = load_image(path)
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"The image '{source}' is too large to decode safely ({error}): PIL refuses images above twice "
            f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels. Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust it."
        ) from error
    except Exception as error:  # noqa: BLE001 - network, HTTP and image-format errors all mean "cannot read it"
        hint = "Check the URL (or fetch the image yourself and pass it)" if is_url else "Check that it is an image"
        raise ValueError(f"Could not read the image '{source}': {type(error).__name__}: {error}. {hint}.") from error
    return image


Vica2ImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["Vica2ImageProcessor"]

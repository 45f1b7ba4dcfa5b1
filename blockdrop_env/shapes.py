"""A procedural image set of geometric shapes whose difficulty is known per image.

Each image shows one main shape of one of ten classes (:data:`SHAPE_CLASSES`) on a plain
background, at a random position, size, rotation and colour. Four nuisances make an image
harder, and each is recorded per image in ``dataset.factors`` with the main shape's size:

========== ============================================================== =================
factor     meaning                                                        range
========== ============================================================== =================
clutter    number of distractors: small shapes of other classes drawn     0 .. 6 (integers)
           behind the main shape, and thin strokes drawn over it
occlusion  fraction of the main shape's area hidden by a rectangular      0 .. 1 (mostly
           patch of random colour                                         below 0.6)
noise      standard deviation of Gaussian pixel noise, pixels in [0, 1]   0 .. 0.25
scale      the main shape's circumradius divided by the image side        0.14 .. 0.40
contrast   absolute difference between the foreground and background     0.12 .. 0.75
           colour in every RGB channel, pixels in [0, 1]
difficulty mean of the five factors mapped to [0, 1], see below           0 .. 1
========== ============================================================== =================

``difficulty`` is the mean of ``clutter / 6``, ``min(occlusion / 0.5, 1)``, ``noise / 0.25``,
``(0.40 - scale) / 0.26`` and ``(0.75 - contrast) / 0.63``. It rises with clutter, occlusion
and noise and falls with scale and contrast.

The factors of an image are drawn around one latent level ``z = u ** 1.6`` (``u`` uniform in
[0, 1]), so most images are easy and about one in five is hard. Below a threshold of the
latent level an image has no noise, no clutter and no occlusion: a clean, large,
high-contrast shape.

Shapes are rasterised from signed-distance functions evaluated on the pixel grid for a whole
batch of images at once, with one pixel of anti-aliasing. Images are generated in blocks of
:data:`BLOCK_SIZE`, each from its own ``torch.Generator`` seeded with ``(seed, block index)``,
so a set is a pure function of its seed, ignores torch's global RNG, and the first ``n``
images of a larger set equal the set of ``n`` images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blockdrop_env.data import ImageDataset
from blockdrop_env.errors import ConfigError

SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "ring", "triangle", "square", "hexagon",
    "cross", "star", "crescent", "heart", "arrow",
)  # fmt: skip
"""Class names in label order. The classes stay distinct under any rotation, so a square turned
by 45 degrees is still a square and there is no separate diamond class."""

FACTOR_NAMES: tuple[str, ...] = ("clutter", "occlusion", "noise", "scale", "contrast", "difficulty")
SPLIT_SEEDS = {"train": 1_000, "test": 2_000}
SPLIT_SIZES = {"train": 50_000, "test": 10_000}
MIN_IMAGE_SIZE = 16
MAX_SEED = 2**31 - 1
BLOCK_SIZE = 1024
"""Images drawn from one generator; every block holds each class equally often."""

MAX_CLUTTER = 4
MAX_NOISE = 0.12
MAX_OCCLUSION = 0.4
SCALE_RANGE = (0.14, 0.40)
CONTRAST_RANGE = (0.3, 0.75)

_LATENT_POWER = 1.6  # z = u ** 1.6: P(z < 0.3) is about 0.47, P(z > 0.7) about 0.20
_FACTOR_JITTER = 0.2  # each factor's hardness is z plus uniform noise in [-0.2, 0.2]
# Latent hardness below which a nuisance is absent, so easy images are clean.
_NOISE_ONSET = 0.3
_CLUTTER_ONSET = 0.25
_OCCLUSION_ONSET = 0.4

_Sdf = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- public API ----------------------------------------------------------------------------------


def make_shapes(num_images: int, seed: int, image_size: int = 32) -> ImageDataset:
    """Generate ``num_images`` labelled shape images with their difficulty factors.

    Args:
        num_images: Number of images, at least 1.
        seed: Integer in ``[0, 2**31 - 1]``; the same seed gives identical tensors.
        image_size: Side of the square RGB images in pixels, at least 16.

    Returns:
        uint8 images (N, 3, S, S), labels into :data:`SHAPE_CLASSES` and ``factors`` with one
        float32 (N,) tensor per name in :data:`FACTOR_NAMES`.

    Raises:
        ConfigError: if an argument is out of range.
    """
    _validate_arguments(num_images, seed, image_size)
    with _single_thread():
        return _make_shapes(num_images, seed, image_size)


@contextmanager
def _single_thread() -> Iterator[None]:
    # The ops are small (one block is 1024 x 32 x 32 floats), and on two shared CPU cores
    # torch's intra-op threads made 50,000 images take 29 s instead of 3.7 s with one thread.
    # NOTE: torch's thread count is process-wide, so other threads also run with one thread
    # while a set is generated.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _make_shapes(num_images: int, seed: int, image_size: int) -> ImageDataset:
    # Every block is rendered whole and the last one cut, so a prefix does not depend on N.
    blocks = [
        _render_block(BLOCK_SIZE, image_size, _block_generator(seed, block))
        for block in range(-(-num_images // BLOCK_SIZE))
    ]
    images = torch.cat([images for images, _, _ in blocks])[:num_images]
    labels = torch.cat([labels for _, labels, _ in blocks])[:num_images]
    factors = {
        name: torch.cat([block[2][name] for block in blocks])[:num_images].clone()
        for name in FACTOR_NAMES
    }
    return ImageDataset(
        images, labels, list(SHAPE_CLASSES), name=f"shapes:seed{seed}", factors=factors
    )


def load_shapes(split: str, num_images: int | None = None) -> ImageDataset:
    """Generate one split of the built-in shape set (32x32 RGB, 10 classes).

    The train and test splits use fixed, different seeds (:data:`SPLIT_SEEDS`), so every call
    returns the same images and nothing is read from disk.

    Args:
        split: ``"train"`` (50,000 images by default) or ``"test"`` (10,000).
        num_images: Take only the first ``num_images`` images of the split; ``None`` for the
            default size. Larger values extend the split with more images of the same seed.

    Returns:
        The split, named ``"shapes:train"`` or ``"shapes:test"``.

    Raises:
        ConfigError: if ``split`` is unknown or ``num_images`` is not positive.
    """
    if split not in SPLIT_SEEDS:
        raise ConfigError(
            f"`split` must be one of {tuple(SPLIT_SEEDS)} for the shapes set, got {split!r}"
        )
    size = SPLIT_SIZES[split] if num_images is None else num_images
    dataset = make_shapes(size, SPLIT_SEEDS[split])
    dataset.name = f"shapes:{split}"
    return dataset


def difficulty_from_factors(
    clutter: torch.Tensor,
    occlusion: torch.Tensor,
    noise: torch.Tensor,
    scale: torch.Tensor,
    contrast: torch.Tensor,
) -> torch.Tensor:
    """Combine the five factors into one difficulty in [0, 1] (their mean after normalising).

    Each factor is mapped to [0, 1], 0 for the easiest value in its range, and the five are
    averaged with equal weights, so the result rises with clutter, occlusion and noise and
    falls with scale and contrast.

    Args:
        clutter: Number of distractors, 0 to 6.
        occlusion: Hidden fraction of the main shape; 0.5 and above count as fully hard.
        noise: Pixel noise standard deviation, 0 to 0.25.
        scale: Circumradius over image side, 0.14 to 0.40.
        contrast: Per-channel colour difference, 0.12 to 0.75.

    Returns:
        Float tensor of the broadcast shape of the inputs.
    """
    scale_low, scale_high = SCALE_RANGE
    contrast_low, contrast_high = CONTRAST_RANGE
    parts = (
        clutter / MAX_CLUTTER,
        occlusion / MAX_OCCLUSION,
        noise / MAX_NOISE,
        (scale_high - scale) / (scale_high - scale_low),
        (contrast_high - contrast) / (contrast_high - contrast_low),
    )
    return torch.stack([part.clamp(0, 1) for part in parts]).mean(dim=0)


def save_contact_sheet(
    dataset: ImageDataset, path: str | Path, rows: int = 10, cols: int = 10, zoom: int = 2
) -> Path:
    """Write a PNG grid of images, one row per difficulty band, easiest row first.

    With a ``"difficulty"`` factor, the images are sorted by it and split into ``rows`` equal
    bands, and each row shows ``cols`` images spread evenly over its band. Without one, the
    first ``rows * cols`` images are shown in order.

    Args:
        dataset: The images to show.
        path: Output PNG file; its folder is created.
        rows: Number of rows, at least 1.
        cols: Images per row, at least 1.
        zoom: Each pixel is drawn as a ``zoom`` x ``zoom`` square.

    Returns:
        The path written.

    Raises:
        ConfigError: if the dataset has fewer than ``rows * cols`` images or an argument is
            not positive.
    """
    for name, value in (("rows", rows), ("cols", cols), ("zoom", zoom)):
        if value < 1:
            raise ConfigError(f"`{name}` must be >= 1, got {value}")
    if len(dataset) < rows * cols:
        raise ConfigError(
            f"`dataset` has {len(dataset)} images, fewer than rows * cols = {rows * cols}; "
            "pass a larger dataset or fewer rows or columns"
        )
    images = dataset.images[_sheet_indices(dataset, rows, cols)]
    sheet = _tile(images, rows, cols, padding=2)
    sheet = sheet.repeat_interleave(zoom, dim=0).repeat_interleave(zoom, dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet.numpy()).save(path, optimize=True)
    return path


# -- arguments and seeding -----------------------------------------------------------------------


def _validate_arguments(num_images: int, seed: int, image_size: int) -> None:
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ConfigError(f"`num_images` must be a positive integer, got {num_images!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"`seed` must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"`image_size` must be an integer >= {MIN_IMAGE_SIZE} (pixels per side), got "
            f"{image_size!r}; smaller shapes cannot be told apart"
        )


def _block_generator(seed: int, block: int) -> torch.Generator:
    # Block b of seed s gets its own stream, so a prefix of a set does not depend on its length.
    # torch's CPU generator keeps only the low 32 bits of a seed, so (seed, block) is hashed
    # into 32 bits with numpy's SeedSequence instead of being packed into one 64-bit integer.
    state = np.random.SeedSequence([seed, block]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


# -- one block of images -------------------------------------------------------------------------


def _render_block(
    num_images: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    labels = _balanced_labels(num_images, generator)
    factors = _draw_factors(num_images, generator)
    radius = factors["scale"] * size
    centre = _uniform(num_images, 2, generator) * (size - 2 * radius - 1)[:, None]
    centre += (radius + 0.5)[:, None]
    angle = _uniform(num_images, 1, generator)[:, 0] * 2 * math.pi
    background, foreground = _colours(factors["contrast"], generator)

    canvas = background[:, :, None, None].expand(-1, -1, size, size).clone()
    strokes = _draw_distractor_shapes(canvas, factors["clutter"], labels, radius, generator)
    shape = _shape_alpha(labels, centre, radius, angle, size)
    _composite(canvas, shape, foreground)
    _draw_strokes(canvas, strokes, size, generator)
    patch = _occluder_alpha(factors["occlusion"], centre, radius, size, generator)
    _composite(canvas, patch, _uniform(num_images, 3, generator))
    _add_noise(canvas, factors["noise"], generator)

    covered = (shape * patch).sum(dim=(1, 2)) / shape.sum(dim=(1, 2))
    factors["occlusion"] = covered
    factors["difficulty"] = difficulty_from_factors(**{n: factors[n] for n in FACTOR_NAMES[:5]})
    images = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels, factors


def _uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(rows, cols, generator=generator)


def _balanced_labels(num_images: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.arange(num_images) % len(SHAPE_CLASSES)
    return labels[torch.randperm(num_images, generator=generator)]


def _draw_factors(num_images: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw each factor's hardness around one latent level and map it to the factor's range.

    ``occlusion`` is the target fraction here; the block replaces it with the measured one.
    """
    latent = _uniform(num_images, 1, generator) ** _LATENT_POWER
    jitter = (_uniform(num_images, 5, generator) * 2 - 1) * _FACTOR_JITTER
    hardness = (latent + jitter).clamp(0, 1).unbind(dim=1)
    scale_low, scale_high = SCALE_RANGE
    contrast_low, contrast_high = CONTRAST_RANGE
    clutter = (_ramp(hardness[0], _CLUTTER_ONSET) * (MAX_CLUTTER + 1)).floor()
    return {
        "clutter": clutter.clamp(max=MAX_CLUTTER),
        "occlusion": _ramp(hardness[1], _OCCLUSION_ONSET) * MAX_OCCLUSION,
        "noise": _ramp(hardness[2], _NOISE_ONSET) * MAX_NOISE,
        "scale": scale_high - hardness[3] * (scale_high - scale_low),
        "contrast": contrast_high - hardness[4] * (contrast_high - contrast_low),
    }


def _ramp(hardness: torch.Tensor, onset: float) -> torch.Tensor:
    return ((hardness - onset) / (1 - onset)).clamp(0, 1)


def _colours(
    contrast: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw background and foreground colours that differ by ``contrast`` in every channel."""
    num_images = contrast.shape[0]
    sign = torch.where(_uniform(num_images, 3, generator) < 0.5, -1.0, 1.0)
    step = contrast[:, None] * sign
    # The background is drawn from the range that keeps background + step inside [0, 1].
    low = (-step).clamp(min=0)
    background = low + _uniform(num_images, 3, generator) * (1 - contrast[:, None])
    return background, background + step


def _composite(canvas: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> None:
    canvas.lerp_(colour[:, :, None, None].expand_as(canvas), alpha[:, None].expand_as(canvas))


# -- distractors, occluder and noise -------------------------------------------------------------


def _draw_distractor_shapes(
    canvas: torch.Tensor,
    clutter: torch.Tensor,
    labels: torch.Tensor,
    radius: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw the shape distractors behind the main shape; return the stroke mask (N, 6).

    Each distractor slot is a stroke or a small shape of another class with equal chance.
    A shape distractor's circumradius is 0.3 to 0.5 of the main shape's, so the largest shape
    in the image carries the label.
    """
    num_images, _, size, _ = canvas.shape
    active = torch.arange(MAX_CLUTTER)[None, :] < clutter[:, None]
    is_stroke = _uniform(num_images, MAX_CLUTTER, generator) < 0.5
    for slot in range(MAX_CLUTTER):
        other = (labels + torch.randint(1, len(SHAPE_CLASSES), (num_images,), generator=generator))
        small = radius * (0.3 + 0.2 * _uniform(num_images, 1, generator)[:, 0])
        small = small.clamp(min=2.5 * size / 32)
        centre = _uniform(num_images, 2, generator) * size
        angle = _uniform(num_images, 1, generator)[:, 0] * 2 * math.pi
        colour = _uniform(num_images, 3, generator)
        index = (active[:, slot] & ~is_stroke[:, slot]).nonzero()[:, 0]
        if index.numel():
            kind = other[index] % len(SHAPE_CLASSES)
            alpha = _shape_alpha(kind, centre[index], small[index], angle[index], size)
            part = canvas[index]
            _composite(part, alpha, colour[index])
            canvas[index] = part
    return active & is_stroke


def _draw_strokes(
    canvas: torch.Tensor, strokes: torch.Tensor, size: int, generator: torch.Generator
) -> None:
    """Draw line segments 0.8 to 1.8 pixels wide (at 32x32) over the image."""
    num_images = canvas.shape[0]
    for slot in range(MAX_CLUTTER):
        ends = _uniform(num_images, 4, generator) * size
        width = (0.8 + _uniform(num_images, 1, generator)[:, 0]) * size / 32
        colour = _uniform(num_images, 3, generator)
        index = strokes[:, slot].nonzero()[:, 0]
        if index.numel():
            distance = _segment_distance(ends[index], size) - width[index, None, None] / 2
            part = canvas[index]
            _composite(part, (0.5 - distance).clamp(0, 1), colour[index])
            canvas[index] = part


def _occluder_alpha(
    occlusion: torch.Tensor,
    centre: torch.Tensor,
    radius: torch.Tensor,
    size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Coverage (N, S, S) of an axis-aligned patch that cuts into the main shape from one side.

    The cut line lies ``2 * occlusion`` of the way across a disc of radius ``0.85 * radius``
    (the circle class), so 0.5 hides half a centred circle. The patch runs from there to 1 to 4
    pixels beyond the shape's bounding square. Images with zero occlusion get no patch.
    """
    num_images = occlusion.shape[0]
    side = torch.randint(0, 4, (num_images,), generator=generator)
    margin = 1 + 3 * _uniform(num_images, 1, generator)[:, 0]
    extent = radius + margin
    cut = 0.85 * radius * (1 - 2 * occlusion)
    # Along the cut axis the patch spans [centre + cut, centre + extent].
    along_half = (extent - cut) / 2
    along_offset = cut + along_half
    sign = torch.where(side % 2 == 0, -1.0, 1.0)
    vertical = side >= 2
    offset_x = torch.where(vertical, 0.0, sign * along_offset)
    offset_y = torch.where(vertical, sign * along_offset, 0.0)
    half_x = torch.where(vertical, extent, along_half)
    half_y = torch.where(vertical, along_half, extent)
    x, y = _pixel_grid(size)
    dx = x - (centre[:, 0] + offset_x)[:, None, None]
    dy = y - (centre[:, 1] + offset_y)[:, None, None]
    distance = _box(dx, dy, half_x[:, None, None], half_y[:, None, None])
    alpha = (0.5 - distance).clamp(0, 1)
    return alpha * (occlusion > 0).float()[:, None, None]


def _add_noise(canvas: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> None:
    index = (noise > 0).nonzero()[:, 0]
    if index.numel():
        shape = (index.numel(), *canvas.shape[1:])
        sample = torch.randn(shape, generator=generator) * noise[index, None, None, None]
        canvas[index] += sample


# -- rasterisation -------------------------------------------------------------------------------


def _pixel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates, x as (1, 1, S) and y as (1, S, 1)."""
    coordinates = torch.arange(size, dtype=torch.float32) + 0.5
    return coordinates.view(1, 1, size), coordinates.view(1, size, 1)


def _shape_alpha(
    kind: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor, size: int
) -> torch.Tensor:
    """Anti-aliased coverage (N, S, S) of shape ``kind[i]`` centred at ``centre[i]`` (x, y).

    The signed distance is computed in the shape's own frame (circumradius about 1) and scaled
    back to pixels, so the one-pixel ramp of the anti-aliasing does not depend on the size.
    """
    x, y = _pixel_grid(size)
    dx = x - centre[:, 0, None, None]
    dy = y - centre[:, 1, None, None]
    cos = (torch.cos(angle) / radius)[:, None, None]
    sin = (torch.sin(angle) / radius)[:, None, None]
    u = cos * dx + sin * dy
    v = cos * dy - sin * dx
    distance = torch.empty_like(u)
    for label, sdf in enumerate(_SHAPE_SDFS):
        index = (kind == label).nonzero()[:, 0]
        if index.numel():
            distance[index] = sdf(u[index], v[index])
    return (0.5 - distance * radius[:, None, None]).clamp(0, 1)


def _segment_distance(ends: torch.Tensor, size: int) -> torch.Tensor:
    """Distance (N, S, S) in pixels from each pixel to the segment ``ends[i]`` = (x0, y0, x1, y1)."""
    x, y = _pixel_grid(size)
    x0, y0, x1, y1 = (ends[:, k, None, None] for k in range(4))
    ex, ey = x1 - x0, y1 - y0
    wx, wy = x - x0, y - y0
    t = ((wx * ex + wy * ey) / (ex * ex + ey * ey).clamp(min=1e-6)).clamp(0, 1)
    return torch.hypot(wx - t * ex, wy - t * ey)


# -- signed-distance functions in the shape's frame, negative inside -----------------------------


def _box(u: torch.Tensor, v: torch.Tensor, half_u: object, half_v: object) -> torch.Tensor:
    qu = u.abs() - half_u
    qv = v.abs() - half_v
    outside = torch.hypot(qu.clamp(min=0), qv.clamp(min=0))
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _convex(u: torch.Tensor, v: torch.Tensor, vertices: list[tuple[float, float]]) -> torch.Tensor:
    """Maximum over the edges of a counter-clockwise polygon of the distance to the edge's line.

    Exact inside and along edges; outside a corner it underestimates, which moves the
    anti-aliased corner by a fraction of a pixel at most.
    """
    edges = []
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        length = math.hypot(bx - ax, by - ay)
        nx, ny = (by - ay) / length, (ax - bx) / length
        edges.append((u - ax) * nx + (v - ay) * ny)
    return torch.stack(edges).amax(dim=0)


def _regular_polygon(sides: int, circumradius: float) -> list[tuple[float, float]]:
    angles = [math.pi / 2 + 2 * math.pi * k / sides for k in range(sides)]
    return [(circumradius * math.cos(a), circumradius * math.sin(a)) for a in angles]


_TRIANGLE = _regular_polygon(3, 1.0)
_SQUARE = _regular_polygon(4, 0.95)
_HEXAGON = _regular_polygon(6, 0.92)
_ARROW_HEAD = [(0.0, -0.55), (0.95, 0.0), (0.0, 0.55)]


def _circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.hypot(u, v) - 0.85


def _ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(u, v) - 0.68).abs() - 0.24


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Shifted so the triangle's bounding box, not its circumcentre, sits at the shape's position.
    return _convex(u, v + 0.25, _TRIANGLE)


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _convex(u, v, _SQUARE)


def _hexagon(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _convex(u, v, _HEXAGON)


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_box(u, v, 0.9, 0.28), _box(u, v, 0.28, 0.9))


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Five-pointed star: fold the plane into one half-spike and measure to its outer edge."""
    sector = 2 * math.pi / 5
    angle = torch.remainder(torch.atan2(u, v) + sector / 2, sector) - sector / 2
    angle = angle.abs()
    r = torch.hypot(u, v)
    qx, qy = r * torch.cos(angle), r * torch.sin(angle)
    tip, inner = 1.0, 0.45
    ex, ey = inner * math.cos(sector / 2) - tip, inner * math.sin(sector / 2)
    wx, wy = qx - tip, qy
    t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    distance = torch.hypot(wx - t * ex, wy - t * ey)
    return torch.where(ex * wy - ey * wx > 0, -distance, distance)


def _crescent(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    outer = torch.hypot(u + 0.15, v) - 0.85
    bite = torch.hypot(u - 0.3, v) - 0.72
    return torch.maximum(outer, -bite)


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Two discs on the upper edges of a square turned by 45 degrees."""
    lobes = torch.minimum(torch.hypot(u + 0.375, v - 0.295), torch.hypot(u - 0.375, v - 0.295))
    point = (u.abs() + (v + 0.08).abs() - 0.75) / math.sqrt(2)
    return torch.minimum(lobes - 0.53, point)


def _arrow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    shaft = _box(u + 0.45, v, 0.5, 0.16)
    return torch.minimum(shaft, _convex(u, v, _ARROW_HEAD))


_SHAPE_SDFS: tuple[_Sdf, ...] = (
    _circle, _ring, _triangle, _square, _hexagon, _cross, _star, _crescent, _heart, _arrow,
)  # fmt: skip


# -- contact sheet -------------------------------------------------------------------------------


def _sheet_indices(dataset: ImageDataset, rows: int, cols: int) -> torch.Tensor:
    count = rows * cols
    if not dataset.factors or "difficulty" not in dataset.factors:
        return torch.arange(count)
    order = torch.argsort(dataset.factors["difficulty"], stable=True)
    bands = torch.tensor_split(order, rows)
    picks = [band[torch.linspace(0, len(band) - 1, cols).round().long()] for band in bands]
    return torch.cat(picks)


def _tile(images: torch.Tensor, rows: int, cols: int, padding: int) -> torch.Tensor:
    """Arrange (rows * cols, 3, H, W) images into one (H', W', 3) uint8 grid on white."""
    _, _, height, width = images.shape
    cell_h, cell_w = height + padding, width + padding
    sheet = torch.full((rows * cell_h + padding, cols * cell_w + padding, 3), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        top = padding + (i // cols) * cell_h
        left = padding + (i % cols) * cell_w
        sheet[top : top + height, left : left + width] = image.permute(1, 2, 0)
    return sheet


__all__ = [
    "FACTOR_NAMES",
    "SHAPE_CLASSES",
    "SPLIT_SEEDS",
    "SPLIT_SIZES",
    "difficulty_from_factors",
    "load_shapes",
    "make_shapes",
    "save_contact_sheet",
]

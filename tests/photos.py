"""Real photographs for tests: the sample images that ship inside scikit-image and scikit-learn
(test dependencies only), at their own sizes and aspect ratios (1:2.6 to 1.2:1, colour, grey,
binary, RGBA), captioned from their names, written as an image folder with a caption file beside
each image — the input a user gives ``prx data convert --from folder``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# name in skimage.data → caption. Sizes are (height, width).
SKIMAGE_PHOTOS = {
    "astronaut": "a photograph of an astronaut in a spacesuit with an american flag",  # 512×512
    "chelsea": "a photograph of a tabby cat named chelsea",  # 300×451
    "coffee": "a cup of coffee on a saucer seen from above",  # 400×600
    "rocket": "a rocket on its launch pad",  # 427×640
    "stereo_motorcycle": "a motorcycle parked in a garage",  # 500×741
    "hubble_deep_field": "the hubble deep field full of galaxies",  # 872×1000
    "immunohistochemistry": "a microscope image of a stained tissue sample",  # 512×512
    "colorwheel": "a colour wheel",  # 370×371
    "logo": "the scikit-image logo",  # 500×500, RGBA
    "camera": "a black and white photograph of a cameraman",  # 512×512, grey
    "coins": "a black and white photograph of old coins",  # 303×384, grey
    "cell": "a microscope image of a cell",  # 660×550, grey, portrait
    "clock": "a black and white photograph of a clock",  # 300×400, grey
    "page": "a scanned page of text",  # 191×384, grey
    "text": "a photograph of text painted on a wall",  # 172×448, grey, wider than 2:1
    "horse": "the black silhouette of a horse",  # 328×400, binary
    "moon": "the surface of the moon",  # 512×512, grey
}
SKLEARN_PHOTOS = {
    "china.jpg": "a chinese temple among trees",  # 427×640
    "flower.jpg": "a close-up of a flower",  # 427×640
}


def load_photos() -> dict[str, tuple[np.ndarray, str]]:
    """name → (uint8 array (H, W) or (H, W, C), caption)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    for name, caption in SKIMAGE_PHOTOS.items():
        image = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            image = image[0]  # the left view
        if image.dtype == bool:
            image = (~image * 255).astype(np.uint8)  # a black horse on white
        photos[name] = (image, caption)
    samples = load_sample_images()
    for path, image in zip(samples.filenames, samples.images):
        name = Path(path).name
        photos[Path(name).stem] = (image, SKLEARN_PHOTOS[name])
    return photos


def write_photo_folder(root: Path, copies: int = 1) -> list[Path]:
    """The photos as files with a ``.txt`` caption beside each, in PNG, JPEG and WebP alike
    (``copies`` > 1 repeats them under other names, for enough row groups on several ranks)."""
    root.mkdir(parents=True, exist_ok=True)
    formats = ["png", "jpg", "webp"]
    paths = []
    for copy in range(copies):
        for k, (name, (image, caption)) in enumerate(sorted(load_photos().items())):
            fmt = formats[(k + copy) % len(formats)]
            picture = Image.fromarray(image)
            if fmt == "jpg" and picture.mode not in ("RGB", "L"):
                picture = picture.convert("RGB")
            path = root / f"{name}_{copy}.{fmt}"
            picture.save(path, **({"quality": 90} if fmt in ("jpg", "webp") else {}))
            path.with_suffix(".txt").write_text(caption + "\n")
            paths.append(path)
    return paths

"""A synthetic DFJ-like task whose verdicts need the pixels.

Real images are clean procedural scenes (smooth gradients and shaded shapes). Fake and edited images
carry one planted artifact — a colour blotch, a texture patch or a stripe seam — in one quadrant.
Detector responses are written by rules at five quality levels, in DFJ's
`<reasoning>…</reasoning> <answer>…</answer>` style:

  5  right label, the artifact type and region that are there
  4  the same, hedged (a small slip)
  3  right label, citing an artifact type that is not there (weak grounding); real images: vague
  2  wrong label, though citing the artifact that is there; real images: hedged
  1  wrong label with a hallucinated artifact

Telling 5 from 3, or 2 from 1, needs the image: the text alone does not say which artifact is there.

The gold pointwise reasoning is grounded the way DFJ's rationales are: it says which artifact type
the response cites, asks whether the image shows it, then gives the verdict ("Response cites: colour
artifact. / Is there a colour artifact in the image? / No. / Right class, ungrounded.", one line
each). The pairwise template allows only the letter.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dfj import prompts

ARTIFACTS = ("colour", "texture", "seam")
REGIONS = ("upper left", "upper right", "lower left", "lower right")
IMAGE_SIZE = 112  # 8 x 8 patches -> 16 image tokens after the 2 x 2 merge

ARTIFACT_WORDS = {
    "colour": ["an oversaturated colour blotch", "a colour inconsistency", "an unnatural colour patch"],
    "texture": ["a noisy checkerboard texture", "a texture artifact", "a repeated high-frequency texture"],
    "seam": ["a striped blending seam", "a visible blending seam", "stripe-like splicing marks"],
}
_SCENES = ["the scene", "the image", "the picture", "this photo"]


@dataclass
class Scene:
    label: str  # real / fake / edited
    artifact: str | None
    region: str | None


def render_image(rng: random.Random, scene: Scene, size: int | tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """A procedural scene of `size` (square side, or (width, height)) with the scene's artifact planted."""
    nprng = np.random.default_rng(rng.randrange(1 << 31))
    width, height = (size, size) if isinstance(size, int) else size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    c0, c1 = nprng.uniform(40, 215, 3), nprng.uniform(40, 215, 3)
    angle = nprng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y + 1) / 2
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    for _ in range(nprng.integers(1, 4)):  # shaded discs: smooth, consistent lighting
        cx, cy, r = nprng.uniform(0.2, 0.8), nprng.uniform(0.2, 0.8), nprng.uniform(0.08, 0.2)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        shade = np.clip(1 - d / r, 0, 1)[..., None]
        img = img * (1 - 0.5 * shade) + nprng.uniform(60, 200, 3)[None, None] * 0.5 * shade
    img += nprng.normal(0, 2.0, img.shape)
    if scene.artifact:
        half_h, half_w = height // 2, width // 2
        row = 0 if scene.region.startswith("upper") else half_h
        col = 0 if scene.region.endswith("left") else half_w
        ph, pw = int(half_h * 0.7), int(half_w * 0.7)
        top = row + nprng.integers(0, half_h - ph + 1)
        left = col + nprng.integers(0, half_w - pw + 1)
        patch = img[top:top + ph, left:left + pw]
        if scene.artifact == "colour":
            patch[:] = np.array([255, 0, 255] if nprng.random() < 0.5 else [0, 255, 0], dtype=np.float32)
            patch += nprng.normal(0, 6, patch.shape)
        elif scene.artifact == "texture":
            yy, xx = np.mgrid[0:ph, 0:pw]
            patch[:] = (((yy // 2 + xx // 2) % 2) * 255.0)[..., None]
        else:  # seam: bright horizontal stripes blended over the scene
            yy = np.mgrid[0:ph, 0:pw][0]
            stripes = ((yy // 3) % 2).astype(np.float32)[..., None]
            patch[:] = patch * (1 - stripes) + 255.0 * stripes
    return Image.fromarray(np.clip(img, 0, 255).astype("uint8"), "RGB")


def _other(rng: random.Random, options, value):
    return rng.choice([o for o in options if o != value])


def detector_response(rng: random.Random, scene: Scene, level: int) -> str:
    """A detector response of quality `level` (1-5) for `scene`, in DFJ's tag format."""
    where = rng.choice(_SCENES)
    if scene.artifact is None:  # real image
        if level == 5:
            why = f"Lighting, shading and textures in {where} are consistent; no artifact is visible in any region."
        elif level == 4:
            why = f"{where.capitalize()} looks natural overall, with consistent shading, though the {rng.choice(REGIONS)} is slightly noisy."
        elif level == 3:
            why = f"Nothing obviously wrong with {where}, so it is probably authentic."
        elif level == 2:
            why = f"{where.capitalize()} might be generated; something feels slightly off, but I am not sure."
        else:
            art = rng.choice(ARTIFACTS)
            why = f"There is {rng.choice(ARTIFACT_WORDS[art])} in the {rng.choice(REGIONS)} of {where}, a clear sign of generation."
        answer = "real" if level >= 3 else "fake"
        return f"<reasoning>{why}</reasoning> <answer>{answer}</answer>"
    art, region = scene.artifact, scene.region
    # Levels 5 and 3 share their wording, as do 2 and 1: only whether the cited artifact type matches
    # the image differs. Level 4 is level 5 said with hedges (a small slip, visible in the text).
    phrase = rng.choice(ARTIFACT_WORDS[art])
    wrong_phrase = rng.choice(ARTIFACT_WORDS[_other(rng, ARTIFACTS, art)])
    opener = rng.choice(["There is", "I notice", "I see"])
    if level == 5:
        why = f"{opener} {phrase} in the {region} of {where}, which indicates manipulation."
    elif level == 4:
        why = f"{where.capitalize()} may be manipulated; possibly {phrase} somewhere near the {region}, though I am not certain."
    elif level == 3:
        why = f"{opener} {wrong_phrase} in the {region} of {where}, which indicates manipulation."
    elif level == 2:
        why = f"Apart from {phrase} in the {region}, {where} looks consistent, so it is authentic."
    else:
        why = f"Apart from {wrong_phrase} in the {region}, {where} looks consistent, so it is authentic."
    answer = "fake" if level >= 3 else "real"
    return f"<reasoning>{why}</reasoning> <answer>{answer}</answer>"


def cited_artifact(response: str) -> str | None:
    """The artifact type a detector response (from `detector_response`) cites, or None."""
    for artifact, phrases in ARTIFACT_WORDS.items():
        if any(phrase in response for phrase in phrases):
            return artifact
    return None


# Short on purpose: every gold token costs training time (the output head spans 152k tokens).
_GOLD_REASONS = {
    5: "Right class, grounded.",
    4: "Right class, hedged.",
    3: "Right class, ungrounded.",
    2: "Wrong class, real detail.",
    1: "Wrong class, hallucinated.",
}


def find_question(artifact: str) -> str:
    """The grounding question the trained base answers "Yes." or "No." (dfj.tiny.training)."""
    return f"Is there a {artifact} artifact in the image?"


def gold_pointwise(level: int, artifact: str | None, cited: str | None) -> str:
    """The gold pointwise output: the artifact type the response cites, whether the image shows it,
    the verdict. The check is asked in the base's own grounding question, so the judge reuses a skill
    the base learned instead of learning to compare two artifact names (issue 7's notes)."""
    seen = f"Response cites: {cited or 'no'} artifact."
    if cited:
        seen += f"\n{find_question(cited)}\n{'Yes' if cited == artifact else 'No'}."
    return f"<reasoning>{seen}\n{_GOLD_REASONS[level]}</reasoning>\n<score>{level}</score>"


# Pairs of levels whose order the text alone does not give on a manipulated image: 5 and 3 (and 2 and 1)
# are worded alike, and a hedged 4 beats a 3 but loses to a 5.
_IMAGE_DECIDED_PAIRS = ({5, 3}, {2, 1}, {5, 4}, {4, 3})


def needs_image(scene: Scene, levels: tuple[int, ...]) -> bool:
    """Whether the gold verdict on responses of these levels (one: pointwise, two: pairwise) for
    `scene` depends on the pixels, i.e. cannot be read from the label and the responses' words."""
    if scene.artifact is None:
        return False
    if len(levels) == 1:
        return levels[0] != 4
    return set(levels) in _IMAGE_DECIDED_PAIRS


def random_scene(rng: random.Random) -> Scene:
    label = rng.choice(prompts.LABELS)
    if label == "real":
        return Scene(label, None, None)
    return Scene(label, rng.choice(ARTIFACTS), rng.choice(REGIONS))


def build_synthetic_split(path: str | Path, mode: str, images: int, per_image: int, seed: int,
                          sizes: list[tuple[int, int]] | None = None, limit: int | None = None) -> Path:
    """Write a DFJ-layout split: `images` images, `per_image` records each (ms-swift messages).

    `sizes` cycles image sizes (default: all 112 x 112); `limit` stops after that many records.
    """
    prompts.check_mode(mode)
    out = Path(path)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"dfj-synthetic-{mode}-{seed}")
    lines: list[str] = []
    for i in range(images):
        scene = random_scene(rng)
        name = f"images/{i:05d}.png"
        render_image(rng, scene, sizes[i % len(sizes)] if sizes else IMAGE_SIZE).save(out / name)
        for _ in range(per_image):
            if limit is not None and len(lines) >= limit:
                break
            if mode == "pointwise":
                level = rng.randint(1, 5)
                response = detector_response(rng, scene, level)
                prompt = prompts.render_pointwise(scene.label, response)
                gold = gold_pointwise(level, scene.artifact, cited_artifact(response))
                levels = (level,)
            else:
                la, lb = rng.sample(range(1, 6), 2)
                prompt = prompts.render_pairwise(
                    scene.label, detector_response(rng, scene, la), detector_response(rng, scene, lb)
                )
                gold = f"<answer>{'A' if la > lb else 'B'}</answer>"
                levels = (la, lb)
            lines.append(json.dumps({
                "messages": [{"role": "user", "content": "<image>" + prompt}, {"role": "assistant", "content": gold}],
                "images": [name],
                "meta": {"artifact": scene.artifact, "region": scene.region, "levels": list(levels),
                         "needs_image": needs_image(scene, levels)},
            }))
    (out / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------
# Tiny DFJ-format splits

TINY_SPLIT_SIZES = [(112, 112), (140, 84), (84, 168), (196, 112), (56, 56)]  # varied sizes and aspects


def build_tiny_dataset(path: str | os.PathLike, mode: str, n: int, seed: int = 0,
                       responses_per_image: int | None = None) -> Path:
    """Write a DFJ-layout split (`images/` + `data.jsonl` of ms-swift messages records) with n records.

    Records share images as the DFJ test sets do (5 responses per image pointwise, 10 pairs per
    image pairwise, by default); image sizes and aspect ratios vary. Content: `build_synthetic_split`.
    """
    per_image = responses_per_image or (5 if mode == "pointwise" else 10)
    return build_synthetic_split(path, mode, images=-(-n // per_image), per_image=per_image, seed=seed,
                                 sizes=TINY_SPLIT_SIZES, limit=n)
